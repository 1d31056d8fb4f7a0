"""The LISTEN connection: one dedicated asyncpg connection, never from the pool.

It LISTENs on ``crm_events`` (the doorbell) and ``crm_config`` (configuration changes) and
hands each notification to a handler. NOTIFY is a hint (docs/architecture.md): notifications
sent while the connection is away are gone, so after every (re)connect ``on_connect`` runs
with the ``time.monotonic()`` from which notifications arrive — the composition root makes it
a config catch-up plus a dispatcher wake-up. ``open`` makes the first connection before ``run``, so
that a config load started after it (the startup load) already covers the first catch-up.

A lost connection is noticed two ways: asyncpg's termination listener, and a probe every
``probe_interval_s`` — a NOTIFY on a channel of this connection's own, which must come back
within ``probe_timeout_s``. Reconnects back off exponentially with jitter, capped. The
connection never holds a transaction open (a full notification queue would make every
notifying commit fail — the call services' inserts).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import asyncpg
import structlog

from daemon import db, store
from daemon.db import DatabaseHealth
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 10.0
PROBE_TIMEOUT_S = 3.0
CLOSE_TIMEOUT_S = 2.0

Handler = Callable[[str], None]


@dataclass(slots=True)
class ListenerState:
    """What ``/stats`` shows of the listener."""

    connected: bool = False
    connects: int = 0
    reconnects: int = 0
    last_notification_at: float | None = None
    last_probe_ok_at: float | None = None
    last_error: str | None = None


class Listener:
    """Keeps one LISTEN connection alive and routes its notifications (see module doc)."""

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler],
        on_connect: Callable[[float], Awaitable[None]],
        metrics: Metrics,
        *,
        probe_interval_s: float = 10.0,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        command_timeout_s: float = 10.0,
        application_name: str = "crm-bridge:listener",
        health: DatabaseHealth | None = None,
    ) -> None:
        self._dsn = dsn
        self._handlers = dict(handlers)
        self._on_connect = on_connect
        self._metrics = metrics
        self._probe_interval_s = probe_interval_s
        self._probe_timeout_s = probe_timeout_s
        self._command_timeout_s = command_timeout_s
        self._application_name = application_name
        self._health = health or DatabaseHealth()
        self._rng = random.Random()  # reconnect jitter (not the random module's shared state)
        self._probe_channel = f"crm_probe_{secrets.token_hex(6)}"
        self._probe_waiters: dict[str, asyncio.Future[None]] = {}
        self._pid: int | None = None
        self._opened: asyncpg.Connection | None = None
        self._listening_since = 0.0  # time.monotonic() when the current LISTEN took effect
        self.state = ListenerState()
        self.caught_up = asyncio.Event()  # set after the first connect's catch-up

    @property
    def backend_pid(self) -> int | None:
        """The server process of the current connection (tests terminate it)."""
        return self._pid

    async def open(self) -> None:
        """Connect and LISTEN now; ``run`` serves this connection first. A failure is left
        to ``run``'s reconnects."""
        self._opened = await self._connect()

    async def close(self) -> None:
        """Close a connection ``open`` made that ``run`` never took (a start that failed)."""
        conn, self._opened = self._opened, None
        if conn is not None:
            self._set_connected(False)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)

    async def run(self, stopping: asyncio.Event) -> None:
        """Connect, listen, probe, reconnect — until ``stopping`` is set."""
        delay = RECONNECT_MIN_S
        while not stopping.is_set():
            conn = self._opened or await self._connect()
            self._opened = None
            if conn is None:
                await _sleep_or_stop(stopping, delay * self._rng.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            try:
                caught_up = await self._serve(conn, stopping)
            finally:
                self._set_connected(False)
                self._pid = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)
            if caught_up:
                delay = RECONNECT_MIN_S
            else:  # connected, but the database failed the catch-up: back off
                await _sleep_or_stop(stopping, delay * self._rng.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect(self) -> asyncpg.Connection | None:
        conn: asyncpg.Connection | None = None
        try:
            conn = await db.connect(
                self._dsn, command_timeout_s=self._command_timeout_s,
                application_name=self._application_name,
            )
            for channel in self._handlers:
                await conn.add_listener(channel, self._on_notification)
            await conn.add_listener(self._probe_channel, self._on_probe)
            self._listening_since = time.monotonic()
        except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
            if conn is not None:  # connected, but LISTEN failed: do not leak it
                conn.terminate()
            self._health.failed(exc, "listener")
            if self.state.last_error is None:
                log.warning("listener_unavailable", error=type(exc).__name__)
            self.state.last_error = type(exc).__name__
            return None
        self._health.succeeded()
        if self.state.connects:
            self.state.reconnects += 1
            self._metrics.listener_reconnects.inc()
            log.info("listener_recovered", reconnects=self.state.reconnects)
        self.state.connects += 1
        self.state.last_error = None
        self._pid = conn.get_server_pid()
        self._set_connected(True)
        return conn

    async def _serve(self, conn: asyncpg.Connection, stopping: asyncio.Event) -> bool:
        """Catch up, then listen and probe until the connection is lost or ``stopping``;
        False when the catch-up failed because the database is unavailable."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        if conn.is_closed():  # lost between ``open`` and ``run``
            lost.set()
        try:
            await self._on_connect(self._listening_since)
        except Exception as exc:
            if self._health.failed(exc, "listener"):
                # Notifications may have been missed and not caught up: connect again,
                # which catches up again (after a pause, if the database is still away).
                log.warning("listener_catch_up_failed", error=type(exc).__name__)
                self.state.last_error = "catch-up failed"
                return False
            log.exception("listener_catch_up_failed")
        self.caught_up.set()
        while not stopping.is_set() and not lost.is_set():
            await _wait_any(stopping, lost, timeout_s=self._probe_interval_s)
            if stopping.is_set() or lost.is_set():
                break
            if not await self._probe(conn):
                break
        if lost.is_set() and not stopping.is_set():
            log.warning("listener_connection_lost")
            self.state.last_error = "connection lost"
        return True

    async def _probe(self, conn: asyncpg.Connection) -> bool:
        token = secrets.token_hex(4)
        waiter = asyncio.get_running_loop().create_future()
        self._probe_waiters[token] = waiter
        try:
            await conn.execute("SELECT pg_notify($1, $2)", self._probe_channel, token)
            usage = await conn.fetchval(store.NOTIFICATION_QUEUE_USAGE)
            self._metrics.notification_queue_usage.set(float(usage))
            await asyncio.wait_for(waiter, self._probe_timeout_s)
        except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
            self._health.failed(exc, "listener")
            log.warning("listener_probe_failed", error=type(exc).__name__)
            self.state.last_error = f"probe failed: {type(exc).__name__}"
            return False
        finally:
            self._probe_waiters.pop(token, None)
        self.state.last_probe_ok_at = time.time()
        return True

    def _on_probe(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        waiter = self._probe_waiters.get(payload)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_notification(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self.state.last_notification_at = time.time()
        self._metrics.notifications.labels(channel).inc()
        handler = self._handlers.get(channel)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:  # a bad payload or handler bug never kills the listener
            self._metrics.notifications_dropped.labels(channel).inc()
            log.warning("notification_dropped", channel=channel, payload=payload[:200],
                        exc_info=True)

    def _set_connected(self, connected: bool) -> None:
        self.state.connected = connected
        self._metrics.listener_connected.set(1 if connected else 0)

    def stats(self) -> dict[str, object]:
        """The listener's state for ``/stats``."""
        s = self.state
        return {
            "connected": s.connected, "reconnects": s.reconnects,
            "last_notification_at": s.last_notification_at,
            "last_probe_ok_at": s.last_probe_ok_at, "last_error": s.last_error,
        }


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


async def _wait_any(*events: asyncio.Event, timeout_s: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
