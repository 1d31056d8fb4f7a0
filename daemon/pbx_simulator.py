"""The platform's Asterisk service imitated as a real aiohttp application: tests, demo, bench.

Serves the two requests crm-bridge makes (:mod:`daemon.pbx`): ``GET /api/makecallexternal``
(``code``, ``phone``, ``clientId``) and ``GET /api/transfer`` (``transfer_type=blind``,
``from_ext``, ``to_ext``, ``clientId``). It records every request **exactly as received**
(so a test can prove that nothing hostile ever arrived), flags what the real service's shell
would choke on (``dangerous``: any value that is not plain digits with an optional leading
``+``), and answers ``{"success": true, "message": …}``, or
``{"success": false, "error": …}`` with 403 for an unknown ``clientId`` (when clients are
configured; with none, any is taken) and 400 for a missing or malformed value.

The ``clientId`` is never recorded: only whether it was known and the enterprise it belongs
to. Control endpoints: ``GET /_requests``, ``POST /_reset``, ``POST /_fault`` /
``DELETE /_fault`` (``latency_ms``, ``stall`` — no answer until reset —, ``outage`` — the
connection closed —, ``status`` with an optional ``body``, ``count``, ``path``),
``POST /_clients`` (``{clientId: enterprise}``), ``GET /_state``. Each is also a method of
:class:`PbxSimulator`. Two simulators in one process share nothing.

Run standalone: ``python -m daemon.pbx_simulator --port 8018 [--client SECRET=ENTERPRISE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from aiohttp import web

from daemon.serving import serving

ORIGINATE: Final = "/api/makecallexternal"
TRANSFER: Final = "/api/transfer"
MAX_RECORDED: Final = 100_000
_PLAIN: Final = re.compile(r"\+?[0-9]+")
_REQUIRED: Final = {ORIGINATE: ("code", "phone"), TRANSFER: ("from_ext", "to_ext")}


@dataclass(slots=True)
class PbxFault:
    """A misbehaviour for paths starting with ``path`` (None: both). ``count`` None: until
    cleared."""

    path: str | None = None
    latency_ms: float = 0.0
    stall: bool = False
    outage: bool = False
    status: int | None = None
    body: Any = None
    count: int | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PbxFault:
        """From a ``POST /_fault`` body; ``ValueError`` names what is wrong."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        fault = cls(**data)
        if fault.status is not None and not (isinstance(fault.status, int)
                                             and 100 <= fault.status <= 599):
            raise ValueError("status must be an HTTP status code")
        if not isinstance(fault.latency_ms, int | float) or fault.latency_ms < 0:
            raise ValueError("latency_ms must be a non-negative number")
        if fault.count is not None and (not isinstance(fault.count, int) or fault.count < 1):
            raise ValueError("count must be a positive integer or null")
        return fault


@dataclass(slots=True)
class PbxRequest:
    """One request as received (the ``clientId`` itself is not kept)."""

    time: float
    path: str
    query: dict[str, str]
    client_ok: bool
    enterprise: str | None
    dangerous: list[str] = field(default_factory=list)
    status: int | None = None


