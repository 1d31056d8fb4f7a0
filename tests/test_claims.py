"""A claim brings each delivery's call with it: no round trip more per delivery, payloads
decoded one by one and only when the adapter asks, read again when an attempt starts late."""

from __future__ import annotations

import json
import time

import asyncpg
from structlog.testing import capture_logs

from daemon import claims, store
from daemon.claims import Claimed
from tests.support.bodies import dial, hangup
from tests.support.seed import add_enterprise, insert_event, insert_raw_event, register

INTEGRATION = "fakecrm"
OWNER = {"instance": "i", "ownership_s": 15.0, "takeover_s": 0.0}
DEEP = 3_000  # json.loads raises RecursionError past ~1,000 levels


async def _claim(pool: asyncpg.Pool, lease: str) -> list[Claimed]:
    started = time.monotonic()
    rows = await store.claim(pool, INTEGRATION, 10, [], 30.0, lease, max_lease_expiries=3,
                             max_attempts=12, **OWNER)
    return [claims.claimed(row, lease, started) for row in rows]


async def _settle(pool: asyncpg.Pool, item: Claimed) -> None:
    await pool.execute("UPDATE crm_deliveries SET status = 'done' WHERE event_id = $1",
                       item.event.id)


async def test_a_claim_returns_each_delivery_with_its_call(
    pool: asyncpg.Pool, database_url: str,
) -> None:
    await register(pool, INTEGRATION)
    await add_enterprise(pool, "0367", config={INTEGRATION: {"enabled": True}})
    await insert_event(pool, "dial", dial(1))
    bridge = json.dumps({**dial(1), "Channel": "SIP/150-00000001", "Deep": "x"})
    deep = "[" * DEEP + "]" * DEEP
    await insert_raw_event(database_url, "bridge", bridge.replace('"x"', deep))
    await insert_event(pool, "hangup", hangup(1), record_url="https://rec.example/1.mp3")
    await insert_event(pool, "dial", dial(2))

    first = await _claim(pool, "i:1")
    assert [(c.event.event_type, c.event.unique_id) for c in first] == [
        ("dial", "1757772742.1"), ("dial", "1757772742.2")], "the hangup waits for its dial"
    alone = claims.call_of(first[1])
    assert alone is not None and [e.id for e in alone] == [first[1].event.id]
    assert alone[0] is first[1].event, "the delivered event is decoded once"

    await _settle(pool, first[0])
    (hang,) = await _claim(pool, "i:2")
    with capture_logs() as logs:
        call = claims.call_of(hang)
    assert call is not None, "read with the claim: no query of its own"
    assert [(e.event_type, e.unique_id) for e in call] == [
        ("dial", "1757772742.1"), ("hangup", "1757772742.1")], "the unreadable bridge left out"
    assert call[0].payload == dial(1) and call[1] is hang.event
    assert hang.event.record_url == "https://rec.example/1.mp3"
    assert [(line["event"], line["reason"]) for line in logs] == [
        ("call_event_unreadable", "nested too deeply to read")]
    assert call == await claims.load_call(pool, hang), "the same call as a query reads it"


async def test_an_attempt_long_after_its_claim_reads_the_call_again(
    pool: asyncpg.Pool,
) -> None:
    await register(pool, INTEGRATION)
    await add_enterprise(pool, "0367", config={INTEGRATION: {"enabled": True}})
    await insert_event(pool, "hangup", hangup(1))
    (item,) = await _claim(pool, "i:1")
    await insert_event(pool, "dial", dial(1))  # stored after the claim
    fresh = claims.call_of(item)
    assert fresh is not None and [e.event_type for e in fresh] == ["hangup"]

    item.claimed_at -= claims.CALL_FRESH_S + 0.1  # as if it had waited for a slot
    assert claims.call_of(item) is None
    again = await claims.load_call(pool, item)
    assert [e.event_type for e in again] == ["hangup", "dial"], "the late dial counts"
