"""``python -m daemon.demo``: see :mod:`daemon.demo.cli`."""

from __future__ import annotations

import sys

from daemon.demo.cli import main

sys.exit(main())
