"""One simulated RetailCRM account: its configuration, its faults, and its application.

:class:`Simulator` owns everything the account holds and every control, as a method for
in-process tests and as an HTTP endpoint (:mod:`.control`) for everyone else;
:meth:`Simulator.app` builds the aiohttp application serving the API (:mod:`.api`) and the
controls; :func:`running_simulator` serves it on a port for the length of a block. Two
simulators in one process share nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web

from daemon.serving import serving

from . import callbacks
from .api import AccountApi
from .control import Controls
from .faults import Fault
from .state import (
    CUSTOMER_NAME_KEYS,
    DEFAULT_SCOPES,
    RATE_LIMIT_GENERAL,
    RATE_LIMIT_TELEPHONY,
    RATE_WINDOW_S,
    TELEPHONY_PREFIX,
    RecordedRequest,
    SimulatorState,
    key_fingerprint,
    make_users,
    normalize_user,
    phone_digits,
)


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
        self.rng = random.Random(seed)
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
        # A stalled request waits on the event current when it stalled; releasing sets it
        # and puts a fresh one in its place for the stalls to come.
        self.stall_release = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
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
        self.stall_release.set()
        self.stall_release = asyncio.Event()

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

    def admit(self, key: str, path: str) -> bool:
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

    def callback_http(self) -> aiohttp.ClientSession:
        """The session the account's callbacks use (while its application runs)."""
        if self._http is None:
            raise RuntimeError("the simulator's application is not running")
        return self._http

    # -- the application --------------------------------------------------------------------

    def app(self) -> web.Application:
        """A new aiohttp application serving this simulator's API and control endpoints."""
        api = AccountApi(self)
        app = web.Application(middlewares=[api.middleware])
        app[SIMULATOR] = self
        app.cleanup_ctx.append(self._callback_session)
        app.on_shutdown.append(self._on_shutdown)
        app.add_routes(api.routes())
        app.add_routes(Controls(self).routes())
        return app

    async def _callback_session(self, app: web.Application) -> AsyncIterator[None]:
        async with callbacks.session() as http:
            self._http = http
            yield
            self._http = None

    async def _on_shutdown(self, app: web.Application) -> None:
        self.release_stalls()


SIMULATOR: Final = web.AppKey("retailcrm_simulator", Simulator)


@asynccontextmanager
async def running_simulator(
    simulator: Simulator | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Simulator]:
    """Serve ``simulator`` (a default one if None) on ``host:port`` (0: any free port).

    Yields the simulator with ``url`` set; on exit releases stalled requests and stops the
    server.
    """
    sim = simulator if simulator is not None else Simulator()
    async with serving(sim.app(), host, port) as url:
        sim._url = url
        try:
            yield sim
        finally:
            sim.release_stalls()
            sim._url = None
