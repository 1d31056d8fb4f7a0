"""Enterprise ownership: one live instance at a time sends for an enterprise, enterprises
spread over the instances alive, a joining instance gets its share handed over, a dead one's
enterprises are served again within the lease, and a lease that may have lapsed stops the
sending at once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import asyncpg
import pytest

from daemon.metrics import Metrics
from daemon.ownership import LAPSE_MARGIN_S, Ownership
from daemon.settings import Settings
from tests.conftest import settings_env
from tests.support.bodies import dial
from tests.support.daemon import running, start_process
from tests.support.fakecrm import FAKE, FakeUpstream
from tests.test_delivery import enterprises, settled, statuses

FAST = {"poll_interval_s": 0.1, "attempt_timeout_s": 2.0, "ownership_s": 6.0, "lease_s": 6.0}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _insert(pool: asyncpg.Pool, numbers: list[str], per_enterprise: int,
                  start: int = 0) -> None:
    rows = [("dial", dial(f"{number}{n:05d}", token=f"tok{number}"))
            for n in range(start, start + per_enterprise) for number in numbers]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO crm_events (event_type, payload) VALUES ($1, $2)", rows)


async def _owners(pool: asyncpg.Pool) -> dict[str, str]:
    rows = await pool.fetch("SELECT enterprise_number, owner FROM crm_owners "
                            "WHERE until > now() AND owner <> ''")
    return {r["enterprise_number"]: r["owner"] for r in rows}


def test_a_lease_that_may_have_lapsed_stops_the_sending() -> None:
    clock = Clock()
    ownership = Ownership(None, "fakecrm", "i1", Metrics("t"),  # type: ignore[arg-type]
                          ownership_s=15.0, clock=clock)
    assert ownership.remaining("0001") == 0 and not ownership.may_send("0001", 0.0)
    ownership.took("0001", 15.0, since=clock.now - 0.2)  # the claim was sent 0.2 s ago
    assert ownership.remaining("0001") == pytest.approx(14.8)
    assert ownership.may_send("0001", 3.0)
    clock.now += 14.8 - 3.0 - LAPSE_MARGIN_S + 0.01  # no renewal came (the database is down)
    assert not ownership.may_send("0001", 3.0), "an attempt could outlive the lease: not begun"
    assert ownership.may_send("0001", 0.0)
    clock.now += 3.0 + LAPSE_MARGIN_S
    assert ownership.remaining("0001") == 0


async def test_enterprises_spread_and_the_rate_per_key_holds_across_three_instances(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    base = make_settings(integration=FAKE, rate_limits=(("default", 10.0),),
                         enterprise_concurrency=8, **FAST)
    numbers = await enterprises(pool, base, upstream, 6)
    instances = [make_settings(integration=FAKE, rate_limits=(("default", 10.0),),
                               enterprise_concurrency=8, instance_id=f"i{k}", **FAST)
                 for k in range(3)]
    async with running(instances[0]), running(instances[1]), running(instances[2]):
        await _insert(pool, numbers, 25)
        await settled(pool, 150, timeout=40)
        owners = await _owners(pool)
    assert await statuses(pool) == {"done": 150}
    # Without ownership each instance keeps its own window: up to 3 x 10 per second.
    for number in numbers:
        assert upstream.per_second(f"key-{number}") <= 10, number
    assert len(set(owners.values())) >= 2, f"spread over the instances: {owners}"
    assert sorted(Counter(r.event_id for r in upstream.delivered()).values()) == [1] * 150


async def test_a_joining_instance_gets_its_share_handed_over_within_the_limit(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = [make_settings(integration=FAKE, rate_limits=(("default", 10.0),),
                              enterprise_concurrency=8, instance_id=f"j{k}", **FAST)
                for k in range(2)]
    numbers = await enterprises(pool, settings[0], upstream, 8)
    async with running(settings[0]):
        await _insert(pool, numbers, 5)
        await settled(pool, 40, timeout=20)
        assert set((await _owners(pool)).values()) == {"j0"}
        async with running(settings[1]):
            # A steady stream while the second instance joins and gets its share.
            for round_ in range(1, 9):
                await _insert(pool, numbers, 3, start=round_ * 10)
                await asyncio.sleep(0.5)
            await settled(pool, 40 + 8 * 3 * 8, timeout=30)
            owners = await _owners(pool)
    assert set(owners.values()) == {"j0", "j1"}, owners
    for number in numbers:
        assert upstream.per_second(f"key-{number}") <= 10, number
    assert sorted(Counter(r.event_id for r in upstream.delivered()).values()) == [1] * 232


@pytest.mark.slow
async def test_a_dead_instance_s_enterprises_are_served_again_within_the_lease(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    numbers = await enterprises(pool, make_settings(integration=FAKE), upstream, 4)
    env = settings_env(database_url, CRM_BRIDGE_INTEGRATION=FAKE, CRM_BRIDGE_INSTANCE_ID="dead",
                       CRM_BRIDGE_POLL_INTERVAL_S="0.1", CRM_BRIDGE_ATTEMPT_TIMEOUT_S="2",
                       CRM_BRIDGE_OWNERSHIP_S="6", CRM_BRIDGE_LEASE_S="6")
    first = await start_process(env)
    try:
        await _insert(pool, numbers, 2)
        await settled(pool, 8, timeout=20)
        assert set((await _owners(pool)).values()) == {"dead"}
    finally:
        await first.kill()
    killed_at = time.monotonic()
    async with running(make_settings(integration=FAKE, instance_id="heir", **FAST)):
        await _insert(pool, numbers, 2, start=100)
        await settled(pool, 16, timeout=20)
        served_after_s = time.monotonic() - killed_at
        assert set((await _owners(pool)).values()) == {"heir"}
    # The lease is 6 s; the heir takes a free enterprise at once (it is the only live
    # instance once the dead one's heartbeat has run out too).
    assert served_after_s < 6.0 + 2.0, served_after_s
