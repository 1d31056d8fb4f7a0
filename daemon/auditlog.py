"""``integration_logs`` rows of the live paths (click-to-call, transfers), written off them.

A click-to-call answers as soon as the PBX has; its log row is queued here (``put``, no
await, no I/O) and one supervised task writes whatever has accumulated in one statement, so
a burst of clicks is a handful of round trips and no click waits for the database. Rows
come already masked (their callers quote refused values escaped and short, and never put
a credential in). A row the database refuses (a bug of ours) is logged and dropped alone;
when the database is unavailable (``daemon.db``: the process's one ``DatabaseHealth`` says
so, and paces the retries) the batch is kept while the process lives, up to
``MAX_PENDING`` rows (then the oldest go, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import structlog

from daemon import db, store
from daemon.db import DatabaseHealth
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_BATCH: Final = 500
MAX_PENDING: Final = 50_000


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row: whose, which integration, what was asked and answered (masked)."""

    enterprise: str
    integration: str
    event_type: str
    request: Any
    response: Any
    ok: bool
    error: str | None


class AuditLog:
    """See the module docstring. One per process, held by the Runtime."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, *,
                 health: DatabaseHealth | None = None) -> None:
        self._pool = pool
        self._metrics = metrics
        self._health = health or DatabaseHealth()
        self._pending: list[AuditRow] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0

    def put(self, row: AuditRow) -> None:
        """Queue ``row`` for the next write (never blocks)."""
        if len(self._pending) >= MAX_PENDING:
            del self._pending[0]
            self.dropped += 1
        self._pending.append(row)
        self._idle.clear()
        self._wake.set()

    async def flushed(self) -> None:
        """Wait until every row put so far is written (or dropped)."""
        await self._idle.wait()

    async def run(self, stopping: asyncio.Event) -> None:
        """Write batches until ``stopping`` is set and nothing is left."""
        failures = 0
        while True:
            if not self._pending:
                self._idle.set()
                if stopping.is_set():
                    return
                await _first(self._wake.wait(), stopping.wait())
                self._wake.clear()
                continue
            batch = self._pending[:MAX_BATCH]
            try:
                await self._write(batch)
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                failures += 1
                if not self._health.failed(exc, "audit-log"):
                    # Not an outage: a statement the database refuses as a whole (a bug of
                    # ours). Retrying it cannot help; the rows go, counted.
                    log.error("audit_rows_dropped", error=type(exc).__name__,
                              rows=len(batch))
                    self.dropped += len(batch)
                    del self._pending[:len(batch)]
                    continue
                if stopping.is_set() and failures > 5:
                    log.error("audit_rows_abandoned", rows=len(self._pending))
                    self.dropped += len(self._pending)
                    self._pending.clear()
                    continue
                await self._health.pause(failures, stopping)
                continue
            if failures:
                self._health.succeeded()
            failures = 0
            del self._pending[:len(batch)]

    async def _write(self, batch: list[AuditRow]) -> None:
        try:
            await self._insert(batch)
        except asyncpg.DataError:
            for row in batch:  # find the refused one; the others are written
                try:
                    await self._insert([row])
                except asyncpg.DataError as exc:
                    log.error("audit_row_dropped", event_type=row.event_type,
                              error=type(exc).__name__)
                    self.dropped += 1
        self._metrics.log_rows.inc(len(batch))

    async def _insert(self, rows: list[AuditRow]) -> None:
        await self._pool.execute(
            store.INSERT_LOGS, [r.enterprise for r in rows], [r.integration for r in rows],
            [r.event_type for r in rows], [_json(r.request) for r in rows],
            [None if r.response is None else _json(r.response) for r in rows],
            ["success" if r.ok else "error" for r in rows],
            [r.error for r in rows])


async def _first(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
