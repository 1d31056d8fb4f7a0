"""Calls whose events disagree, the whole way through the daemon: inserted as a call service
inserts them, delivered by the dispatcher to the RetailCRM simulator (docs/events.md, "When
the events of a call disagree")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import seed
from tests.support.bodies import (
    SPLIT_BRIDGE_151,
    SPLIT_BRIDGE_TRUNK,
    SPLIT_DIAL,
    SPLIT_HANGUP,
    SPLIT_START,
    SPLIT_UID,
)
from tests.support.daemon import running
from tests.support.seed import insert_event
from tests.support.waiting import wait_until

LINE = "+375172000000"
CUSTOMER = "+375291112233"
TOKEN = "tok0367"  # the seeded enterprise's Token (enterprises.name2)
MANAGERS = {"1": "150", "2": "151", "3": "152"}


async def deliveries(pool: asyncpg.Pool) -> list[tuple[str, str, str | None]]:
    rows = await pool.fetch(
        "SELECT e.event_type, d.status, d.last_error FROM crm_deliveries d "
        "JOIN crm_events e ON e.id = d.event_id ORDER BY d.event_id")
    return [(r["event_type"], r["status"], r["last_error"]) for r in rows]


async def test_an_incoming_call_whose_hangup_says_internal_and_unanswered(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, numbers=("150", "151", "152"), user_extensions=MANAGERS,
               external_phones={"0001363": LINE})
    async with running(make_settings(poll_interval_s=0.2)):
        for kind, body in [("start", SPLIT_START), ("dial", SPLIT_DIAL),
                           ("bridge", SPLIT_BRIDGE_TRUNK), ("bridge", SPLIT_BRIDGE_151),
                           ("hangup", SPLIT_HANGUP)]:
            await insert_event(pool, kind, {**body, "Token": TOKEN})
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1)
    ringing = {"codes": ["150", "151", "152"], "userIds": [1, 2, 3],
               "callExternalId": SPLIT_UID, "externalPhone": LINE}
    assert sim.state.call_events == [
        {"phone": CUSTOMER, "type": "in", **ringing},
        {"phone": CUSTOMER, "type": "hangup", "hangupStatus": "answered", **ringing},
    ]
    assert list(sim.state.uploaded_calls.values()) == [{
        "date": "2025-09-14 12:12:07", "type": "in", "phone": CUSTOMER, "result": "answered",
        "duration": 40, "durationWaiting": 12, "code": "151", "userId": 2,
        "externalId": SPLIT_UID, "externalPhone": LINE,
    }]
    await wait_until_settled(pool, 2)
    assert [(kind, status) for kind, status, _e in await deliveries(pool)] == [
        ("dial", "done"), ("hangup", "done")]


async def test_a_hangup_nothing_gives_a_direction_is_skipped_not_a_dead_letter(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, numbers=("150", "151", "152"), user_extensions=MANAGERS)
    synthetic_leg = {k: v for k, v in SPLIT_HANGUP.items() if k != "CallType"}
    async with running(make_settings(poll_interval_s=0.2)):
        await insert_event(pool, "hangup", {**synthetic_leg, "Token": TOKEN})
        await wait_until_settled(pool, 1)
    assert await deliveries(pool) == [("hangup", "skipped", "no_direction")]
    assert sim.recorded() == []
    assert await pool.fetchval("SELECT count(*) FROM integration_logs") == 0


async def wait_until_settled(pool: asyncpg.Pool, count: int, timeout_s: float = 10.0) -> None:
    """Wait until ``count`` deliveries are no longer pending."""
    deadline = time.monotonic() + timeout_s
    while sum(status != "pending" for _k, status, _e in await deliveries(pool)) != count:
        assert time.monotonic() < deadline, await deliveries(pool)
        await asyncio.sleep(0.02)
