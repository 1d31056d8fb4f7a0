"""A RetailCRM account imitated as a real aiohttp application: for tests, the demo, dry runs
and benchmarks.

It answers the API v5 endpoints crm-bridge uses as strictly as docs/retailcrm.md describes:
the key check (``X-API-KEY`` header or ``apiKey`` query), form-encoded POST bodies whose
nested fields are JSON strings, RetailCRM's error bodies, and the rate limit (per key, 10
requests in any 1-second window, 40 for paths under ``/api/v5/telephony``, excess → 503).
It can be told to fail, stall, slow down or drop connections — for every request, one API
key's, or a random share of them — and records every API request it received, with when it
arrived, which key sent it (a fingerprint, never the key) and which fault it met. It can
also call back like RetailCRM: a manager's click on a number (``POST /_click``).
docs/simulators.md describes it for users.

The package, by concern:

* :mod:`.state`: the account's data (the request log, what it received, users) and the
  constants the others share;
* :mod:`.validation`: how strictly requests are read; RetailCRM's error shape (:class:`ApiError`);
* :mod:`.faults`: injected misbehaviour (:class:`Fault`) and how a request meets it;
* :mod:`.api`: the API endpoints, and the key check, rate limit and form decoding before them;
* :mod:`.control`: the control endpoints (``/_requests``, ``/_reset``, ``/_fault``…);
* :mod:`.callbacks`: what the account calls back (click-to-call);
* :mod:`.account`: :class:`Simulator` (every control as a method too), its application,
  and :func:`running_simulator`;
* :mod:`.cli`: ``python -m daemon.integrations.retailcrm.simulator``.

Everything tests, benchmarks and the demo use is importable from here.
"""

from __future__ import annotations

from .account import SIMULATOR, Simulator, running_simulator
from .callbacks import CallbackError, Click
from .cli import main
from .faults import Fault
from .state import (
    DEFAULT_SCOPES,
    FORM_CONTENT_TYPE,
    MAX_RECORDED_REQUESTS,
    MAX_UPLOAD_BATCH,
    PAGE_LIMITS,
    RATE_LIMIT_GENERAL,
    RATE_LIMIT_MSG,
    RATE_LIMIT_TELEPHONY,
    RATE_WINDOW_S,
    TELEPHONY_PREFIX,
    USER_STATUSES,
    WRONG_KEY_MSG,
    RecordedRequest,
    SimulatorState,
    key_fingerprint,
    make_users,
    normalize_user,
    phone_digits,
)
from .validation import (
    EVENT_TYPES,
    HANGUP_STATUSES,
    UPLOAD_RESULTS,
    UPLOAD_TYPES,
    ApiError,
)

__all__ = [
    "DEFAULT_SCOPES",
    "EVENT_TYPES",
    "FORM_CONTENT_TYPE",
    "HANGUP_STATUSES",
    "MAX_RECORDED_REQUESTS",
    "MAX_UPLOAD_BATCH",
    "PAGE_LIMITS",
    "RATE_LIMIT_GENERAL",
    "RATE_LIMIT_MSG",
    "RATE_LIMIT_TELEPHONY",
    "RATE_WINDOW_S",
    "SIMULATOR",
    "TELEPHONY_PREFIX",
    "UPLOAD_RESULTS",
    "UPLOAD_TYPES",
    "USER_STATUSES",
    "WRONG_KEY_MSG",
    "ApiError",
    "CallbackError",
    "Click",
    "Fault",
    "RecordedRequest",
    "Simulator",
    "SimulatorState",
    "key_fingerprint",
    "main",
    "make_users",
    "normalize_user",
    "phone_digits",
    "running_simulator",
]
