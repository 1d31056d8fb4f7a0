"""The fan-out triggers on crm_events and the config trigger on enterprises."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tests.support.seed import add_enterprise, insert_event, notifications, register

DIAL = {"Token": "375291234567", "UniqueId": "1757772742.60", "CallType": 0,
        "Phone": "+375291112233", "Extensions": ["150", "151"], "Trunk": "0001363",
        "ExtPhone": "+375291112233"}


@pytest.fixture
async def enabled(pool: asyncpg.Pool) -> None:
    await register(pool, "retailcrm")
    await add_enterprise(pool, "0367", token="375291234567",
                         config={"retailcrm": {"enabled": True}, "amocrm": {"enabled": True}})
    await add_enterprise(pool, "0400", token="375290000000",
                         config={"retailcrm": {"enabled": False}})


async def test_enabled_event_yields_one_delivery_and_a_notify(
    pool: asyncpg.Pool, database_url: str, enabled: None
) -> None:
    async with notifications(database_url, "crm_events") as rings:
        assert await insert_event(pool, "dial", DIAL) == "INSERT 0 1"
        channel, payload = await asyncio.wait_for(rings.get(), 5)
    assert (channel, payload) == ("crm_events", "")
    event = await pool.fetchrow("SELECT * FROM crm_events")
    assert event["enterprise_number"] == "0367"
    assert event["unique_id"] == "1757772742.60"
    assert event["payload"] == DIAL, "the body is stored exactly as received"
    rows = await pool.fetch("SELECT * FROM crm_deliveries")
    # amocrm is enabled too, but no crm-bridge process serves it: no delivery piles up.
    assert [(r["event_id"], r["integration_type"], r["status"]) for r in rows] == [
        (event["id"], "retailcrm", "pending")
    ]


async def test_a_retried_insert_is_a_no_op(pool: asyncpg.Pool, enabled: None) -> None:
    assert await insert_event(pool, "dial", DIAL) == "INSERT 0 1"
    assert await insert_event(pool, "dial", DIAL) == "INSERT 0 0"
    hangup = {"Token": DIAL["Token"], "UniqueId": DIAL["UniqueId"], "CallStatus": "2"}
    assert await insert_event(pool, "hangup", hangup) == "INSERT 0 1"
    assert await insert_event(pool, "hangup", {**hangup, "CallStatus": "0"}) == "INSERT 0 0"
    # A second, different dial of the same call (a transfer) is a new event.
    assert await insert_event(pool, "dial", {**DIAL, "Extensions": ["152"]}) == "INSERT 0 1"
    assert await pool.fetchval("SELECT count(*) FROM crm_events") == 3
    assert await pool.fetchval("SELECT count(*) FROM crm_deliveries") == 3


@pytest.mark.parametrize(
    ("token", "why"),
    [("375290000000", "nothing enabled"), ("unknown-token", "unknown Token")],
)
async def test_nothing_enabled_or_unknown_token_stores_nothing(
    pool: asyncpg.Pool, database_url: str, enabled: None, token: str, why: str
) -> None:
    async with notifications(database_url, "crm_events") as rings:
        assert await insert_event(pool, "dial", {**DIAL, "Token": token}) == "INSERT 0 0", why
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rings.get(), 0.3)
    assert await pool.fetchval("SELECT count(*) FROM crm_events") == 0
    assert await pool.fetchval("SELECT count(*) FROM crm_deliveries") == 0


async def test_inactive_enterprise_and_unserved_types_store_nothing(
    pool: asyncpg.Pool, enabled: None
) -> None:
    await pool.execute("UPDATE enterprises SET active = false WHERE number = '0367'")
    assert await insert_event(pool, "dial", DIAL) == "INSERT 0 0"
    await pool.execute("UPDATE enterprises SET active = true WHERE number = '0367'")
    assert await insert_event(pool, "bridge_create", DIAL) == "INSERT 0 0"
    # bridge is stored (the hangup needs it) but retailcrm does not act on it: no delivery.
    assert await insert_event(pool, "bridge", DIAL) == "INSERT 0 1"
    assert await pool.fetchval("SELECT count(*) FROM crm_deliveries") == 0


async def test_a_body_without_uniqueid_is_an_error_naming_it(
    pool: asyncpg.Pool, enabled: None
) -> None:
    body = {k: v for k, v in DIAL.items() if k != "UniqueId"}
    with pytest.raises(asyncpg.NotNullViolationError, match="UniqueId"):
        await insert_event(pool, "dial", body)


async def test_config_update_notifies_with_the_changed_keys(
    pool: asyncpg.Pool, database_url: str, enabled: None
) -> None:
    async with notifications(database_url, "crm_config") as changes:
        await pool.execute(
            """UPDATE enterprises SET integrations_config =
                   jsonb_set(integrations_config, '{retailcrm,domain}', '"https://x.retailcrm.ru"')
               WHERE number = '0367'"""
        )
        channel, payload = await asyncio.wait_for(changes.get(), 5)
        assert channel == "crm_config"
        assert json.loads(payload) == {"enterprise": "0367", "keys": ["retailcrm"], "fields": []}
        await pool.execute("UPDATE enterprises SET name = 'Renamed' WHERE number = '0367'")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(changes.get(), 0.3)
        await pool.execute("UPDATE enterprises SET name2 = 'new-token' WHERE number = '0400'")
        _channel, payload = await asyncio.wait_for(changes.get(), 5)
        assert json.loads(payload) == {"enterprise": "0400", "keys": [], "fields": ["name2"]}


async def test_doorbell_is_coalesced(pool: asyncpg.Pool, database_url: str, enabled: None) -> None:
    # A window far longer than the inserts take, so the count does not depend on speed.
    await pool.execute("UPDATE crm_doorbell SET window_ms = 1000")
    async with notifications(database_url, "crm_events") as rings:
        for n in range(20):
            await insert_event(pool, "dial", {**DIAL, "UniqueId": f"9.{n}"})
        await asyncio.sleep(0.2)
        assert rings.qsize() == 1, "20 inserts inside one window ring the doorbell once"


async def test_doorbell_rings_again_after_its_window(
    pool: asyncpg.Pool, database_url: str, enabled: None
) -> None:
    assert await pool.fetchval("SELECT window_ms FROM crm_doorbell") == 5, "the default"
    async with notifications(database_url, "crm_events") as rings:
        for n in range(5):
            await insert_event(pool, "dial", {**DIAL, "UniqueId": f"9.{n}"})
            await asyncio.sleep(0.02)  # four windows apart
        await asyncio.sleep(0.1)
        assert rings.qsize() == 5, "an insert after the window has passed rings"
