"""A RetailCRM account imitated as a real aiohttp application: for tests, the demo, benchmarks.

Owns everything one simulated account holds — API keys, users, the phone → manager map, the
registered integration modules, the call events and uploaded calls received, the statuses
set — and answers the API v5 endpoints crm-bridge uses as strictly as docs/retailcrm.md describes:
the key check (``X-API-KEY`` header or ``apiKey`` query), form-encoded POST bodies whose
nested fields are JSON strings, RetailCRM's error bodies, and the rate limit (per key, 10
requests in any 1-second window, 40 for paths under ``/api/v5/telephony``, excess → 503).

It can be told to fail, stall, slow down or drop connections — for every request, one API
key's, or a random share of them — and records every API request it received, with when it
arrived, which key sent it (a fingerprint, never the key) and which fault it met. Control
endpoints take no key (``/_requests``, ``/_reset``, ``/_fault``, ``/_users``,
``/_managers``, ``/_customers``, ``/_keys``, ``/_config``, ``/_state``); every control is
also a method of :class:`Simulator` for in-process tests. All state lives on the
``Simulator`` object: two simulators in one process share nothing. Per-request work stays
small because benchmarks push thousands of requests per second through it.

Run standalone: ``python -m daemon.integrations.retailcrm.simulator --port 8020 --api-key K``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import re
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from http import HTTPStatus
from typing import Any, Final, Literal

from aiohttp import web

RATE_WINDOW_S: Final = 1.0
RATE_LIMIT_GENERAL: Final = 10
RATE_LIMIT_TELEPHONY: Final = 40
TELEPHONY_PREFIX: Final = "/api/v5/telephony"
MAX_UPLOAD_BATCH: Final = 50
PAGE_LIMITS: Final = (20, 50, 100)
MAX_RECORDED_REQUESTS: Final = 200_000
DEFAULT_SCOPES: Final = (
    "integration_read", "integration_write", "telephony_read", "telephony_write",
    "user_read", "user_write",
)
WRONG_KEY_MSG: Final = 'Wrong "apiKey" value.'
RATE_LIMIT_MSG: Final = "Rate limit exceeded"
FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"

EVENT_TYPES: Final = frozenset({"in", "out", "hangup"})
HANGUP_STATUSES: Final = frozenset({"answered", "busy", "cancel", "failed", "no answered"})
UPLOAD_TYPES: Final = frozenset({"in", "out"})
UPLOAD_RESULTS: Final = frozenset(
    {"answered", "busy", "failed", "no answer", "not allowed", "unknown"}
)
USER_STATUSES: Final = frozenset({"free", "busy", "dinner", "break"})
CUSTOMER_NAME_KEYS: Final = frozenset({"firstName", "lastName", "nickName"})
EVENT_KEYS: Final = frozenset(
    {"phone", "type", "codes", "userIds", "site", "externalPhone", "callExternalId",
     "hangupStatus"}
)
UPLOAD_KEYS: Final = frozenset(
    {"date", "type", "phone", "code", "userId", "result", "duration", "durationWaiting",
     "externalId", "recordUrl", "externalPhone", "site", "clientId"}
)
MODULE_KEYS: Final = frozenset(
    {"code", "integrationCode", "active", "freeze", "native", "name", "logo", "baseUrl",
     "clientId", "accountUrl", "actions", "availableCountries", "integrations"}
)
MODULE_ACTIONS: Final = frozenset({"activity"})
INTEGRATION_KINDS: Final = frozenset({"telephony", "delivery", "store", "mgTransport", "mgBot"})
TELEPHONY_KEYS: Final = frozenset(
    {"makeCallUrl", "changeUserStatusUrl", "allowEdit", "inputEventSupported",
     "outputEventSupported", "hangupEventSupported", "additionalCodes", "externalPhones"}
)
TELEPHONY_FLAGS: Final = (
    "allowEdit", "inputEventSupported", "outputEventSupported", "hangupEventSupported"
)
JSON_FIELDS: Final = frozenset({"event", "calls", "integrationModule"})

_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_FILTER_RE: Final = re.compile(r"filter\[(\w+)\]")
_BOOLS: Final = {"1": True, "true": True, "0": False, "false": False}
_HTML_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>Page not found</title></head>"
    "<body><h1>Page not found</h1><p>This is not the API you are looking for.</p></body></html>"
)
_EXTRA = "This form should not contain extra fields."
_BLANK = "This value should not be blank."

_FIRST_NAMES: Final = ("Анна", "Иван", "Мария", "Олег", "Елена", "Сергей", "Ольга", "Павел")
_LAST_NAMES: Final = ("Иванова", "Петров", "Сидорова", "Козлов", "Новикова", "Морозов")


class ApiError(Exception):
    """An answer in RetailCRM's error shape: ``{success: false, errorMsg, errors?}``."""

    def __init__(self, status: int, error_msg: str, errors: Any = None) -> None:
        super().__init__(error_msg)
        self.status = status
        self.error_msg = error_msg
        self.errors = errors

    def response(self) -> web.Response:
        """The JSON answer RetailCRM would give."""
        body: dict[str, Any] = {"success": False, "errorMsg": self.error_msg}
        if self.errors:
            body["errors"] = self.errors
        return web.json_response(body, status=self.status)


