"""Managers ↔ internal numbers: the uniqueness rule, refusals that change nothing, sync
pending on a RetailCRM failure and its reconciliation, and writes that leave every other
integration's configuration exactly as it was — also under concurrent writers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import asyncpg
import pytest

from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations.retailcrm import RetailCrmAdapter, extensions
from daemon.integrations.retailcrm import config as cfg
from daemon.integrations.retailcrm.extensions import InternalNumber, Mismatch, Move
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import ENTERPRISE, amocrm_text, seed, stored
from tests.support.daemon import running
from tests.support.seed import add_enterprise

CODE = "vochi-telephony"


def codes(sim: Simulator) -> list[dict[str, str]]:
    telephony = sim.state.modules[CODE]["integrations"]["telephony"]
    return cast(list[dict[str, str]], telephony["additionalCodes"])


async def test_assigning_a_taken_number_moves_it(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    amocrm = await amocrm_text(pool)
    result = await adapter.save_extensions(ENTERPRISE, {"3": "101"})
    assert result.synced and not result.sync_pending
    assert dict(result.user_extensions) == {"2": "102", "3": "101"}
    assert result.moves == (Move("101", "1", "3"),)
    assert "moved from manager 1 to manager 3" in result.message
    assert (await stored(pool))["user_extensions"] == {"2": "102", "3": "101"}
    assert codes(sim) == [{"userId": "2", "code": "102"}, {"userId": "3", "code": "101"}]

    # A manager moving to another number frees the old one; None removes a number.
    result = await adapter.save_extensions(ENTERPRISE, {"2": "103", "3": None})
    assert dict(result.user_extensions) == {"2": "103"} and result.moves == ()
    assert codes(sim) == [{"userId": "2", "code": "103"}]
    raw = await stored(pool)
    assert raw["sync_pending"] is False and raw["last_sync"]
    assert await amocrm_text(pool) == amocrm


@pytest.mark.parametrize(
    ("assignments", "field", "says"),
    [
        ({"1": "999"}, "user_extensions.1", "not an internal number"),  # another enterprise's
        ({"1": "555"}, "user_extensions.1", "not an internal number"),  # nobody's
        ({"1": "101", "4": "101"}, "user_extensions.4", "two managers"),
        ({"abc": "103"}, "user_extensions.abc", "user id"),
    ],
)
async def test_a_bad_assignment_is_refused_and_changes_nothing(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    assignments: dict[str, str], field: str, says: str,
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    await seed(pool, crypto, sim.url, enterprise="0999", numbers=("999",))
    before = await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                                 "WHERE number = $1", ENTERPRISE)
    with pytest.raises(ConfigError) as info:
        await adapter.save_extensions(ENTERPRISE, {"2": "103", **assignments})
    assert info.value.field == field and says in info.value.message
    after = await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                                "WHERE number = $1", ENTERPRISE)
    assert after == before
    assert sim.recorded() == []  # RetailCRM was not asked either


async def test_a_failed_sync_is_pending_then_reconciled(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    assert (await adapter.register(ENTERPRISE)).ok
    amocrm = await amocrm_text(pool)
    sim.add_fault(path="/api/v5/integration-modules", status=500)
    result = await adapter.save_extensions(ENTERPRISE, {"2": "102"})
    assert not result.synced and result.sync_pending
    assert "pending" in result.message and "HTTP 500" in result.message
    raw = await stored(pool)
    assert raw["user_extensions"] == {"1": "101", "2": "102"}  # the local save stands
    assert raw["sync_pending"] is True
    assert codes(sim) == [{"userId": "1", "code": "101"}]

    assert await adapter.reconcile() == 0  # RetailCRM still failing: still pending
    assert (await stored(pool))["sync_pending"] is True
    sim.clear_faults()
    assert await adapter.reconcile() == 1
    raw = await stored(pool)
    assert raw["sync_pending"] is False and raw["last_sync"]
    assert codes(sim) == [{"userId": "1", "code": "101"}, {"userId": "2", "code": "102"}]
    assert await adapter.reconcile() == 0  # nothing due any more
    assert await amocrm_text(pool) == amocrm


async def test_the_next_save_also_retries_a_pending_sync(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, sync_pending=True, user_extensions={"1": "101"})
    result = await adapter.save_extensions(ENTERPRISE, {"2": "102"})
    assert result.synced
    assert codes(sim) == [{"userId": "1", "code": "101"}, {"userId": "2", "code": "102"}]
    assert (await stored(pool))["sync_pending"] is False


async def test_the_reconciler_runs_supervised_in_the_daemon(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"}, sync_pending=True,
               last_sync="2025-01-01T00:00:00+00:00")
    await seed(pool, crypto, sim.url, enterprise="0400", enabled=False, sync_pending=True)
    async with running(make_settings()) as daemon:
        assert "retailcrm-extensions-sync" in daemon.rt.supervisor.names
        adapter = daemon.rt.adapter
        assert isinstance(adapter, RetailCrmAdapter)
        assert await adapter.reconcile() == 1  # 0400 is off: left alone
    assert codes(sim) == [{"userId": "1", "code": "101"}]
    assert (await stored(pool))["sync_pending"] is False
    assert (await stored(pool, "0400"))["sync_pending"] is True


async def test_a_deactivated_module_is_not_reactivated_by_a_sync(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url)
    await pool.execute("INSERT INTO crm_holds (enterprise_number, integration_type, reason) "
                       "VALUES ($1, 'retailcrm', 'deactivated')", ENTERPRISE)
    result = await adapter.save_extensions(ENTERPRISE, {"1": "101"})
    assert result.sync_pending and "deactivated" in result.message
    assert sim.recorded() == []
    assert await adapter.reconcile() == 0 and sim.recorded() == []


async def test_a_disconnected_integration_saves_without_syncing(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, enabled=False)
    result = await adapter.save_extensions(ENTERPRISE, {"1": "101"})
    assert not result.synced and not result.sync_pending and "not connected" in result.message
    assert (await stored(pool))["user_extensions"] == {"1": "101"}
    assert sim.recorded() == []


async def test_managers_and_numbers_for_the_picker(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    await pool.execute("INSERT INTO user_internal_phones (enterprise_number, phone_number) "
                       "VALUES ($1, '150')", ENTERPRISE)
    sim.users[3]["status"] = "dinner"  # busy managers are listed too
    config = adapter.parse_config(await stored(pool))
    client = adapter.client(config)
    view = await extensions.managers(client, config, CODE)
    assert not view.module_registered and view.mismatches == ()

    assert (await adapter.register(ENTERPRISE)).ok
    # RetailCRM's module says otherwise for two managers (edited there, or an older save).
    module = sim.state.modules[CODE]
    module["integrations"]["telephony"]["additionalCodes"] = [
        {"userId": 1, "code": "101"}, {"userId": "2", "code": "150"}, {"userId": 4, "code": "103"}]
    view = await extensions.managers(client, config, CODE)
    assert view.module_registered
    by_id = {m.id: m for m in view.managers}
    assert sorted(by_id) == ["1", "2", "3", "4", "5"]  # active ones only, any status
    assert by_id["3"].status == "dinner" and by_id["3"].extension is None
    assert by_id["2"].extension == "102"  # local wins
    assert by_id["4"].extension == "103"  # only RetailCRM knows it: shown
    assert by_id["1"].name and "@" in by_id["1"].email
    assert view.mismatches == (Mismatch("2", "102", "150"), Mismatch("4", None, "103"))
    users = await adapter.list_users(ENTERPRISE, config)
    assert [u.id for u in users] == ["1", "2", "3", "4", "5"]

    numbers = await extensions.internal_numbers(pool, ENTERPRISE, config.user_extensions)
    assert numbers == [
        InternalNumber("101", "Owner 101", "1"), InternalNumber("102", "Owner 102", "2"),
        InternalNumber("103", "Owner 103", None), InternalNumber("150", None, None)]
    assert [n.taken for n in numbers] == [True, True, False, False]


# ---------------------------------------------------------------------- concurrency


async def _update_amocrm(conn: asyncpg.Connection, value: str) -> None:
    """Another integration's service writing its own key, the way docs/architecture.md asks."""
    await conn.execute(
        "UPDATE enterprises SET integrations_config = jsonb_set(integrations_config, "
        "'{amocrm,token}', to_jsonb($2::text)) WHERE number = $1", ENTERPRISE, value)