class PbxSimulator:
    """See the module docstring. ``clients`` maps a clientId to its enterprise."""

    def __init__(self, clients: Mapping[str, str] | None = None) -> None:
        self.clients: dict[str, str] = dict(clients or {})
        self.requests: list[PbxRequest] = []
        self.faults: list[PbxFault] = []
        self._release = asyncio.Event()
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL while running under :func:`running_pbx`."""
        if self._url is None:
            raise RuntimeError("the PBX simulator is not running")
        return self._url

    # -- controls ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was received, clear faults, release stalled requests."""
        self.requests.clear()
        self.clear_faults()

    def add_fault(self, **options: Any) -> PbxFault:
        """Add a fault (the fields of :class:`PbxFault`)."""
        fault = PbxFault.from_json(options)
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every fault and release stalled requests (they get no answer)."""
        self.faults.clear()
        self._release.set()
        self._release = asyncio.Event()

    def received(self, path: str | None = None) -> list[PbxRequest]:
        """What was received (for ``path`` only, when given)."""
        return [r for r in self.requests if path is None or r.path == path]

    # -- the application ----------------------------------------------------------------------

    def app(self) -> web.Application:
        """A new aiohttp application serving this simulator."""
        app = web.Application()
        app.on_shutdown.append(self._on_shutdown)
        add = app.router.add_route
        add("GET", ORIGINATE, self._serve)
        add("GET", TRANSFER, self._serve)
        add("GET", "/_requests", self._ctl_requests)
        add("POST", "/_reset", self._ctl_reset)
        add("POST", "/_fault", self._ctl_fault)
        add("DELETE", "/_fault", self._ctl_clear)
        add("POST", "/_clients", self._ctl_clients)
        add("GET", "/_state", self._ctl_state)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.clear_faults()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        query = {k: v for k, v in request.query.items() if k != "clientId"}
        client_id = request.query.get("clientId", "")
        enterprise = self.clients.get(client_id)
        record = PbxRequest(time.time(), request.path, query,
                            client_ok=enterprise is not None or (not self.clients and bool(
                                client_id)),
                            enterprise=enterprise,
                            dangerous=[k for k, v in query.items() if not _PLAIN.fullmatch(v)
                                       and k != "transfer_type"])
        if len(self.requests) < MAX_RECORDED:
            self.requests.append(record)
        response = await self._fault(request) or self._answer(request.path, record)
        record.status = response.status
        return response

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        fault = next((f for f in self.faults
                      if f.path is None or request.path.startswith(f.path)), None)
        if fault is None:
            return None
        if fault.count is not None:
            fault.count -= 1
            if fault.count == 0:
                self.faults.remove(fault)
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        if fault.stall:
            await self._release.wait()
        if fault.stall or fault.outage:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=499)
        if fault.status is None:
            return None
        body = fault.body if fault.body is not None else {
            "success": fault.status < 300, "error": f"simulated HTTP {fault.status}"}
        if isinstance(body, str):
            return web.Response(status=fault.status, text=body)
        return web.json_response(body, status=fault.status)

    def _answer(self, path: str, record: PbxRequest) -> web.Response:
        if not record.client_ok:
            return web.json_response({"success": False, "error": "unknown clientId"},
                                     status=403)
        missing = [k for k in _REQUIRED[path] if not record.query.get(k)]
        if missing or record.dangerous:
            bad = ", ".join(missing or record.dangerous)
            return web.json_response({"success": False, "error": f"bad parameters: {bad}"},
                                     status=400)
        if path == TRANSFER:
            if record.query.get("transfer_type") != "blind":
                return web.json_response({"success": False, "error": "transfer_type"},
                                         status=400)
            return web.json_response({"success": True, "message": "transferred"})
        return web.json_response({"success": True, "message": "call originated"})

    # -- control handlers ---------------------------------------------------------------------

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        path = request.query.get("path")
        received = [asdict(r) for r in self.received(path)]
        return web.json_response({"count": len(received), "requests": received})

    async def _ctl_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"success": True})

    async def _ctl_fault(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.text())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            fault = self.add_fault(**data)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"success": True, "fault": asdict(fault)})

    async def _ctl_clear(self, _request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"success": True})

    async def _ctl_clients(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.text())
        except ValueError:
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return web.json_response({"error": "expected {clientId: enterprise}"}, status=400)
        self.clients = dict(data)
        return web.json_response({"success": True, "count": len(self.clients)})

    async def _ctl_state(self, _request: web.Request) -> web.Response:
        return web.json_response({"clients": len(self.clients), "requests": len(self.requests),
                                  "faults": [asdict(f) for f in self.faults]})


@asynccontextmanager
async def running_pbx(simulator: PbxSimulator | None = None, *, host: str = "127.0.0.1",
                      port: int = 0) -> AsyncIterator[PbxSimulator]:
    """Serve ``simulator`` (a new one if None) on ``host:port`` (0: any free port) until the
    block ends; yields it with ``url`` set."""
    sim = simulator if simulator is not None else PbxSimulator()
    async with serving(sim.app(), host, port) as url:
        sim._url = url
        try:
            yield sim
        finally:
            sim.clear_faults()
            sim._url = None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: serve one simulated Asterisk service until interrupted; a port
    already in use is one line naming ``--port`` (exit 1)."""
    parser = argparse.ArgumentParser(
        prog="python -m daemon.pbx_simulator",
        description="Serve a simulated Asterisk service (click-to-call, transfers).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8018)
    parser.add_argument("--client", action="append", default=[], metavar="SECRET=ENTERPRISE",
                        help="a known clientId and its enterprise (repeatable; none: any). "
                        "A secret on a command line shows in ps: POST /_clients is better")
    args = parser.parse_args(argv)
    clients = dict(item.partition("=")[::2] for item in args.client)
    try:
        web.run_app(PbxSimulator(clients).app(), host=args.host, port=args.port,
                    access_log=None,
                    print=lambda _: print(f"PBX simulator on http://{args.host}:{args.port} "
                                          f"({len(clients) or 'any'} client(s))", flush=True))
    except OSError as exc:
        print(f"pbx simulator: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc} (choose another --port)", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