@dataclass(slots=True)
class Fault:
    """An injected misbehaviour for API paths starting with ``path`` (None: every API path).

    ``latency_ms`` delays the answer; ``stall`` never answers until reset (or shutdown);
    ``outage`` closes the connection without an answer; ``status``/``body``/``html`` replace
    the answer (a ``body`` string is sent as text, other values as JSON; ``html`` sends an
    HTML page, with status 200 unless given); ``bloat_bytes`` answers a JSON-looking body
    that long, streamed (never held in memory), ``gzip`` compressing it on the way: a few
    hundred KiB on the wire inflating to the whole size (a "gzip bomb"). A latency-only
    fault leaves the normal answer.
    ``count`` is how many requests it still applies to (None: until cleared); ``hits`` how
    many it has taken. ``api_key`` limits it to one key's requests (shown only as its
    fingerprint); ``ratio`` to that random share of the matching requests (1: all).
    """

    path: str | None = None
    status: int | None = None
    body: Any = None
    html: bool = False
    latency_ms: float = 0.0
    stall: bool = False
    outage: bool = False
    count: int | None = None
    retry_after: float | None = None
    api_key: str | None = field(default=None, repr=False)
    ratio: float = 1.0
    bloat_bytes: int | None = None
    gzip: bool = False
    hits: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from the ``POST /_fault`` body; ``ValueError`` names a bad field."""
        unknown = set(data) - {f.name for f in fields(cls) if f.name != "hits"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        fault = cls(**data)
        fault.validate()
        return fault

    def validate(self) -> None:
        """``ValueError`` naming the first field that cannot work."""
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError("path must be a string or null")
        if self.status is not None and (
            not isinstance(self.status, int) or not 100 <= self.status <= 599
        ):
            raise ValueError("status must be an HTTP status code")
        if not isinstance(self.latency_ms, int | float) or self.latency_ms < 0:
            raise ValueError("latency_ms must be a non-negative number")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError("count must be a positive integer or null")
        if self.retry_after is not None and not isinstance(self.retry_after, int | float):
            raise ValueError("retry_after must be a number of seconds")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or null")
        if not isinstance(self.ratio, int | float) or not 0 < self.ratio <= 1:
            raise ValueError("ratio must be a number in (0, 1]")
        if self.bloat_bytes is not None and (
            not isinstance(self.bloat_bytes, int) or self.bloat_bytes < 1
        ):
            raise ValueError("bloat_bytes must be a positive integer or null")
        if not isinstance(self.gzip, bool) or (self.gzip and self.bloat_bytes is None):
            raise ValueError("gzip must be a boolean, and needs bloat_bytes")

    def matches(self, path: str, key: str | None = None) -> bool:
        """Whether this fault applies to a request for ``path`` sent with ``key``."""
        return (self.path is None or path.startswith(self.path)) and (
            self.api_key is None or key == self.api_key)

    def kind(self) -> str:
        """A short name of what the fault does, as recorded with each request it met."""
        if self.stall:
            return "stall"
        if self.outage:
            return "outage"
        if self.html:
            return "html"
        if self.bloat_bytes is not None:
            return "bloat"
        if self.status is not None:
            return f"status_{self.status}"
        return "latency" if self.latency_ms else "body"

    def replaces_answer(self) -> bool:
        """Whether the normal answer is replaced (else the fault only adds latency)."""
        return (
            self.stall or self.outage or self.html or self.status is not None
            or self.body is not None or self.bloat_bytes is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The fault as ``GET /_state`` shows it (a key as its fingerprint)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.api_key is not None:
            shown["api_key"] = key_fingerprint(self.api_key)
        return shown


def key_fingerprint(key: str) -> str:
    """What the request log keeps of an API key: enough to tell keys apart, nothing more."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class RecordedRequest:
    """One API request received. The key itself is never kept: whether it was valid, and
    its fingerprint (``key_fingerprint``). ``fault`` names the fault it met, if any."""

    time: float
    monotonic: float
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    key_ok: bool = False
    key_source: Literal["header", "query"] | None = None
    key_id: str | None = None
    fault: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as ``GET /_requests`` lists it."""
        return {
            "time": self.time, "method": self.method, "path": self.path, "query": self.query,
            "form": self.form, "status": self.status, "key_ok": self.key_ok,
            "key_source": self.key_source, "key_id": self.key_id, "fault": self.fault,
        }


@dataclass(slots=True)
class SimulatorState:
    """What the account received; ``POST /_reset`` clears all of it."""

    requests: deque[RecordedRequest] = field(
        default_factory=lambda: deque(maxlen=MAX_RECORDED_REQUESTS)
    )
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_module_code: str | None = None
    call_events: list[dict[str, Any]] = field(default_factory=list)
    uploaded_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def module(self) -> dict[str, Any] | None:
        """The module edited last (the usual case: one module per account)."""
        return self.modules.get(self.last_module_code) if self.last_module_code else None

    def to_json(self) -> dict[str, Any]:
        """Everything but the request log, as ``GET /_state`` shows it."""
        return {
            "module": self.module, "modules": self.modules, "call_events": self.call_events,
            "uploaded_calls": list(self.uploaded_calls.values()), "statuses": self.statuses,
        }


def make_users(count: int, *, start_id: int = 1) -> list[dict[str, Any]]:
    """``count`` plausible active managers with ids from ``start_id``, all free and online."""
    users = []
    for user_id in range(start_id, start_id + count):
        users.append({
            "id": user_id,
            "firstName": _FIRST_NAMES[user_id % len(_FIRST_NAMES)],
            "lastName": _LAST_NAMES[user_id % len(_LAST_NAMES)],
            "email": f"manager{user_id}@example.test",
            "phone": f"+7900{user_id:07d}",
        })
    return [normalize_user(user) for user in users]


def normalize_user(user: Mapping[str, Any]) -> dict[str, Any]:
    """A full user object from a partial one (``id`` required); ``ValueError`` if unusable."""
    user_id = user.get("id")
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError(f"a user needs a positive int id, got {user_id!r}")
    status = user.get("status", "free")
    if status not in USER_STATUSES:
        raise ValueError(f"user {user_id}: status must be one of {sorted(USER_STATUSES)}")
    return {
        "id": user_id,
        "active": bool(user.get("active", True)),
        "email": str(user.get("email", f"user{user_id}@example.test")),
        "firstName": str(user.get("firstName", "User")),
        "lastName": str(user.get("lastName", str(user_id))),
        "patronymic": str(user.get("patronymic", "")),
        "phone": str(user.get("phone", "")),
        "status": status,
        "online": bool(user.get("online", True)),
        "isManager": bool(user.get("isManager", True)),
        "groups": list(user.get("groups", [])),
    }


def phone_digits(phone: str) -> str:
    """The digits of a phone number: the manager map matches on these alone."""
    return "".join(ch for ch in phone if ch.isdigit())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FORM: Final = web.RequestKey("retailcrm_sim_form", dict)


class Simulator:
    """One simulated RetailCRM account: its configuration, its faults and what it received.

    ``users`` defaults to three managers; ``managers`` maps phone numbers (digits compared)
    to user ids for ``/api/v5/telephony/manager``; ``customers`` gives the customer with a
    phone number a name (``firstName``/``lastName``, or a company's ``nickName``) — a phone
    in either map is a known customer. ``module_402`` makes module edits answer
    402 (an unpaid account), ``manager_404`` makes "no manager" a 404 instead of
    ``manager: null``.
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = ("sim-api-key",),
        users: Iterable[Mapping[str, Any]] | None = None,
        managers: Mapping[str, int] | None = None,
        customers: Mapping[str, Mapping[str, str]] | None = None,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        sites: Iterable[str] = ("main",),
        rate_limit: bool = True,
        module_402: bool = False,
        manager_404: bool = False,
        seed: int | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self._initial_keys = frozenset(api_keys)
        self._initial_users = [
            normalize_user(u) for u in (make_users(3) if users is None else users)
        ]
        self._initial_managers = dict(managers or {})
        self._initial_customers = dict(customers or {})
        self._initial_config = {
            "rate_limit": rate_limit, "module_402": module_402, "manager_404": manager_404,
        }
        self.scopes = list(scopes)
        self.sites = list(sites)
        self.state = SimulatorState()
        self.faults: list[Fault] = []
        self.keys: frozenset[str] = self._initial_keys
        self.users: dict[int, dict[str, Any]] = {}
        self.managers: dict[str, int] = {}
        self.customers: dict[str, dict[str, str]] = {}
        self.rate_limit = rate_limit
        self.module_402 = module_402
        self.manager_404 = manager_404
        self.set_users(self._initial_users)
        self.set_managers(self._initial_managers)
        self.set_customers(self._initial_customers)
        self._windows: dict[tuple[str, bool], deque[float]] = {}
        self._stall_release = asyncio.Event()
        self._url: str | None = None

    # -- controls (also reachable over HTTP) -----------------------------------------------

    @property
    def url(self) -> str:
        """The base URL while running under :func:`running_simulator`."""
        if self._url is None:
            raise RuntimeError("the simulator is not running")
        return self._url

    def reset(self, *, users: bool = False, keys: bool = False, config: bool = False) -> None:
        """Clear what was received, the faults and the rate windows; release stalled requests.

        Users, the manager and customer maps, keys and config switches are kept unless told:
        then they go back to what the simulator was built with.
        """
        self.state = SimulatorState()
        self.faults.clear()
        self._windows.clear()
        self.release_stalls()
        if users:
            self.set_users(self._initial_users)
            self.set_managers(self._initial_managers)
            self.set_customers(self._initial_customers)
        if keys:
            self.keys = self._initial_keys
        if config:
            self.configure(**self._initial_config)

    def add_fault(self, fault: Fault | None = None, /, **options: Any) -> Fault:
        """Inject a fault (a :class:`Fault`, or its fields as keywords); return it."""
        fault = fault if fault is not None else Fault(**options)
        fault.validate()
        self.faults.append(fault)
        return fault

    def remove_fault(self, fault: Fault) -> None:
        """Remove one fault (gone already: nothing happens); stalled requests stay stalled."""
        if fault in self.faults:
            self.faults.remove(fault)

    def clear_faults(self) -> None:
        """Remove every fault and release stalled requests."""
        self.faults.clear()
        self.release_stalls()

    def release_stalls(self) -> None:
        """Let every stalled request go: each closes its connection without an answer."""
        self._stall_release.set()
        self._stall_release = asyncio.Event()

    def set_users(self, users: Iterable[Mapping[str, Any]]) -> None:
        """Replace the account's users (partial objects are completed by ``normalize_user``)."""
        normalized = [normalize_user(u) for u in users]
        self.users = {u["id"]: u for u in normalized}

    def set_managers(self, managers: Mapping[str, int]) -> None:
        """Replace the phone → responsible user id map."""
        self.managers = {phone_digits(phone): int(uid) for phone, uid in managers.items()}

    def set_customers(self, customers: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the phone → customer name fields map (``firstName``, ``lastName``,
        ``nickName``)."""
        self.customers = {phone_digits(phone): {k: str(v) for k, v in names.items()
                                                if k in CUSTOMER_NAME_KEYS}
                          for phone, names in customers.items()}

    def set_keys(self, keys: Iterable[str]) -> None:
        """Replace the set of valid API keys."""
        self.keys = frozenset(keys)

    def configure(
        self,
        *,
        rate_limit: bool | None = None,
        module_402: bool | None = None,
        manager_404: bool | None = None,
    ) -> None:
        """Flip behaviour switches; None leaves a switch as it is."""
        if rate_limit is not None:
            self.rate_limit = rate_limit
            self._windows.clear()
        if module_402 is not None:
            self.module_402 = module_402
        if manager_404 is not None:
            self.manager_404 = manager_404

    def config(self) -> dict[str, bool]:
        """The current switches."""
        return {
            "rate_limit": self.rate_limit, "module_402": self.module_402,
            "manager_404": self.manager_404,
        }

    def recorded(self, path_prefix: str | None = None) -> list[RecordedRequest]:
        """The API requests received (optionally only those under ``path_prefix``)."""
        if path_prefix is None:
            return list(self.state.requests)
        return [r for r in self.state.requests if r.path.startswith(path_prefix)]

    def peak_rate(
        self,
        *,
        bucket: Literal["general", "telephony"] | None = None,
        window_s: float = RATE_WINDOW_S,
        api_key: str | None = None,
    ) -> int:
        """The most requests that arrived within any ``window_s`` (per rate bucket, and of
        one API key, if given)."""
        key_id = None if api_key is None else key_fingerprint(api_key)
        times = sorted(
            r.monotonic for r in self.state.requests
            if (bucket is None
                or r.path.startswith(TELEPHONY_PREFIX) == (bucket == "telephony"))
            and (key_id is None or r.key_id == key_id)
        )
        peak = start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window_s:
                start += 1
            peak = max(peak, end - start + 1)
        return peak

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /_state`` answers: received data, configuration and active faults."""
        return {
            **self.state.to_json(),
            "users": list(self.users.values()),
            "managers": self.managers,
            "customers": self.customers,
            "config": self.config(),
            "faults": [f.to_json() for f in self.faults],
            "request_count": len(self.state.requests),
        }

    # -- the application --------------------------------------------------------------------

    def app(self) -> web.Application:
        """A new aiohttp application serving this simulator's API and control endpoints."""
        app = web.Application(middlewares=[self._api_middleware])
        app[SIMULATOR] = self
        app.on_shutdown.append(self._on_shutdown)
        add = app.router.add_route
        add("GET", "/api/credentials", self._credentials)
        add("GET", "/api/v5/integration-modules/{code}", self._get_module)
        add("POST", "/api/v5/integration-modules/{code}/edit", self._edit_module)
        add("POST", "/api/v5/telephony/call/event", self._call_event)
        add("POST", "/api/v5/telephony/calls/upload", self._upload_calls)
        add("GET", "/api/v5/telephony/manager", self._manager)
        add("GET", "/api/v5/users", self._users)
        add("POST", r"/api/v5/users/{id:\d+}/status", self._user_status)
        add("GET", "/_requests", self._ctl_requests)
        add("POST", "/_reset", self._ctl_reset)
        add("POST", "/_fault", self._ctl_fault)
        add("DELETE", "/_fault", self._ctl_clear_faults)
        add("POST", "/_users", self._ctl_users)
        add("POST", "/_managers", self._ctl_managers)
        add("POST", "/_customers", self._ctl_customers)
        add("POST", "/_keys", self._ctl_keys)
        add("POST", "/_config", self._ctl_config)
        add("GET", "/_state", self._ctl_state)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        self.release_stalls()

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Record, fault, key check, rate limit and form decoding for every ``/api/`` request."""
        path = request.path
        if not path.startswith("/api/"):
            return await handler(request)
        record = RecordedRequest(
            time.time(), time.monotonic(), request.method, path,
            {k: v for k, v in request.query.items() if k != "apiKey"},
        )
        self.state.requests.append(record)
        try:
            response = await self._serve(request, handler, record)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:  # no such route or method: RetailCRM answers JSON
            response = ApiError(exc.status, exc.reason).response()
        except _Dropped:
            record.status = None
            return web.Response(status=499)  # the connection is already gone
        except Exception:
            record.status = 500  # a simulator bug: aiohttp answers 500 with the traceback logged
            raise
        record.status = response.status
        return response

    async def _serve(
        self, request: web.Request, handler: Handler, record: RecordedRequest
    ) -> web.StreamResponse:
        key = request.headers.get("X-API-KEY")
        record.key_source = "header" if key is not None else None
        if key is None:
            key = request.query.get("apiKey")
            record.key_source = "query" if key is not None else None
        record.key_ok = key is not None and key in self.keys
        record.key_id = None if key is None else key_fingerprint(key)
        if request.method == "POST" and request.content_type == FORM_CONTENT_TYPE:
            # Read (and recorded) first: a request a fault answers still says what it was.
            posted = await request.post()
            form = {k: v for k, v in posted.items() if isinstance(v, str)}
            request[FORM] = form
            record.form = {k: _try_json(v) if k in JSON_FIELDS else v for k, v in form.items()}
        # Faults stand for the network and the servers in front: they come before the API.
        if self.faults:
            answer = await self._apply_fault(request, record, key)
            if answer is not None:
                return answer
        if key is None or not record.key_ok:
            raise ApiError(403, WRONG_KEY_MSG)
        if self.rate_limit and not self._admit(key, record.path):
            raise ApiError(503, RATE_LIMIT_MSG)
        if request.method == "POST" and request.content_type != FORM_CONTENT_TYPE:
            raise ApiError(
                400, f"POST bodies must be {FORM_CONTENT_TYPE}, not "
                f"{request.content_type or 'empty'}",
            )
        return await handler(request)

    async def _apply_fault(
        self, request: web.Request, record: RecordedRequest, key: str | None
    ) -> web.StreamResponse | None:
        # The first fault that matches and whose share comes up this time.
        fault = next((f for f in self.faults if f.matches(record.path, key)
                      and (f.ratio >= 1 or self._rng.random() < f.ratio)), None)
        if fault is None:
            return None
        fault.hits += 1
        record.fault = fault.kind()
        if fault.count is not None:
            fault.count -= 1
            if fault.count == 0:
                self.faults.remove(fault)
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        if fault.stall:
            await self._stall_release.wait()
            _drop(request)
        if fault.outage:
            _drop(request)
        if not fault.replaces_answer():
            return None
        headers = None
        if fault.retry_after is not None:
            headers = {"Retry-After": f"{fault.retry_after:g}"}
        if fault.bloat_bytes is not None:
            return await _bloated(request, fault.status or 200, fault.bloat_bytes, fault.gzip)
        if fault.html:
            text = fault.body if isinstance(fault.body, str) else _HTML_PAGE
            return web.Response(
                status=fault.status or 200, text=text, content_type="text/html", headers=headers
            )
        status = fault.status or 200
        if isinstance(fault.body, str):
            return web.Response(status=status, text=fault.body, headers=headers)
        body = fault.body
        if body is None:
            body = {"success": True} if status < 300 else {
                "success": False,
                "errorMsg": RATE_LIMIT_MSG if status in (429, 503) else _phrase(status),
            }
        return web.json_response(body, status=status, headers=headers)

    def _admit(self, key: str, path: str) -> bool:
        """Sliding-window limiter: count the requests admitted for this key and bucket."""
        telephony = path.startswith(TELEPHONY_PREFIX)
        window = self._windows.get((key, telephony))
        if window is None:
            window = self._windows[(key, telephony)] = deque()
        now = time.monotonic()
        edge = now - RATE_WINDOW_S
        while window and window[0] <= edge:
            window.popleft()
        if len(window) >= (RATE_LIMIT_TELEPHONY if telephony else RATE_LIMIT_GENERAL):
            return False
        window.append(now)
        return True

    # -- API handlers -------------------------------------------------------------------------

    async def _credentials(self, request: web.Request) -> web.Response:
        return web.json_response({
            "success": True, "scopes": self.scopes, "siteAccess": "access_full",
            "sitesAvailable": self.sites,
        })

    async def _get_module(self, request: web.Request) -> web.Response:
        module = self.state.modules.get(request.match_info["code"])
        if module is None:
            raise ApiError(404, "Not found")
        return web.json_response({"success": True, "integrationModule": module})

    async def _edit_module(self, request: web.Request) -> web.Response:
        if self.module_402:
            raise ApiError(402, "Payment required: the account is not paid")
        code = request.match_info["code"]
        module = _json_field(request, "integrationModule", dict)
        problems = _module_errors(code, module)
        if problems:
            raise ApiError(400, "Integration module is not valid", problems)
        telephony = (module.get("integrations") or {}).get("telephony") or {}
        info: dict[str, Any] = {}
        missing_users = sorted({
            int(c["userId"]) for c in telephony.get("additionalCodes", [])
            if int(c["userId"]) not in self.users
        })
        if missing_users:
            info["notExistUsersIds"] = missing_users
        missing_sites = sorted({
            p["siteCode"] for p in telephony.get("externalPhones", [])
            if p["siteCode"] not in self.sites
        })
        if missing_sites:
            info["notExistSiteCodes"] = missing_sites
        self.state.modules[code] = module
        self.state.last_module_code = code
        return web.json_response({"success": True, "info": info})

    async def _call_event(self, request: web.Request) -> web.Response:
        event = _json_field(request, "event", dict)
        problems = _event_errors(event)
        if problems:
            raise ApiError(400, "Call event is not valid", problems)
        self.state.call_events.append(event)
        body: dict[str, Any] = {"success": True}
        known_codes = self._known_codes()
        unknown_codes = [c for c in event.get("codes", []) if c not in known_codes]
        if unknown_codes:
            body["notExistCodes"] = unknown_codes
        unknown_users = [u for u in event.get("userIds", []) if u not in self.users]
        if unknown_users:
            body["notExistUsers"] = unknown_users
        return web.json_response(body)

    async def _upload_calls(self, request: web.Request) -> web.Response:
        calls = _json_field(request, "calls", list)
        if not calls:
            raise ApiError(400, "Parameter 'calls' is empty", {"calls": _BLANK})
        if len(calls) > MAX_UPLOAD_BATCH:
            raise ApiError(
                400, f"At most {MAX_UPLOAD_BATCH} calls per request, got {len(calls)}",
                {"calls": f"This collection should contain {MAX_UPLOAD_BATCH} elements or less."},
            )
        problems: dict[str, str] = {}
        for index, call in enumerate(calls):
            problems.update(_upload_errors(index, call))
        if problems:
            raise ApiError(400, "Calls are not valid", problems)
        duplicates: list[Any] = []
        processed = 0
        for call in calls:
            external_id = str(call["externalId"])
            if external_id in self.state.uploaded_calls:
                duplicates.append(call["externalId"])
                continue
            self.state.uploaded_calls[external_id] = call
            processed += 1
        return web.json_response(
            {"success": True, "processedCallsCount": processed, "duplicateCalls": duplicates}
        )

    async def _manager(self, request: web.Request) -> web.Response:
        query = request.query
        phone = query.get("phone", "")
        if not phone_digits(phone):
            raise ApiError(400, "Parameter 'phone' is missing", {"phone": _BLANK})
        details = _query_bool(query, "details", False)
        ignore_status = _query_bool(query, "ignoreStatus", False)
        digits = phone_digits(phone)
        known = digits in self.managers or digits in self.customers
        user = self.users.get(self.managers.get(digits, 0))
        if user is None or not user["active"] or (not ignore_status and user["status"] != "free"):
            if self.manager_404:
                raise ApiError(404, "Manager not found")
            if not (known and details):
                return web.json_response({"success": True, "manager": None})
            user = None
        manager: dict[str, Any] | None = None
        if user is not None:
            manager = {
                k: user[k] for k in ("id", "firstName", "lastName", "patronymic", "email",
                                     "phone", "status", "online")
            }
            code = self._code_of(user["id"])
            if code is not None:
                manager["code"] = code
        body: dict[str, Any] = {"success": True, "manager": manager}
        if details:
            customer_id = int(digits[-6:])
            body["customer"] = {
                "type": "customer", "id": customer_id, "phones": [{"number": phone}],
                **self.customers.get(digits, {}),
            }
            body["links"] = {
                "newOrderLink": "/orders/add", "lastOrderLink": None,
                "newCustomerLink": "/customers/add", "customerLink": f"/customers/{customer_id}",
            }
        return web.json_response(body)

    async def _users(self, request: web.Request) -> web.Response:
        query = request.query
        limit = _query_int(query, "limit", 20)
        if limit not in PAGE_LIMITS:
            raise ApiError(400, "Errors in the input parameters",
                           {"limit": f"The value must be one of {list(PAGE_LIMITS)}."})
        page = _query_int(query, "page", 1)
        if page < 1:
            raise ApiError(400, "Errors in the input parameters",
                           {"page": "This value should be 1 or more."})
        users = list(self.users.values())
        for key in query:
            match = _FILTER_RE.fullmatch(key)
            if match is None:
                continue
            name = match.group(1)
            if name not in ("active", "isManager", "online"):
                raise ApiError(400, "Errors in the input parameters", {key: _EXTRA})
            wanted = _query_bool(query, key, True)
            users = [u for u in users if u[name] == wanted]
        total = len(users)
        return web.json_response({
            "success": True,
            "pagination": {
                "limit": limit, "totalCount": total, "currentPage": page,
                "totalPageCount": math.ceil(total / limit),
            },
            "users": users[(page - 1) * limit:page * limit],
        })

    async def _user_status(self, request: web.Request) -> web.Response:
        user = self.users.get(int(request.match_info["id"]))
        if user is None:
            raise ApiError(404, "Not found")
        status = request[FORM].get("status")
        if status not in USER_STATUSES:
            raise ApiError(400, "Errors in the input parameters",
                           {"status": f"The value must be one of: {_listed(USER_STATUSES)}."})
        user["status"] = status
        self.state.statuses.append({"userId": user["id"], "status": status, "time": time.time()})
        return web.json_response({"success": True})

    def _known_codes(self) -> dict[str, int]:
        """Every extension in the registered modules' ``additionalCodes``: code → user id."""
        codes: dict[str, int] = {}
        for module in self.state.modules.values():
            telephony = (module.get("integrations") or {}).get("telephony") or {}
            for entry in telephony.get("additionalCodes", []):
                codes[entry["code"]] = int(entry["userId"])
        return codes

    def _code_of(self, user_id: int) -> str | None:
        return next((c for c, uid in self._known_codes().items() if uid == user_id), None)

    # -- control handlers ---------------------------------------------------------------------

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        records = self.recorded(request.query.get("path"))
        return web.json_response(
            {"count": len(records), "requests": [r.to_json() for r in records]}
        )

    async def _ctl_reset(self, request: web.Request) -> web.Response:
        options = await _control_json(request, dict, default={})
        self.reset(users=bool(options.get("users")), keys=bool(options.get("keys")),
                   config=bool(options.get("config")))
        return web.json_response({"success": True})

    async def _ctl_fault(self, request: web.Request) -> web.Response:
        data = await _control_json(request, dict)
        try:
            fault = self.add_fault(Fault.from_json(data))
        except (TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}),
                                     content_type="application/json") from None
        return web.json_response({"success": True, "fault": fault.to_json()})

    async def _ctl_clear_faults(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"success": True})

    async def _ctl_users(self, request: web.Request) -> web.Response:
        data = await _control_json(request, (list, dict))
        users = data.get("users") if isinstance(data, dict) else data
        if not isinstance(users, list):
            raise _bad_control("send a list of users, or {\"users\": [...]}")
        try:
            self.set_users(users)
        except (TypeError, ValueError, AttributeError) as exc:
            raise _bad_control(str(exc)) from None
        return web.json_response({"success": True, "count": len(self.users)})

    async def _ctl_managers(self, request: web.Request) -> web.Response:
        data = await _control_json(request, dict)
        try:
            self.set_managers(data)
        except (TypeError, ValueError) as exc:
            raise _bad_control(str(exc)) from None
        return web.json_response({"success": True, "count": len(self.managers)})

    async def _ctl_customers(self, request: web.Request) -> web.Response:
        data = await _control_json(request, dict)
        if not all(isinstance(v, dict) for v in data.values()):
            raise _bad_control("expected {phone: {firstName, lastName, nickName}}")
        self.set_customers(data)
        return web.json_response({"success": True, "count": len(self.customers)})

    async def _ctl_keys(self, request: web.Request) -> web.Response:
        data = await _control_json(request, (list, dict))
        keys = data.get("keys") if isinstance(data, dict) else data
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise _bad_control("keys must be a list of non-empty strings")
        self.set_keys(keys)
        return web.json_response({"success": True, "count": len(self.keys)})

    async def _ctl_config(self, request: web.Request) -> web.Response:
        data = await _control_json(request, dict)
        unknown = set(data) - {"rate_limit", "module_402", "manager_404"}
        if unknown or not all(isinstance(v, bool) for v in data.values()):
            raise _bad_control("switches: rate_limit, module_402, manager_404 (booleans)")
        self.configure(**data)
        return web.json_response({"success": True, "config": self.config()})

    async def _ctl_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())