async def test_racing_writers_of_different_keys_both_survive(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, enabled=False)
    # Deterministic race: the other writer holds its row update uncommitted while ours runs.
    async with pool.acquire() as other:
        transaction = other.transaction()
        await transaction.start()
        await _update_amocrm(other, "rotated-1")
        ours = asyncio.create_task(cfg.write_keys(pool, ENTERPRISE, {"site_code": "main"}))
        saving = asyncio.create_task(adapter.save_extensions(ENTERPRISE, {"1": "101"}))
        await asyncio.sleep(0.2)
        assert not ours.done() and not saving.done()  # both wait for the row
        await transaction.commit()
        await asyncio.wait_for(asyncio.gather(ours, saving), 10)
    row = await pool.fetchval("SELECT integrations_config FROM enterprises WHERE number = $1",
                              ENTERPRISE)
    assert row["amocrm"]["token"] == "rotated-1"
    assert row["retailcrm"]["site_code"] == "main"
    assert row["retailcrm"]["user_extensions"] == {"1": "101"}

    # And free-running: many rounds of both at once, every write of both kept.
    async def amocrm_writer(i: int) -> None:
        async with pool.acquire() as conn:
            await _update_amocrm(conn, f"rotated-{i}")

    for i in range(2, 12):
        await asyncio.gather(
            amocrm_writer(i),
            cfg.write_keys(pool, ENTERPRISE, {"region": "BY", "time_zone": "Europe/Minsk",
                                              f"round_{i}": i}),
            extensions.save(pool, ENTERPRISE, {str(i % 3 + 1): "10" + str(i % 3 + 1)}),
        )
        row = await pool.fetchval(
            "SELECT integrations_config FROM enterprises WHERE number = $1", ENTERPRISE)
        assert row["amocrm"]["token"] == f"rotated-{i}"
        assert row["retailcrm"][f"round_{i}"] == i
        assert row["retailcrm"]["user_extensions"][str(i % 3 + 1)] == "10" + str(i % 3 + 1)


async def test_concurrent_saves_serialise(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, enabled=False)
    await add_enterprise(pool, "0500", config={})
    await asyncio.gather(*(extensions.save(pool, ENTERPRISE, {str(uid): number})
                           for uid, number in ((1, "101"), (2, "102"), (3, "103"))))
    assert (await stored(pool))["user_extensions"] == {"1": "101", "2": "102", "3": "103"}
    with pytest.raises(ConfigError) as info:
        await extensions.save(pool, "0501", {"1": "101"})
    assert info.value.field == "enterprise"
