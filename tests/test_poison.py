"""No row can stop delivery: unreadable payloads, deliveries that crash whoever attempts
them, and the attempts cap — each ends as a dead letter, never as a dead process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import asyncpg
import pytest

from daemon import store
from daemon.settings import Settings
from tests.conftest import settings_env
from tests.support.bodies import dial, hangup
from tests.support.daemon import running, start_process
from tests.support.fakecrm import CRASH_EXIT_CODE, CRASH_KEY, FAKE, FakeUpstream, fake_config
from tests.support.seed import add_enterprise, insert_event, insert_raw_event, register
from tests.test_delivery import FAST, settled, statuses

DEEP = 3_000  # json.loads raises RecursionError past ~1,000 levels
LONG_NUMBER = "9" * 5_000  # int() refuses more than 4,300 digits: ValueError

# One instance, the only one: it takes every enterprise at once.
OWNER = {"instance": "i", "ownership_s": 15.0, "takeover_s": 0.0}


def _body(n: int, token: str = "tok0001", **raw: str) -> str:
    """A dial's body as JSON text, with extra fields given as raw JSON."""
    text = json.dumps(dial(n, token=token))[:-1]
    return text + "".join(f', "{key}": {value}' for key, value in raw.items()) + "}"


async def _delivery(pool: asyncpg.Pool, unique_id: str) -> asyncpg.Record:
    """The delivery of that call's dial."""
    row: asyncpg.Record = await pool.fetchrow(
        "SELECT d.status, d.attempts, d.lease_expiries, d.last_error FROM crm_deliveries d "
        "JOIN crm_events e ON e.id = d.event_id "
        "WHERE d.unique_id = $1 AND e.event_type = 'dial'", unique_id)
    return row


