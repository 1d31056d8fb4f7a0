"""RetailCRM's rate limit, counted where RetailCRM counts it: at the simulator, per API key,
in every sliding one-second window — with one, two and three instances draining a backlog
— and what a storm of "slow down" (503) answers does to the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import ENTERPRISE, KEY, seed
from tests.support.daemon import running
from tests.support.seed import register
from tests.support.waiting import wait_until

TOKEN = f"tok{ENTERPRISE}"
TELEPHONY_LIMIT = 40


def dial(n: int) -> dict[str, Any]:
    return {"Token": TOKEN, "UniqueId": f"1757773000.{n}", "CallType": 0,
            "Phone": "+375291234567", "Extensions": ["101"], "Trunk": "0001363"}


async def backlog(pool: asyncpg.Pool, count: int) -> None:
    await register(pool, "retailcrm")
    async with pool.acquire() as conn:
        await conn.executemany("INSERT INTO crm_events (event_type, payload) VALUES ($1, $2)",
                               [("dial", dial(n)) for n in range(count)])


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_the_rate_per_key_never_exceeds_the_limit_in_any_window(
    instances: int, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    count = 160
    await backlog(pool, count)
    settings = [make_settings(poll_interval_s=0.1, enterprise_concurrency=8,
                              instance_id=f"r{k}") for k in range(instances)]
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        for one in settings:
            await stack.enter_async_context(running(one))
        await wait_until(lambda: len(sim.state.call_events) == count, timeout=30)
    elapsed = time.monotonic() - started
    peak = sim.peak_rate(bucket="telephony", api_key=KEY)
    assert peak <= TELEPHONY_LIMIT, f"{peak} requests in one window with {instances} instances"
    assert [r for r in sim.recorded() if r.status == 503] == [], "never told to slow down"
    # ...and the limit is used: a 160-request backlog takes about 4 s, not far more.
    assert elapsed < count / TELEPHONY_LIMIT + 8, elapsed


async def test_a_storm_of_503_backs_off_lowers_the_rate_and_recovers(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    storm = sim.add_fault(path="/api/v5/telephony", status=503)  # no Retry-After
    with capture_logs() as logs:
        async with running(make_settings(poll_interval_s=0.1, retry_max_s=4.0)) as daemon:
            await backlog(pool, 6)
            await asyncio.sleep(8.0)
            during = len(sim.recorded())
            assert daemon.rt.guards.rate_factor(ENTERPRISE) < 1.0, "the rate was lowered"
            sim.remove_fault(storm)
            await wait_until(lambda: len(sim.state.call_events) == 6, timeout=20)
            await wait_until(lambda: daemon.rt.guards.rate_factor(ENTERPRISE) == 1.0)
    # Retried every second, six deliveries sent about 48 requests in 8 s; backing off
    # together (each 503 of the key doubles the wait of all of them), a handful.
    assert during <= 14, during
    attempts = await pool.fetchval("SELECT max(attempts) FROM crm_deliveries")
    assert attempts == 1, "slow-down answers use up no attempt"
    events = [e["event"] for e in logs]
    assert events.count("crm_rate_limited") == 1 and events.count("crm_rate_restored") == 1
