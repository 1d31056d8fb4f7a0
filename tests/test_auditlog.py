"""The live paths' audit log: rows written in batches off the request path, a row the
database refuses dropped alone, rows kept through a database outage, everything written
before the process stops."""

from __future__ import annotations

import asyncio
import random
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from structlog.testing import capture_logs

from daemon import db
from daemon.auditlog import AuditLog, AuditRow
from daemon.db import DatabaseHealth
from daemon.metrics import Metrics
from tests.support.tcpproxy import proxy_to
from tests.support.waiting import wait_until


def row(n: int, **changes: object) -> AuditRow:
    base = {"enterprise": "0367", "integration": "retailcrm", "event_type": "make_call",
            "request": {"n": n, "phone": "+375291234567"}, "response": {"status": 200},
            "ok": True, "error": None}
    return AuditRow(**{**base, **changes})  # type: ignore[arg-type]


async def test_rows_are_written_in_batches_and_a_refused_one_alone_is_dropped(
    pool: asyncpg.Pool,
) -> None:
    audit = AuditLog(pool, Metrics("retailcrm"))
    stopping = asyncio.Event()
    task = asyncio.create_task(audit.run(stopping))
    for n in range(300):
        audit.put(row(n))
    # jsonb cannot hold a NUL: the database refuses this one row, not its batch.
    audit.put(row(300, request={"phone": "1\x002"}))
    audit.put(row(301, response=None, ok=False, error="phone: not a phone number"))
    await asyncio.wait_for(audit.flushed(), 10)
    stopping.set()
    await asyncio.wait_for(task, 10)
    rows = await pool.fetch("SELECT request_data, response_data, status, error_message "
                            "FROM integration_logs ORDER BY id")
    assert len(rows) == 301 and audit.dropped == 1
    assert rows[0]["request_data"] == {"n": 0, "phone": "+375291234567"}
    assert (rows[-1]["response_data"], rows[-1]["status"], rows[-1]["error_message"]) == (
        None, "error", "phone: not a phone number")


async def test_what_was_put_before_the_stop_is_written(pool: asyncpg.Pool) -> None:
    audit = AuditLog(pool, Metrics("retailcrm"))
    stopping = asyncio.Event()
    stopping.set()
    for n in range(5):
        audit.put(row(n))
    await asyncio.wait_for(audit.run(stopping), 10)
    assert await pool.fetchval("SELECT count(*) FROM integration_logs") == 5


async def test_rows_wait_out_a_database_outage_and_it_is_logged_once_each_way(
    database_url: str, pool: asyncpg.Pool,
) -> None:
    parts = urlsplit(database_url)
    async with proxy_to(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        via = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
        proxied = await db.create_pool(via, min_size=1, max_size=2, command_timeout_s=2)
        health = DatabaseHealth(rng=random.Random(1))
        audit = AuditLog(proxied, Metrics("retailcrm"), health=health)
        stopping = asyncio.Event()
        task = asyncio.create_task(audit.run(stopping))
        try:
            with capture_logs() as logs:
                proxy.blocked = True
                proxy.drop_all()
                for n in range(20):
                    audit.put(row(n))
                await wait_until(lambda: not health.available, timeout=10)
                await asyncio.sleep(0.5)  # several failed writes meanwhile
                proxy.blocked = False
                await asyncio.wait_for(audit.flushed(), 20)
        finally:
            stopping.set()
            await asyncio.wait_for(task, 10)
            await proxied.close()
    assert await pool.fetchval("SELECT count(*) FROM integration_logs") == 20
    assert audit.dropped == 0 and health.available
    events = [line["event"] for line in logs]
    assert events.count("database_unavailable") == 1
    assert events.count("database_recovered") == 1
    assert "audit_rows_dropped" not in events
