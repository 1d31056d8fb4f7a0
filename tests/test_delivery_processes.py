"""The pipeline across real daemon processes: two instances, and kill -9 mid-batch."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from daemon.settings import Settings
from tests.conftest import settings_env
from tests.support.bodies import dial
from tests.support.daemon import start_process
from tests.support.fakecrm import FAKE, FakeUpstream
from tests.test_delivery import enterprises, settled, statuses

pytestmark = pytest.mark.slow


async def _insert_many(pool: asyncpg.Pool, numbers: list[str], count: int) -> None:
    rows = [
        ("dial", dial(f"{n}", token=f"tok{numbers[n % len(numbers)]}"))
        for n in range(count)
    ]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO crm_events (event_type, payload) VALUES ($1, $2) "
            "ON CONFLICT DO NOTHING", rows,
        )


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return settings_env(
        database_url, CRM_BRIDGE_INTEGRATION=FAKE,
        CRM_BRIDGE_RATE_LIMITS="default=100000", CRM_BRIDGE_ENTERPRISE_CONCURRENCY="50",
        CRM_BRIDGE_POLL_INTERVAL_S="0.2", **extra,
    )


async def test_two_processes_deliver_2000_events_once_each(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    numbers = await enterprises(pool, make_settings(integration=FAKE), upstream, 10)
    daemons = [await start_process(_env(database_url, CRM_BRIDGE_INSTANCE_ID=f"p{k}"))
               for k in range(2)]
    try:
        await _insert_many(pool, numbers, 2000)
        await settled(pool, 2000, timeout=60)
    finally:
        codes = [await d.stop() for d in daemons]
    assert codes == [0, 0]
    assert await statuses(pool) == {"done": 2000}
    delivered = Counter(r.event_id for r in upstream.delivered())
    assert len(delivered) == 2000, "no loss"
    assert [e for e, n in delivered.items() if n > 1] == [], "no duplicates"
    logs = await pool.fetchval("SELECT count(*) FROM integration_logs")
    assert logs == 2000
    claimers = await pool.fetch(
        "SELECT request_data->>'attempt' AS a, count(*) FROM integration_logs GROUP BY 1")
    assert [(r["a"], r["count"]) for r in claimers] == [("1", 2000)]


async def test_kill_9_mid_batch_then_restart_delivers_everything(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    numbers = await enterprises(pool, make_settings(integration=FAKE), upstream, 4)
    for number in numbers:
        upstream.slow_keys[f"key-{number}"] = 0.3  # attempts stay in flight a while
    env = _env(database_url, CRM_BRIDGE_LEASE_S="4", CRM_BRIDGE_ATTEMPT_TIMEOUT_S="2",
               CRM_BRIDGE_OWNERSHIP_S="6")
    first = await start_process(env)
    await _insert_many(pool, numbers, 300)
    deadline = time.monotonic() + 30
    while len(upstream.delivered()) < 60 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await first.kill()
    killed_at = time.monotonic()
    done_at_kill = {r["event_id"] for r in await pool.fetch(
        "SELECT event_id FROM crm_deliveries WHERE status = 'done'")}
    seen_at_kill = {event_id for at, event_id in upstream.arrivals if at < killed_at}
    in_flight = seen_at_kill - done_at_kill
    assert in_flight, "the kill landed mid-batch"
    second = await start_process(env)
    try:
        await settled(pool, 300, timeout=60)
    finally:
        assert await second.stop() == 0
    assert await statuses(pool) == {"done": 300}
    delivered = Counter(r.event_id for r in upstream.delivered())
    assert len(delivered) == 300, "every event delivered"
    duplicates = {e for e, n in delivered.items() if n > 1}
    assert duplicates <= in_flight, "duplicates only for attempts in flight at the kill"
    reclaimed = await pool.fetchval(
        "SELECT count(*) FROM integration_logs WHERE request_data->>'attempt' = '2'")
    assert reclaimed >= len(duplicates)
