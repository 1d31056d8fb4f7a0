"""``python -m daemon.integrations.retailcrm.simulator``: see :mod:`.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