async def test_unreadable_rows_are_dead_lettered_and_their_batch_goes_on(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await add_enterprise(pool, "0001", token="tok0001",
                         config=fake_config(settings, upstream.url, "key-0001"))
    await register(pool, "fakecrm")
    # All stored before the daemon starts: one claim takes them together.
    await insert_raw_event(database_url, "dial", _body(1))
    await insert_raw_event(database_url, "dial", _body(2, deep="[" * DEEP + "]" * DEEP))
    await insert_raw_event(database_url, "dial", _body(3, big=LONG_NUMBER))
    # Call 4's bridge cannot be read either: its dial, which loads the call, still goes.
    await insert_raw_event(database_url, "bridge", _body(4, deep="[" * DEEP + "]" * DEEP))
    await insert_raw_event(database_url, "dial", _body(4))
    async with running(settings) as daemon:
        await settled(pool, 4)
        assert daemon.rt.supervisor.failed is None
        bugs = daemon.rt.metrics.bug_errors._value.get()
    assert sorted(r.unique_id for r in upstream.delivered()) == ["1757772742.1", "1757772742.4"]
    deep, big = await _delivery(pool, "1757772742.2"), await _delivery(pool, "1757772742.3")
    assert (deep["status"], deep["attempts"]) == ("failed", 1)
    assert deep["last_error"] == "malformed: payload: nested too deeply to read"
    assert (big["status"], big["attempts"]) == ("failed", 1)
    assert big["last_error"] == "malformed: payload: holds a number too long to read"
    logs = await pool.fetch("SELECT status, error_message, request_data FROM integration_logs "
                            "WHERE status = 'error' ORDER BY id")
    assert sorted(r["request_data"]["unique_id"] for r in logs) == [
        "1757772742.2", "1757772742.3"], "each dead letter has its log row"
    assert bugs == 0, "bad input is malformed, never a bug"


async def test_a_lease_that_keeps_expiring_dead_letters_the_delivery_as_poison(
    pool: asyncpg.Pool,
) -> None:
    await register(pool, "fakecrm")
    await add_enterprise(pool, "0001", token="tok0001", config={"fakecrm": {"enabled": True}})
    await insert_event(pool, "dial", dial(1, token="tok0001"))
    await insert_event(pool, "hangup", hangup(1, token="tok0001"))

    async def claim(lease: str) -> list[asyncpg.Record]:
        rows = await store.claim(pool, "fakecrm", 10, [], 0.05, lease, max_lease_expiries=3,
                                 max_attempts=12, **OWNER)
        await asyncio.sleep(0.1)  # ... and the holder dies: the lease expires unsettled
        return rows

    first = await claim("crashed:1")
    assert [(r["event_type"], r["reclaimed"], r["dead"]) for r in first] == [
        ("dial", False, None)], "the hangup waits behind its dial"
    for n in (1, 2):
        (again,) = await claim(f"crashed:{n + 1}")
        assert (again["reclaimed"], again["dead"], again["attempts"]) == (True, None, n + 1)
    (dead,) = await claim("third")
    assert (dead["dead"], dead["payload"], dead["lease_s"]) == ("poison", None, None)
    row = await _delivery(pool, "1757772742.1")
    assert row["status"] == "failed" and row["attempts"] == 3 and row["lease_expiries"] == 3
    assert row["last_error"].startswith("poison: its lease expired 3 times without an outcome")
    (log,) = await pool.fetch("SELECT * FROM integration_logs")
    assert (log["status"], log["event_type"], log["error_message"]) == (
        "error", "dial", row["last_error"])
    assert log["request_data"]["unique_id"] == "1757772742.1"
    # The call's hangup is no longer blocked; a replay starts the count afresh.
    (hang,) = await store.claim(pool, "fakecrm", 10, [], 30.0, "next", max_lease_expiries=3,
                                max_attempts=12, **OWNER)
    assert (hang["event_type"], hang["dead"]) == ("hangup", None)
    await store.replay(pool, "fakecrm", call="1757772742.1")
    assert (await _delivery(pool, "1757772742.1"))["lease_expiries"] == 0


async def test_the_attempts_cap_holds_for_reclaimed_deliveries(pool: asyncpg.Pool) -> None:
    await register(pool, "fakecrm")
    await add_enterprise(pool, "0001", token="tok0001", config={"fakecrm": {"enabled": True}})
    await insert_event(pool, "dial", dial(1, token="tok0001"))
    for _ in range(2):
        (row,) = await store.claim(pool, "fakecrm", 10, [], 0.05, "x", max_lease_expiries=99,
                                   max_attempts=2, **OWNER)
        assert row["dead"] is None
        await asyncio.sleep(0.1)
    (row,) = await store.claim(pool, "fakecrm", 10, [], 0.05, "x", max_lease_expiries=99,
                               max_attempts=2, **OWNER)
    assert row["dead"] == "attempts"
    stored = await _delivery(pool, "1757772742.1")
    assert (stored["status"], stored["attempts"]) == ("failed", 2), "attempts never pass the cap"
    assert stored["last_error"] == "attempts: gave up after 2 attempts, the last one without " \
                                   "an outcome"


async def test_a_delivery_whose_lease_expired_twice_is_claimed_alone(
    pool: asyncpg.Pool,
) -> None:
    await register(pool, "fakecrm")
    await add_enterprise(pool, "0001", token="tok0001", config={"fakecrm": {"enabled": True}})
    for n in range(3):
        await insert_event(pool, "dial", dial(n, token="tok0001"))

    async def claim(lease_s: float) -> list[asyncpg.Record]:
        return await store.claim(pool, "fakecrm", 10, [], lease_s, "x", max_lease_expiries=3,
                                 max_attempts=12, **OWNER)

    assert len(await claim(0.05)) == 3
    await asyncio.sleep(0.1)
    # All three were in flight when their holder died (a kill -9 mid-batch): claimed
    # together again, as usual ...
    again = await claim(0.05)
    assert [(r["reclaimed"], r["suspect"]) for r in again] == [(True, False)] * 3
    await asyncio.sleep(0.1)
    # ... but a second death with them in flight makes each a suspect: one at a time.
    for _ in range(3):
        (suspect,) = await claim(30.0)
        assert suspect["suspect"], "each suspect comes alone"
    assert await claim(30.0) == []


async def _run_until_settled_or_dead(env: dict[str, str], pool: asyncpg.Pool) -> int:
    """One daemon process, until nothing is pending (then SIGTERM) or it dies: its code."""
    daemon = await start_process(env, wait_listening=False)
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while daemon.proc.returncode is None and asyncio.get_running_loop().time() < deadline:
            if (await statuses(pool)).get("pending", 0) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        code = await daemon.stop()
    return code


@pytest.mark.slow
async def test_a_row_that_kills_the_process_stops_doing_so(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    # What systemd does with Restart=on-failure, with a row whose attempt kills the process.
    settings = make_settings(integration=FAKE)
    await add_enterprise(pool, "0001", token="tok0001",
                         config=fake_config(settings, upstream.url, "key-0001", crash=True))
    await register(pool, "fakecrm")
    await insert_event(pool, "dial", dial(1, token="tok0001", **{CRASH_KEY: True}))
    await insert_event(pool, "hangup", hangup(1, token="tok0001"))
    for n in range(2, 6):
        await insert_event(pool, "dial", dial(n, token="tok0001"))
    env = settings_env(database_url, CRM_BRIDGE_INTEGRATION=FAKE, CRM_BRIDGE_LEASE_S="2",
                       CRM_BRIDGE_ATTEMPT_TIMEOUT_S="0.5", CRM_BRIDGE_POLL_INTERVAL_S="0.1",
                       CRM_BRIDGE_MAX_LEASE_EXPIRIES="3")
    codes = [await _run_until_settled_or_dead(env, pool) for _ in range(3)]
    assert codes == [CRASH_EXIT_CODE] * 3, "the first attempt, then one per expired lease"
    # The fourth process finds the lease expired a third time: poison, and it lives.
    assert await _run_until_settled_or_dead(env, pool) == 0
    row = await _delivery(pool, "1757772742.1")
    assert row["status"] == "failed" and row["last_error"].startswith("poison:")
    assert await statuses(pool) == {"done": 5, "failed": 1}, "nothing else was poisoned"
    delivered = {(r.unique_id, r.event_type) for r in upstream.delivered()}
    assert delivered == {("1757772742.1", "hangup")} | {
        (f"1757772742.{n}", "dial") for n in range(2, 6)}
