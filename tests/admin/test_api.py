"""The administration API through the real daemon: every answer checked against
docs/openapi.yaml, partial updates that leave the managers' numbers and other CRMs alone,
bad input refused naming the field with nothing changed, the key never shown, numbers that
move, the journal's keyset pages, replays, and deleting the integration."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import asyncpg
import pytest

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from tests.admin.conftest import PREFIX, SERVICE, A, B, Bridge, Browser
from tests.retailcrm.conftest import AMOCRM, KEY, amocrm_text, stored
from tests.support import openapi
from tests.support.seed import insert_event


async def call(http: aiohttp.ClientSession, bridge: Bridge, method: str, path: str,
               body: Any = None, *, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, Any]:
    """``method /api{path}`` with the service token; the answer checked against the
    document, returned as (status, parsed body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    async with http.request(method, f"{bridge.url}/api{path}", data=data,
                            headers=headers or SERVICE) as response:
        text = await response.text()
        assert KEY not in text  # the API key never leaves in any answer
        parsed = json.loads(text)
    openapi.check(method, f"/api{path}", response.status, parsed)
    return response.status, parsed


def test_the_document_is_a_valid_openapi_description() -> None:
    from openapi_spec_validator import validate

    validate(openapi.spec())


async def test_the_document_is_served(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{bridge.url}/api/openapi.yaml") as response:
        assert response.status == 200
        assert (await response.text()).startswith("openapi: 3.1")


async def test_config_shows_the_key_masked(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, bridge, "GET", f"/config/{A}")
    assert status == 200
    assert body["settings"]["api_key"] == "••••••••" + KEY[-4:]
    assert body["settings"]["api_key_set"] is True
    assert body["enterprise"] == A and body["integration"] == "retailcrm"


async def test_a_partial_update_changes_only_what_it_names(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await pool.execute("""UPDATE enterprises SET integrations_config = jsonb_set(
        integrations_config, '{retailcrm,user_extensions}', '{"1": "101", "2": "102"}')
        WHERE number = $1""", A)
    before, amocrm = await stored(pool, A), await amocrm_text(pool, A)
    status, body = await call(http, bridge, "PUT", f"/config/{A}", {
        "time_zone": "Europe/Moscow", "api_key": "", "popup_hangup": False,
        "external_phones": {"0001363": "+375172000000"}, "site_code": "main"})
    assert status == 200
    after = await stored(pool, A)
    assert after["user_extensions"] == {"1": "101", "2": "102"}
    assert after["api_key"] == before["api_key"]  # an empty key keeps the stored one
    assert after["time_zone"] == "Europe/Moscow" and after["popup_hangup"] is False
    assert await amocrm_text(pool, A) == amocrm
    assert body["settings"]["external_phones"] == {"0001363": "+375172000000"}

    new_key = "rcrm-NEW-key-0123456789abcdefXYZ"
    status, body = await call(http, bridge, "PUT", f"/config/{A}", {"api_key": new_key})
    assert status == 200 and body["settings"]["api_key"].endswith("fXYZ")
    assert crypto.decrypt((await stored(pool, A))["api_key"]) == new_key
    assert (await stored(pool, A))["user_extensions"] == {"1": "101", "2": "102"}


@pytest.mark.parametrize(("change", "field"), [
    ({"time_zone": "Mars/Olympus_Mons"}, "time_zone"),
    ({"domain": "https://shop.example.com/api"}, "domain"),
    ({"region": "XX"}, "region"),
    ({"enabled": "yes"}, "enabled"),
    ({"user_extensions": {"1": "103"}}, "user_extensions"),
    ({"client_id": "mine"}, "client_id"),
    ({"token_version": 0}, "token_version"),
    ({"webhook": "https://x"}, "webhook"),
    ({"external_phones": {"0001363": "call me"}}, "external_phones.0001363"),
    ({"api_key": "two words"}, "api_key"),
    ({"site_code": "<b>"}, "site_code"),
    ([1, 2], "body"),
])
async def test_a_bad_setting_is_refused_by_name_and_changes_nothing(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool, change: Any, field: str
) -> None:
    before = await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                                 "WHERE number = $1", A)
    status, body = await call(http, bridge, "PUT", f"/config/{A}",
                              {**change, "popup_incoming": False}
                              if isinstance(change, dict) else change)
    assert status == 400
    assert body["details"]["field"] == field and field in body["message"]
    after = await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                                "WHERE number = $1", A)
    assert after == before


async def test_a_body_that_is_not_json_is_refused(bridge: Bridge,
                                                  http: aiohttp.ClientSession) -> None:
    status, body = await call(http, bridge, "PUT", f"/config/{A}", raw=b"{nope")
    assert status == 400 and body["details"]["field"] == "body"


async def test_an_unknown_enterprise_is_404(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, bridge, "GET", "/config/4242")
    assert status == 404 and body["error"] == "unknown_enterprise"


async def test_test_connection_names_the_missing_scopes(
    bridge: Bridge, http: aiohttp.ClientSession, admin_sim: Simulator
) -> None:
    status, body = await call(http, bridge, "POST", f"/test-connection/{A}")
    assert status == 200 and body["ok"] is True and body["missing_scopes"] == []
    admin_sim.scopes = ["integration_read", "integration_write", "telephony_read"]
    status, body = await call(http, bridge, "POST", f"/test-connection/{A}")
    assert body["ok"] is False
    assert body["missing_scopes"] == ["telephony_write", "user_read"]
    # Unsaved values are tested as sent, and stored nowhere.
    status, body = await call(http, bridge, "POST", f"/test-connection/{A}",
                              {"api_key": "not-the-key-0123456789"})
    assert status == 200 and body["ok"] is False


async def test_register_shows_the_users_retailcrm_does_not_know(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool, admin_sim: Simulator
) -> None:
    await pool.execute("""UPDATE enterprises SET integrations_config = jsonb_set(
        integrations_config, '{retailcrm,user_extensions}', '{"1": "101", "77": "102"}')
        WHERE number = $1""", A)
    status, body = await call(http, bridge, "POST", f"/register/{A}")
    assert status == 200 and body["ok"] is True
    assert body["unknown_users"] == ["77"]
    assert any("notExistUsersIds" in w for w in body["warnings"])
    status, body = await call(http, bridge, "GET", f"/config/{A}")
    assert body["settings"]["registered"] is True

    admin_sim.add_fault(path="/api/v5/integration-modules", status=500)
    status, body = await call(http, bridge, "POST", f"/sync-extensions/{A}")
    assert status == 502 and body["ok"] is False and body["error"] == "unavailable"


async def test_managers_numbers_and_a_move(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    status, body = await call(http, bridge, "GET", f"/managers/{A}")
    assert status == 200 and [m["id"] for m in body["managers"]] == ["1", "2", "3", "4"]
    assert body["managers"][3]["status"] == "dinner"
    status, body = await call(http, bridge, "GET", f"/internal-phones/{A}")
    assert [n["number"] for n in body["numbers"]] == ["101", "102", "103"]
    assert body["numbers"][0]["owner"] == "Owner 101"

    status, body = await call(http, bridge, "POST", f"/user-extensions/{A}",
                              {"user_extensions": {"1": "101"}})
    assert status == 200 and body["user_extensions"] == {"1": "101"} and body["moves"] == []
    status, body = await call(http, bridge, "POST", f"/user-extensions/{A}",
                              {"user_extensions": {"2": "101"}})
    assert body["user_extensions"] == {"2": "101"}
    assert body["moves"] == [{"number": "101", "from_user": "1", "to_user": "2"}]
    status, body = await call(http, bridge, "GET", f"/user-extensions/{A}")
    assert body == {"user_extensions": {"2": "101"}}
    status, body = await call(http, bridge, "GET", f"/internal-phones/{A}")
    assert body["numbers"][0]["manager_id"] == "2"

    for bad, field in (({"3": "201"}, "user_extensions.3"),  # B's number
                       ({"3": "102", "4": "102"}, "user_extensions.4")):
        status, body = await call(http, bridge, "POST", f"/user-extensions/{A}",
                                  {"user_extensions": bad})
        assert status == 400 and body["details"]["field"] == field
    assert (await stored(pool, A))["user_extensions"] == {"2": "101"}


async def test_managers_of_an_unconnected_crm_is_409(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    await pool.execute("""UPDATE enterprises SET integrations_config = jsonb_set(
        integrations_config, '{retailcrm}', '{"token_version": 0}') WHERE number = $1""", A)
    status, body = await call(http, bridge, "GET", f"/managers/{A}")
    assert status == 409 and body["error"] == "not_connected"


async def _deliveries(pool: asyncpg.Pool, count: int, enterprise: str = A) -> list[int]:
    """``count`` delivered hangups of ``enterprise``, inserted as a call service does."""
    for i in range(count):
        await insert_event(pool, "hangup", {
            "Token": f"tok{enterprise}", "UniqueId": f"1757772742.{i}", "CallType": 0,
            "Phone": f"+37529123{i:04d}", "Extensions": [""], "CallStatus": "0",
            "DateReceived": "2025-01-09 19:19:50"})
    ids: list[int] = [r["event_id"] for r in await pool.fetch(
        "SELECT event_id FROM crm_deliveries WHERE enterprise_number = $1 ORDER BY event_id",
        enterprise)]
    return ids


async def reaches(pool: asyncpg.Pool, event_id: int, status: str, timeout: float = 10.0) -> None:
    """Wait until the delivery's status is ``status``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await pool.fetchval("SELECT status FROM crm_deliveries WHERE event_id = $1",
                              event_id) != status:
        assert asyncio.get_running_loop().time() < deadline, f"never {status}"
        await asyncio.sleep(0.02)


async def test_the_journal_pages_by_keyset_and_filters(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    ids = await _deliveries(pool, 5)
    await _deliveries(pool, 2, B)
    seen: list[int] = []
    cursor = ""
    while True:
        status, body = await call(http, bridge, "GET", f"/journal/{A}?limit=2{cursor}")
        assert status == 200
        seen += [item["event_id"] for item in body["items"]]
        if body["next"] is None:
            break
        cursor = f"&before={body['next']}"
    assert seen == sorted(ids, reverse=True)  # newest first, each once, only A's

    status, body = await call(http, bridge, "GET", f"/journal/{A}?phone=1230003")
    assert [i["call_id"] for i in body["items"]] == ["1757772742.3"]
    status, body = await call(http, bridge, "GET", f"/journal/{A}?call_id=1757772742.1")
    assert [i["event_id"] for i in body["items"]] == [ids[1]]
    status, body = await call(http, bridge, "GET", f"/journal/{A}?event_type=dial")
    assert body["items"] == []
    for bad, field in (("status=lost", "status"), ("date=yesterday", "date"),
                       ("before=-1", "before"), ("limit=100000", "limit"), ("phone=1", "phone")):
        status, body = await call(http, bridge, "GET", f"/journal/{A}?{bad}")
        assert status == 400 and body["details"]["field"] == field


async def test_a_failed_delivery_is_replayed_and_delivered(
    bridge: Bridge, http: aiohttp.ClientSession, pool: asyncpg.Pool, admin_sim: Simulator
) -> None:
    admin_sim.add_fault(path="/api/v5/telephony", status=400,
                        body={"success": False, "errorMsg": "refused"})
    (event_id,) = await _deliveries(pool, 1)
    await reaches(pool, event_id, "failed")
    status, body = await call(http, bridge, "GET", f"/journal/{A}/deliveries/{event_id}")
    assert status == 200 and body["attempts"] and body["attempts"][0]["status"] == "error"
    status, body = await call(http, bridge, "GET", f"/journal/{A}?status=failed")
    assert [i["event_id"] for i in body["items"]] == [event_id]
    assert body["items"][0]["replayable"] is True

    admin_sim.clear_faults()
    status, body = await call(http, bridge, "POST", f"/deliveries/{B}/replay",
                              {"event_ids": [event_id]})
    assert status == 200 and body["replayed"] == []  # not B's delivery
    status, body = await call(http, bridge, "POST", f"/deliveries/{A}/replay",
                              {"event_ids": [event_id]})
    assert body["replayed"] == [event_id]
    await reaches(pool, event_id, "done")
    status, body = await call(http, bridge, "POST", f"/deliveries/{A}/replay",
                              {"event_ids": [event_id]})
    assert body["replayed"] == []  # done: nothing to replay
    status, body = await call(http, bridge, "POST", f"/deliveries/{A}/replay",
                              {"event_ids": ["x"]})
    assert status == 400 and body["details"]["field"] == "event_ids"


async def test_diagnostics(bridge: Bridge, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, bridge, "GET", f"/diagnostics/{A}")
    assert status == 200
    assert body["queue"] == {"pending": 0, "oldest_due_s": 0.0, "failed": 0}
    assert body["breaker"] == {"state": "closed"} and body["config"]["serving"] is True


async def test_deleting_the_integration_revokes_links_and_sessions(
    bridge: Bridge, http: aiohttp.ClientSession, browser: Browser, pool: asyncpg.Pool
) -> None:
    await browser.sign_in(bridge, A)
    token = await bridge.link(A)
    status, body = await call(http, bridge, "POST", f"/register/{A}")
    assert status == 200
    before = await stored(pool, A)
    status, body = await call(http, bridge, "DELETE", f"/config/{A}")
    assert status == 200 and body["ok"] is True
    after = await stored(pool, A)
    assert after["enabled"] is False and after["client_id"] != before["client_id"]
    assert after["token_version"] == before.get("token_version", 0) + 1
    assert json.loads(await amocrm_text(pool, A)) == AMOCRM
    async with browser.http.get(f"{bridge.url}{PREFIX}/api/config/{A}") as response:
        assert response.status == 401  # the session died with the version
    async with browser.http.get(f"{bridge.url}{PREFIX}/?token={token}",
                                allow_redirects=False) as response:
        assert response.status == 401  # and so did every link
