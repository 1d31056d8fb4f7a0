"""RetailCRM's activity callback through the real daemon: a deactivated module's deliveries
wait (pending, not failed) and go out once it is active again; a wrong clientId is refused
and changes nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg

from daemon.crypto import Crypto
from daemon.integrations.retailcrm import RetailCrmAdapter
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import ENTERPRISE, seed, stored
from tests.support.daemon import InProcess, running
from tests.support.seed import insert_event
from tests.support.waiting import wait_until


async def post_activity(http: aiohttp.ClientSession, daemon: InProcess, client_id: str | None,
                        active: bool, freeze: bool = False) -> tuple[int, dict[str, Any]]:
    form = {"activity": json.dumps({"active": active, "freeze": freeze}),
            "systemUrl": "https://demo.retailcrm.ru"}
    if client_id is not None:
        form["clientId"] = client_id
    async with http.post(f"{daemon.url}/retailcrm/actions/activity", data=form) as response:
        return response.status, await response.json()


async def delivery(pool: asyncpg.Pool) -> asyncpg.Record:
    row: asyncpg.Record = await pool.fetchrow("SELECT status, attempts FROM crm_deliveries")
    return row


def dial(uid: str) -> dict[str, Any]:
    return {"Token": f"tok{ENTERPRISE}", "UniqueId": uid, "CallType": 0,
            "Phone": "+375291234567", "Extensions": ["101"], "Trunk": "0001363"}


async def test_deliveries_wait_while_the_module_is_deactivated(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    assert (await adapter.register(ENTERPRISE)).ok
    client_id = crypto.decrypt((await stored(pool))["client_id"])
    async with running(make_settings(poll_interval_s=0.1)) as daemon, \
            aiohttp.ClientSession() as http:
        cache = daemon.rt.cache
        assert await post_activity(http, daemon, client_id, False) == (200, {"success": True})
        await wait_until(lambda: cache.held().get(ENTERPRISE) == "deactivated")

        await insert_event(pool, "dial", dial("1757772742.70"))
        await asyncio.sleep(1.0)  # ten polls: nothing may go out, nothing may fail
        row = await delivery(pool)
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert sim.state.call_events == []

        # Frozen counts as inactive too; then active again releases the delivery.
        assert (await post_activity(http, daemon, client_id, True, freeze=True))[0] == 200
        await asyncio.sleep(0.3)
        assert (await delivery(pool))["status"] == "pending"
        assert await post_activity(http, daemon, client_id, True) == (200, {"success": True})
        await wait_until(lambda: len(sim.state.call_events) == 1)
    row = await delivery(pool)
    assert (row["status"], row["attempts"]) == ("done", 1)
    assert await pool.fetchval("SELECT count(*) FROM crm_holds") == 0


async def test_an_unknown_client_id_is_refused_and_changes_nothing(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url)
    assert (await adapter.register(ENTERPRISE)).ok
    client_id = crypto.decrypt((await stored(pool))["client_id"])
    before = await stored(pool)
    async with running(make_settings()) as daemon, aiohttp.ClientSession() as http:
        for wrong in (client_id[:-1] + ("A" if client_id[-1] != "A" else "B"), ENTERPRISE,
                      "", None):
            status, answer = await post_activity(http, daemon, wrong, False)
            assert status == 403
            assert answer == {"success": False, "errorMsg": "unknown clientId",
                              "errors": {"clientId": "unknown clientId"}}
        status, answer = await post_activity(http, daemon, client_id, False, freeze=True)
        assert status == 200  # the right one still works afterwards...
        async with http.post(f"{daemon.url}/retailcrm/actions/activity",
                             data={"clientId": client_id, "activity": "yes"}) as response:
            assert response.status == 400  # ...and bad input names its field
            assert (await response.json())["errors"] == {
                "activity": 'activity: expected {"active": bool, "freeze": bool}'}
            assert client_id not in await response.text()
    holds = await pool.fetch("SELECT reason, detail FROM crm_holds")
    assert [(h["reason"], h["detail"]) for h in holds] == [("deactivated",
                                                            "frozen in RetailCRM")]
    assert await stored(pool) == before