SIMULATOR: Final = web.AppKey("retailcrm_simulator", Simulator)


class _Dropped(Exception):
    """The connection was closed on purpose (outage, released stall): nothing to answer."""


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
    raise _Dropped


async def _bloated(request: web.Request, status: int, size: int, gzip: bool
                   ) -> web.StreamResponse:
    """``size`` bytes of an unfinished JSON object, streamed; gzip-compressed on the way when
    ``gzip``. A reader that stops early just closes the connection: the writing stops."""
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    if gzip:
        response.headers["Content-Encoding"] = "gzip"
    else:
        response.content_length = size
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
    head = b'{"success": true, "pad": "'
    try:
        await response.prepare(request)
        sent = 0
        while sent < size:
            chunk = (memoryview(head) if sent == 0 else _PAD)[:size - sent]
            sent += len(chunk)
            data = compressor.compress(chunk) if compressor is not None else chunk
            if data:
                await response.write(data)
            else:
                await asyncio.sleep(0)  # deflate holds its output back: let the reader run
        if compressor is not None:
            await response.write(compressor.flush())
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the reader had enough
    return response


_PAD: Final = memoryview(b" " * 1_048_576)


def _listed(values: Iterable[Any]) -> str:
    return ", ".join(f'"{v}"' for v in sorted(values))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _try_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _json_field(request: web.Request, name: str, kind: type[Any]) -> Any:
    """The JSON-string form field ``name`` decoded, or RetailCRM's 400 naming the field."""
    raw = request[FORM].get(name)
    if raw is None or raw == "":
        raise ApiError(400, f"Parameter '{name}' is missing", {name: _BLANK})
    try:
        value = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"Parameter '{name}' must be a JSON string",
                       {name: "This value is not valid JSON."}) from None
    if not isinstance(value, kind):
        shape = "object" if kind is dict else "array"
        raise ApiError(400, f"Parameter '{name}' must be a JSON {shape}",
                       {name: f"This value should be of type {shape}."})
    return value


