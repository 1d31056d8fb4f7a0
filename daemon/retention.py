"""Retention: delivered events older than ``retention_days`` are deleted, a small batch at a time.

An event stays while any delivery of its call is still pending or failed (a failed one can
be replayed, and its mapping needs the call's earlier events). Small batches keep each
DELETE short, so the call services' inserts never wait behind it.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import structlog

from daemon import db, store
from daemon.db import DatabaseHealth
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

PURGE_BATCH = 500
PAUSE_BETWEEN_BATCHES_S = 0.05


async def purge(pool: asyncpg.Pool, retention_s: float, *, batch: int = PURGE_BATCH,
                metrics: Metrics | None = None) -> int:
    """Delete every expired event, batch by batch; return how many went."""
    total = 0
    while True:
        removed = await store.purge(pool, retention_s, batch)
        total += removed
        if metrics is not None:
            metrics.purged.inc(removed)
        if removed < batch:
            return total
        await asyncio.sleep(PAUSE_BETWEEN_BATCHES_S)


async def run_purger(pool: asyncpg.Pool, retention_s: float, interval_s: float,
                     metrics: Metrics, stopping: asyncio.Event, *,
                     health: DatabaseHealth | None = None) -> None:
    """Purge every ``interval_s`` until ``stopping`` (a failed round waits for the next)."""
    health = health or DatabaseHealth()
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval_s)
        if stopping.is_set():
            return
        try:
            removed = await purge(pool, retention_s, metrics=metrics)
        except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
            if not health.failed(exc, "purger"):
                log.warning("purge_failed", error=type(exc).__name__)
            continue
        health.succeeded()
        if removed:
            log.info("events_purged", count=removed)
