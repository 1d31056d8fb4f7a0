"""The HTTP server around the app: deadlines for slow clients and a cap on connections.

aiohttp's server waits for a request's head as long as the client likes, keeps an idle
connection for an hour (``keepalive_timeout`` 3630 s) and accepts any number of connections:
300 clients trickling their headers one byte at a time held 300 connections for minutes.
Three rules, built on aiohttp's own server classes (``web.Server`` makes one
``web.RequestHandler`` per connection, ``web.AppRunner`` makes the server):

* **head deadline** (``CRM_BRIDGE_HTTP_HEADER_TIMEOUT_S``): a request's line and headers must
  be complete within this time of the connection opening — or, on a kept-alive connection,
  of the first byte of the next request. An idle kept-alive connection is not a slow one: it
  is closed after ``KEEPALIVE_TIMEOUT_S`` (nginx keeps its upstream connections ~60 s).
* **body deadline** (``CRM_BRIDGE_HTTP_BODY_TIMEOUT_S``): once the head is in, the whole body
  must arrive within this time, whether the handler reads it or not (aiohttp drains an unread
  body after the answer).
* **connection cap** (``CRM_BRIDGE_HTTP_MAX_CONNECTIONS``): past it, the oldest connection
  still waiting for a request head is closed to make room — a flood of slow clients cannot
  lock out ``/health`` — or the new one, when every open connection is busy with a request.

A connection past a deadline is closed without an answer (``crm_bridge_http_connections_cut_total``
counts them by reason). A request head or body the client got wrong (bytes that are not HTTP,
a bad gzip body) is answered 400 by aiohttp or by the app, and logged at debug level without
a traceback: it is the client's error, not the server's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from daemon.settings import Settings

log = structlog.get_logger(__name__)

KEEPALIVE_TIMEOUT_S: Final = 75.0
Phase = Literal["head", "body", "handling", "idle"]
Cut = Literal["header", "body", "capacity"]
# What a client causes, and aiohttp logs as an error with a traceback when it meets it.
_CLIENT_ERRORS: Final = (HttpProcessingError, web.RequestPayloadError, ConnectionError)


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's rules (see the module docstring); from the settings."""

    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_connections: int = 1000
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The limits ``CRM_BRIDGE_HTTP_*`` set."""
        return cls(settings.http_header_timeout_s, settings.http_body_timeout_s,
                   settings.http_max_connections)


class Connection(web.RequestHandler):
    """aiohttp's handler of one connection, with the head and body deadlines.

    ``phase``: ``head`` (waiting for a request head, on the clock), ``body`` (head in, body
    arriving, on the clock), ``handling`` (the app has the request), ``idle`` (answered;
    the next request's clock starts with its first byte).
    """

    def __init__(self, manager: GuardedServer, *, loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = manager
        self._clock = loop
        self.phase: Phase = "head"
        self._deadline: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the head clock (a connection that sends nothing is a slow one too)."""
        super().connection_made(transport)
        if self.transport is not None:
            self._arm(self._guard.limits.header_timeout_s, "header")

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the clock."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """The first byte after an answer starts the next head's clock."""
        if self.phase == "idle" and data:
            self.phase = "head"
            self._arm(self._guard.limits.header_timeout_s, "header")
        super().data_received(data)

    def head_received(self, payload: StreamReader) -> None:
        """The request's head is in (called by the server's request factory)."""
        self._disarm()
        self._answered = False
        if payload.is_eof():
            self.phase = "handling"
            return
        self.phase = "body"
        self._arm(self._guard.limits.body_timeout_s, "body")
        payload.on_eof(self._body_complete)

    def _body_complete(self) -> None:
        if self.phase == "body":
            self._disarm()
            self.phase = "idle" if self._answered else "handling"

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Answer; the connection then waits for its next request, off the clock."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._answered = True
            if self.phase == "handling":
                self.phase = "idle"

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A client's malformed head or body: debug, without a traceback; anything else as
        aiohttp logs it."""
        exc = kw.get("exc_info")
        if isinstance(exc, _CLIENT_ERRORS):
            log.debug("http_client_error", error=type(exc).__name__)
            return
        super().log_exception(*args, **kw)

    @property
    def waiting(self) -> bool:
        """No request of this connection is being read or handled."""
        return self.phase in ("head", "idle")

    def _arm(self, delay_s: float, reason: Cut) -> None:
        self._disarm()
        self._deadline = self._clock.call_later(delay_s, self._expire, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, reason: Cut) -> None:
        self._deadline = None
        self._guard.cut(self, reason)


RequestFactory = Callable[
    [RawRequestMessage, StreamReader, web.RequestHandler, AbstractStreamWriter,
     "asyncio.Task[None]"],
    web.BaseRequest,
]


class GuardedServer(web.Server):
    """aiohttp's low-level server, making :class:`Connection` handlers and capping them."""

    def __init__(self, handler: Any, *, request_factory: RequestFactory, limits: Limits,
                 on_cut: Callable[[Cut], None] | None = None, **kwargs: Any) -> None:
        super().__init__(handler, request_factory=self._on_head(request_factory), **kwargs)
        self.limits = limits
        self._handler_kwargs = {**kwargs, "keepalive_timeout": limits.keepalive_timeout_s}
        self._on_cut = on_cut
        self._open: dict[Connection, None] = {}  # insertion order: the oldest first

    def __call__(self) -> Connection:
        """A handler for a new connection (asyncio's protocol factory)."""
        return Connection(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    @staticmethod
    def _on_head(factory: RequestFactory) -> RequestFactory:
        def make(message: RawRequestMessage, payload: StreamReader,
                 protocol: web.RequestHandler, writer: AbstractStreamWriter,
                 task: asyncio.Task[None]) -> web.BaseRequest:
            if isinstance(protocol, Connection):
                protocol.head_received(payload)
            return factory(message, payload, protocol, writer, task)

        return make

    def connection_made(self, handler: web.RequestHandler,
                        transport: asyncio.Transport) -> None:
        """Count it; past the cap, close the oldest waiting connection (or this one)."""
        super().connection_made(handler, transport)
        if not isinstance(handler, Connection):
            return
        self._open[handler] = None
        if len(self._open) > self.limits.max_connections:
            victim = next((c for c in self._open if c.waiting and c is not handler), handler)
            self.cut(victim, "capacity")

    def connection_lost(self, handler: web.RequestHandler,
                        exc: BaseException | None = None) -> None:
        """Forget it."""
        super().connection_lost(handler, exc)
        self._open.pop(handler, None)  # type: ignore[call-overload]

    def cut(self, connection: Connection, reason: Cut) -> None:
        """Close ``connection`` now, without an answer, and count it."""
        self._open.pop(connection, None)
        connection.force_close()
        if self._on_cut is not None:
            self._on_cut(reason)
        log.debug("http_connection_cut", reason=reason)


class Runner(web.AppRunner):
    """``web.AppRunner`` serving the app through a :class:`GuardedServer` (no access log:
    the request metrics and the app's own lines say what happened)."""

    def __init__(self, app: web.Application, limits: Limits, *,
                 on_cut: Callable[[Cut], None] | None = None) -> None:
        super().__init__(app, handle_signals=False, access_log=None)
        self._limits = limits
        self._on_cut = on_cut

    async def _make_server(self) -> web.Server:
        # aiohttp's own server for this app (startup run, app frozen), rebuilt as ours
        # around the same request handler and factory.
        plain = await super()._make_server()
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             limits=self._limits, on_cut=self._on_cut, access_log=None)