def _query_bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    value = _BOOLS.get(raw.lower())
    if value is None:
        raise ApiError(400, "Errors in the input parameters", {name: "Use 0 or 1."})
    return value


def _query_int(query: Mapping[str, str], name: str, default: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ApiError(400, "Errors in the input parameters",
                       {name: "This value should be a positive integer."})
    return int(raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://")) and len(value) > 8


def _event_errors(event: Mapping[str, Any]) -> dict[str, str]:
    """RetailCRM-style field errors for a call event; empty when it is valid."""
    errors = {f"event[{k}]": _EXTRA for k in event if k not in EVENT_KEYS}
    if event.get("type") not in EVENT_TYPES:
        errors["event[type]"] = f"The value must be one of: {_listed(EVENT_TYPES)}."
    if not _is_text(event.get("phone")):
        errors["event[phone]"] = _BLANK
    codes = event.get("codes", [])
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        errors["event[codes]"] = "This value should be a list of strings."
    user_ids = event.get("userIds", [])
    if not isinstance(user_ids, list) or not all(_is_int(u) for u in user_ids):
        errors["event[userIds]"] = "This value should be a list of integers."
    hangup_status = event.get("hangupStatus")
    if event.get("type") == "hangup" and hangup_status is None:
        errors["event[hangupStatus]"] = "A hangup event needs a hangupStatus."
    elif hangup_status is not None and hangup_status not in HANGUP_STATUSES:
        errors["event[hangupStatus]"] = f"The value must be one of: {_listed(HANGUP_STATUSES)}."
    for key in ("site", "externalPhone", "callExternalId"):
        if key in event and not isinstance(event[key], str):
            errors[f"event[{key}]"] = "This value should be of type string."
    return errors


def _upload_errors(index: int, call: Any) -> dict[str, str]:
    """RetailCRM-style field errors for one uploaded call; empty when it is valid."""
    at = f"calls[{index}]"
    if not isinstance(call, dict):
        return {at: "This value should be of type object."}
    errors = {f"{at}[{k}]": _EXTRA for k in call if k not in UPLOAD_KEYS}
    date = call.get("date")
    if not isinstance(date, str) or not _DATE_RE.fullmatch(date) or not _valid_date(date):
        errors[f"{at}[date]"] = "This value is not a valid datetime (Y-m-d H:i:s)."
    if call.get("type") not in UPLOAD_TYPES:
        errors[f"{at}[type]"] = f"The value must be one of: {_listed(UPLOAD_TYPES)}."
    if not _is_text(call.get("phone")):
        errors[f"{at}[phone]"] = _BLANK
    if call.get("result") not in UPLOAD_RESULTS:
        errors[f"{at}[result]"] = f"The value must be one of: {_listed(UPLOAD_RESULTS)}."
    external_id = call.get("externalId")
    if not (_is_text(external_id) or _is_int(external_id)):
        errors[f"{at}[externalId]"] = _BLANK
    for key in ("duration", "durationWaiting"):
        if key in call and not (_is_int(call[key]) and call[key] >= 0):
            errors[f"{at}[{key}]"] = "This value should be a non-negative integer."
    if "userId" in call and not _is_int(call["userId"]):
        errors[f"{at}[userId]"] = "This value should be of type integer."
    if "recordUrl" in call and not _is_url(call["recordUrl"]):
        errors[f"{at}[recordUrl]"] = "This value is not a valid URL."
    for key in ("code", "externalPhone", "site", "clientId"):
        if key in call and not isinstance(call[key], str):
            errors[f"{at}[{key}]"] = "This value should be of type string."
    return errors


def _valid_date(value: str) -> bool:
    try:
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")  # naive: the account's own zone
    except ValueError:
        return False
    return True


def _module_errors(code: str, module: Mapping[str, Any]) -> dict[str, str]:
    """RetailCRM-style field errors for an ``integrationModule``; empty when it is valid."""
    errors: dict[str, str] = {}
    for key in module:
        if key in TELEPHONY_KEYS:
            errors[key] = "Telephony settings belong in integrations.telephony."
        elif key not in MODULE_KEYS:
            errors[key] = _EXTRA
    for key in ("code", "integrationCode", "name", "baseUrl", "clientId"):
        if not _is_text(module.get(key)):
            errors[key] = _BLANK
    if _is_text(module.get("code")) and module["code"] != code:
        errors["code"] = f"The module code must be {code!r}, as in the URL."
    for key in ("baseUrl", "accountUrl", "logo"):
        if key in module and key not in errors and not _is_url(module[key]):
            errors[key] = "This value is not a valid URL."
    for key in ("active", "freeze", "native"):
        if key in module and not isinstance(module[key], bool):
            errors[key] = "This value should be of type bool."
    actions = module.get("actions", {})
    if not isinstance(actions, dict):
        errors["actions"] = "This value should be of type object."
    else:
        for key, value in actions.items():
            if key not in MODULE_ACTIONS:
                errors[f"actions[{key}]"] = f"Unknown action; known: {sorted(MODULE_ACTIONS)}."
            elif not _is_text(value):
                errors[f"actions[{key}]"] = _BLANK
    countries = module.get("availableCountries", [])
    if not isinstance(countries, list) or not all(
        isinstance(c, str) and len(c) == 2 for c in countries
    ):
        errors["availableCountries"] = "This value should be a list of ISO country codes."
    integrations = module.get("integrations", {})
    if not isinstance(integrations, dict):
        errors["integrations"] = "This value should be of type object."
        return errors
    for key in integrations:
        if key not in INTEGRATION_KINDS:
            errors[f"integrations[{key}]"] = _EXTRA
    telephony = integrations.get("telephony")
    if telephony is not None:
        errors.update(_telephony_errors(telephony))
    return errors


def _telephony_errors(telephony: Any) -> dict[str, str]:
    at = "integrations[telephony]"
    if not isinstance(telephony, dict):
        return {at: "This value should be of type object."}
    errors = {f"{at}[{k}]": _EXTRA for k in telephony if k not in TELEPHONY_KEYS}
    for key in ("makeCallUrl", "changeUserStatusUrl"):
        if key in telephony and not _is_text(telephony[key]):
            errors[f"{at}[{key}]"] = "This value should be a URL."
    for key in TELEPHONY_FLAGS:
        if key in telephony and not isinstance(telephony[key], bool):
            errors[f"{at}[{key}]"] = "This value should be of type bool."
    codes = telephony.get("additionalCodes", [])
    # userId as an int or a numeric string: the official Go client sends a string.
    if not isinstance(codes, list) or not all(
        isinstance(c, dict) and _is_text(c.get("code")) and (
            _is_int(c.get("userId")) or (isinstance(c.get("userId"), str)
                                         and c["userId"].isdigit())
        ) for c in codes
    ):
        errors[f"{at}[additionalCodes]"] = "Each entry needs a userId and a code."
    phones = telephony.get("externalPhones", [])
    if not isinstance(phones, list) or not all(
        isinstance(p, dict) and _is_text(p.get("siteCode")) and _is_text(p.get("externalPhone"))
        for p in phones
    ):
        errors[f"{at}[externalPhones]"] = "Each entry needs a siteCode and an externalPhone."
    return errors


async def _control_json(
    request: web.Request, kind: type[Any] | tuple[type[Any], ...], *, default: Any = None
) -> Any:
    """A control endpoint's JSON body of the expected shape, or a 400 saying what is wrong."""
    raw = await request.text()
    if not raw.strip() and default is not None:
        return default
    try:
        data = json.loads(raw)
    except ValueError:
        raise _bad_control("the body must be JSON") from None
    if not isinstance(data, kind):
        raise _bad_control("unexpected JSON shape for this control endpoint")
    return data


def _bad_control(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": message}), content_type="application/json"
    )


@asynccontextmanager
async def running_simulator(
    simulator: Simulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """Serve ``simulator`` (a default one if None) on ``host:port`` (0: any free port).

    Yields the simulator with ``url`` set; on exit releases stalled requests and stops the
    server.
    """
    sim = simulator if simulator is not None else Simulator()
    runner = web.AppRunner(sim.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        sim._url = f"http://{bound_host}:{bound_port}"
        yield sim
    finally:
        sim.release_stalls()
        sim._url = None
        await runner.cleanup()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m daemon.integrations.retailcrm.simulator",
        description="Serve a simulated RetailCRM account (API v5) for demos and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8020)
    parser.add_argument("--api-key", action="append", required=True, dest="api_keys",
                        help="a valid API key (repeat for several)")
    parser.add_argument("--users", type=int, default=3, help="how many managers to simulate")
    parser.add_argument("--manager", action="append", default=[], metavar="PHONE=USER_ID",
                        help="make USER_ID the responsible manager for PHONE (repeatable)")
    parser.add_argument("--no-rate-limit", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry: serve one simulated account until interrupted."""
    args = _parse_args(argv)
    managers = {}
    for item in args.manager:
        phone, _, user_id = item.partition("=")
        managers[phone] = int(user_id)
    sim = Simulator(
        api_keys=args.api_keys, users=make_users(args.users), managers=managers,
        rate_limit=not args.no_rate_limit,
    )
    web.run_app(
        sim.app(), host=args.host, port=args.port, access_log=None,
        print=lambda _: print(
            f"RetailCRM simulator on http://{args.host}:{args.port} "
            f"({args.users} users, {len(args.api_keys)} key(s))", flush=True,
        ),
    )


if __name__ == "__main__":
    main()
