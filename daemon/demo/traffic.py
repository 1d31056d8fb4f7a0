"""A steady stream of calls, stored the way the platform's call services store them.

:class:`Traffic` begins a call every ``60 / calls_per_minute`` seconds, taking the
enterprises in turn, and replays each call's events in real time (a call lasts from a few
seconds to half a minute, so several overlap). Each enterprise's events go through a
:class:`Sink`: :class:`SqlSink` is the call services' documented ``INSERT`` (docs/events.md,
"SQL"), :class:`HttpSink` their ``POST /api/events`` with the platform's envelope
(docs/events.md, "HTTP"). An event that cannot be stored is counted and logged (once when
it starts failing, once when it works again), and the calls go on: the demo outlives a
database restart. At most :data:`MAX_CALLS_IN_FLIGHT` calls are replayed at once; a call
due beyond that is skipped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import aiohttp
import asyncpg
import structlog

from daemon.demo.scenarios import Call, CallFactory, Step

log = structlog.get_logger("crm_bridge.demo")

MAX_CALLS_IN_FLIGHT: Final = 200
STORE_TIMEOUT_S: Final = 5.0

# The call services' statement, as docs/events.md gives it. The demo plays the platform:
# this is the platform's SQL, not crm-bridge's (whose statements live in daemon/store.py).
CALL_SERVICE_INSERT: Final = """
INSERT INTO crm_events (event_type, payload, record_url, origin)
VALUES ($1, $2::jsonb, $3, coalesce($4, 'live'))
ON CONFLICT DO NOTHING
"""


class Sink(Protocol):
    """Where a call service hands an event to crm-bridge."""

    name: str

    async def store(self, step: Step) -> None:
        """Store one event; raise when it was not stored."""


class SqlSink:
    """The call services' ``INSERT INTO crm_events`` (a pool with a ``jsonb`` codec)."""

    name = "SQL insert"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def store(self, step: Step) -> None:
        """One INSERT, as a call service runs it (a retried one is a no-op)."""
        await self.pool.execute(CALL_SERVICE_INSERT, step.event_type, step.body,
                                step.record_url, step.origin)


class HttpSink:
    """``POST /api/events`` with the platform's envelope and the service token."""

    name = "POST /api/events"

    def __init__(self, http: aiohttp.ClientSession, url: str, service_token: str) -> None:
        self.http = http
        self.url = f"{url}/api/events"
        self._headers = {"Authorization": f"Bearer {service_token}"}

    async def store(self, step: Step) -> None:
        """One POST; anything but 202 is a failure."""
        envelope: dict[str, Any] = {
            "token": step.body["Token"], "uniqueId": step.body["UniqueId"],
            "event_type": step.event_type, "raw": step.body,
        }
        if step.record_url is not None:
            envelope["record_url"] = step.record_url
        if step.origin != "live":
            envelope["origin"] = step.origin
        async with self.http.post(self.url, json=envelope, headers=self._headers) as resp:
            if resp.status != 202:
                raise RuntimeError(f"POST /api/events answered HTTP {resp.status}")


@dataclass(slots=True)
class Counters:
    """What the traffic did so far."""

    calls: int = 0
    events: int = 0
    failed: int = 0
    skipped_calls: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True, slots=True)
class Feed:
    """One enterprise's calls and the way its events are stored."""

    factory: CallFactory
    sink: Sink


class Traffic:
    """Calls at a steady rate over ``feeds`` (see the module docstring). The first call of
    each feed is ``first_kind`` (an answered incoming call: cards open at once)."""

    def __init__(self, feeds: Sequence[Feed], calls_per_minute: float, *,
                 first_kind: str = "incoming") -> None:
        if not feeds or calls_per_minute <= 0:
            raise ValueError("traffic needs at least one feed and a positive rate")
        self.feeds = list(feeds)
        self.period_s = 60.0 / calls_per_minute
        self.first_kind = first_kind
        self.counters = Counters()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing = False

    async def run(self, stopping: asyncio.Event) -> None:
        """Begin calls until ``stopping`` is set, then cancel the calls still going."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        try:
            for seq in itertools.count(1):
                feed = self.feeds[(seq - 1) % len(self.feeds)]
                now = datetime.now(UTC)
                first = seq <= len(self.feeds)
                call = (feed.factory.make(self.first_kind, now, seq) if first
                        else feed.factory.next(now, seq))
                self._begin(call, feed.sink)
                due = max(due + self.period_s, loop.time())  # behind (suspended)? no burst
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), due - loop.time())
                if stopping.is_set():
                    break
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        """Stop the calls being replayed (their remaining events are not stored)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _begin(self, call: Call, sink: Sink) -> None:
        if len(self._tasks) >= MAX_CALLS_IN_FLIGHT:
            self.counters.skipped_calls += 1
            return
        self.counters.calls += 1
        self.counters.kinds[call.kind] += 1
        task = asyncio.create_task(self._replay(call, sink), name=f"demo-call-{call.unique_id}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not an outage: shown with its traceback; the other calls go on.
            log.error("demo_call_crashed", task=task.get_name(), exc_info=task.exception())

    async def _replay(self, call: Call, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        for step in sorted(call.steps, key=lambda s: s.at_s):
            await asyncio.sleep(max(0.0, began + step.at_s - loop.time()))
            try:
                await asyncio.wait_for(sink.store(step), STORE_TIMEOUT_S)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    aiohttp.ClientError, RuntimeError) as exc:
                self.counters.failed += 1
                if not self._failing:
                    self._failing = True
                    log.warning("demo_events_not_stored", via=sink.name,
                                error=type(exc).__name__, detail=str(exc)[:200])
                continue
            self.counters.events += 1
            if self._failing:
                self._failing = False
                log.info("demo_events_stored_again", via=sink.name)
