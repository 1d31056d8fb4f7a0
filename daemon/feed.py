"""The journal's live view: new deliveries and changed states, pushed to open admin pages.

Fed by what the process already hears, never by polling the tables:

* the ``crm_events`` doorbell (``NOTIFY``, every instance hears it) says new deliveries
  exist: one query fetches those of the enterprises being watched, and once more a doorbell
  window later (an event committed inside the window rang no bell), as the dispatcher does;
* the outcome writer of this process says which deliveries it just settled: the same query
  fetches their new state. (A delivery another instance settles shows its new state at the
  page's next load; its arrival shows everywhere.)

One query per wake-up, however many pages are open, and none while nobody watches. Ids are
handed out before their transactions commit, so a delivery may commit after a higher one
was seen: each query looks ``LOOKBACK_IDS`` below the highest id seen and drops what was
already sent in the same state. Each watcher has a bounded queue; one that falls behind
is told to reload instead of holding memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import structlog

from daemon import db, journal, store
from daemon.db import DatabaseHealth
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

QUEUE_SIZE: Final = 500
LOOKBACK_IDS: Final = 1_000
FETCH_LIMIT: Final = 2_000
SENT_MEMORY: Final = 20_000
RECHECK_MARGIN_S: Final = 0.005


@dataclass(slots=True, eq=False)
class Watcher:
    """One open live view: an enterprise, its filter, and what is waiting to be sent."""

    enterprise: str
    where: journal.Filter
    queue: asyncio.Queue[dict[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    behind: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: dict[str, Any]) -> None:
        """Queue ``item`` if it belongs here; a full queue marks the watcher behind."""
        if item["enterprise"] != self.enterprise or not self.where.matches(item):
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.behind.set()


class JournalFeed:
    """See the module docstring. ``run`` is a supervised background task."""

    def __init__(self, pool: asyncpg.Pool, integration: str, metrics: Metrics, *,
                 doorbell_window_s: float, health: DatabaseHealth | None = None) -> None:
        self._pool = pool
        self._health = health or DatabaseHealth()
        self._integration = integration
        self._metrics = metrics
        self._recheck_after_s = doorbell_window_s + RECHECK_MARGIN_S
        self._watchers: set[Watcher] = set()
        self._wake = asyncio.Event()
        self._recheck_at: float | None = None
        self._changed: set[int] = set()
        self._highest: int | None = None
        self._floor = 0  # deliveries up to this id existed before anyone watched
        self._sent: OrderedDict[int, tuple[str, int]] = OrderedDict()

    @asynccontextmanager
    async def watch(self, enterprise: str, where: journal.Filter) -> AsyncIterator[Watcher]:
        """Watch one enterprise's deliveries (matching ``where``) while inside."""
        watcher = Watcher(enterprise, where)
        self._watchers.add(watcher)
        self._metrics.journal_watchers.set(len(self._watchers))
        try:
            yield watcher
        finally:
            self._watchers.discard(watcher)
            self._metrics.journal_watchers.set(len(self._watchers))

    def ring(self, _payload: str = "") -> None:
        """The ``crm_events`` doorbell: look now, and once more after the window."""
        if self._watchers:
            self._recheck_at = time.monotonic() + self._recheck_after_s
            self._wake.set()

    def settled(self, event_ids: Iterable[int]) -> None:
        """This process settled these deliveries: send their new state to watchers."""
        if self._watchers:
            self._changed.update(event_ids)
            self._wake.set()

    def wake(self) -> None:
        """Look now (after the listener reconnected: notifications may have been lost)."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Fetch and fan out on every wake-up, until ``stopping``."""
        while not stopping.is_set():
            await self._sleep(stopping)
            if stopping.is_set():
                return
            if not self._watchers:
                self._changed.clear()
                self._highest = None  # start from the newest again when someone watches
                continue
            try:
                await self._fetch()
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                if not self._health.failed(exc, "journal-feed"):
                    log.warning("journal_feed_failed", error=type(exc).__name__)
            else:
                self._health.succeeded()

    async def _sleep(self, stopping: asyncio.Event) -> None:
        timeout = None
        if self._recheck_at is not None:
            timeout = max(0.0, self._recheck_at - time.monotonic())
        if not self._wake.is_set():
            waiters = {asyncio.ensure_future(self._wake.wait()),
                       asyncio.ensure_future(stopping.wait())}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        self._wake.clear()
        if self._recheck_at is not None and self._recheck_at <= time.monotonic():
            self._recheck_at = None

    async def _fetch(self) -> None:
        if self._highest is None:
            self._highest = self._floor = await store.last_delivery(self._pool,
                                                                    self._integration)
        changed, self._changed = self._changed, set()
        enterprises = {w.enterprise for w in self._watchers}
        records = await store.journal_rows(
            self._pool, self._integration, enterprises, max(0, self._highest - LOOKBACK_IDS),
            changed, FETCH_LIMIT)
        for record in records:
            self._highest = max(self._highest, record["event_id"])
            state = (record["status"], record["attempts"])
            known = self._sent.get(record["event_id"])
            if known == state or (known is None and record["event_id"] <= self._floor
                                  and record["event_id"] not in changed):
                continue
            self._remember(record["event_id"], state)
            item = {**journal.row(record), "enterprise": record["enterprise_number"]}
            for watcher in list(self._watchers):
                watcher.offer(item)

    def _remember(self, event_id: int, state: tuple[str, int]) -> None:
        self._sent[event_id] = state
        self._sent.move_to_end(event_id)
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
