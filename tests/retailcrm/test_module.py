"""Registering the telephony module: the payload RetailCRM gets, the clientId's life cycle,
revocation on unregister, and failures said clearly. Real PostgreSQL, the simulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest

from daemon import links
from daemon.cache import ConfigCache
from daemon.crypto import Crypto
from daemon.integrations.retailcrm import RetailCrmAdapter
from daemon.integrations.retailcrm.module import ACCOUNT_LINK_TTL_S
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.metrics import Metrics
from daemon.settings import Settings, SettingsError, load
from tests.conftest import TEST_SECRET_KEY, settings_env
from tests.retailcrm.conftest import ENTERPRISE, KEY, PUBLIC, amocrm_text, seed, stored
from tests.support.daemon import running

CODE = "vochi-telephony"
BASE = f"{PUBLIC}/retailcrm"


async def test_the_registration_payload(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, popup_outgoing=False,
               user_extensions={"2": "102", "1": "101"},
               external_phones={"0001363": "+375172000000", "0001364": "+375172000001"},
               site_code="main")
    amocrm = await amocrm_text(pool)
    result = await adapter.register(ENTERPRISE)
    assert result.ok, result.message
    assert result.warnings == ()
    assert "vochi-telephony" in result.message and "2 manager extension(s)" in result.message

    (request,) = sim.recorded(f"/api/v5/integration-modules/{CODE}/edit")
    assert isinstance(request.form["integrationModule"], dict)  # a JSON string on the wire
    module = sim.state.modules[CODE]
    assert set(module) == {"code", "integrationCode", "active", "name", "logo", "baseUrl",
                           "clientId", "accountUrl", "actions", "integrations"}
    config = await stored(pool)
    assert module["clientId"] == crypto.decrypt(config["client_id"], field="client_id")
    assert len(module["clientId"]) >= 43  # 256 bits, url-safe base64
    account_url = module.pop("accountUrl")
    assert module == {
        "code": CODE, "integrationCode": CODE, "active": True, "name": "Vochi-CRM",
        "logo": f"{BASE}/logo.svg", "baseUrl": BASE, "clientId": module["clientId"],
        "actions": {"activity": "/actions/activity"},
        "integrations": {"telephony": {
            "makeCallUrl": f"{BASE}/make-call", "changeUserStatusUrl": f"{BASE}/user-status",
            "allowEdit": False, "inputEventSupported": True, "outputEventSupported": False,
            "hangupEventSupported": True,
            "additionalCodes": [{"userId": "1", "code": "101"}, {"userId": "2", "code": "102"}],
            "externalPhones": [{"siteCode": "main", "externalPhone": "+375172000000"},
                               {"siteCode": "main", "externalPhone": "+375172000001"}],
        }},
    }

    parts = urlsplit(account_url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{PUBLIC}/retailcrm-admin/"
    (token,) = parse_qs(parts.query)["token"]
    claims = await links.verify_stored(pool, TEST_SECRET_KEY, token)
    assert (claims.enterprise, claims.source, claims.token_version) == (ENTERPRISE,
                                                                        "retailcrm", 0)
    assert claims.expires_at - claims.issued_at == ACCOUNT_LINK_TTL_S

    assert config["enabled"] is True and config["sync_pending"] is False
    assert config["last_sync"].endswith("+00:00")
    assert await amocrm_text(pool) == amocrm

    (row,) = await pool.fetch("SELECT * FROM integration_logs")
    assert (row["event_type"], row["status"], row["integration_type"]) == (
        "module_edit", "success", "retailcrm")
    text = json.dumps([row["request_data"], row["response_data"]], ensure_ascii=False)
    assert module["clientId"] not in text and token not in text and KEY not in text
    assert "additionalCodes" in text


async def test_the_client_id_is_kept_then_rotated_on_unregister(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    amocrm = await amocrm_text(pool)
    assert (await adapter.register(ENTERPRISE)).ok
    first = sim.state.modules[CODE]["clientId"]
    first_link = sim.state.modules[CODE]["accountUrl"]
    assert (await adapter.register(ENTERPRISE)).ok
    assert sim.state.modules[CODE]["clientId"] == first
    raw = await stored(pool)
    assert raw["client_id"] != first and crypto.decrypt(raw["client_id"]) == first

    cache = ConfigCache(pool, adapter, crypto, Metrics("retailcrm"))
    await cache.refresh_all()
    assert cache.matrix.by_secret(first) == ENTERPRISE

    result = await adapter.unregister(ENTERPRISE)
    assert result.ok, result.message
    assert "revoked" in result.message and "kept" in result.message
    module = sim.state.modules[CODE]
    assert module["active"] is False and "accountUrl" not in module
    assert module["clientId"] == first  # told with the secret it knew; then forgotten here

    raw = await stored(pool)
    assert raw["enabled"] is False and raw["token_version"] == 1
    assert raw["user_extensions"] == {"1": "101"}
    rotated = crypto.decrypt(raw["client_id"])
    assert rotated != first and len(rotated) >= 43
    await cache.refresh_all()
    assert cache.matrix.by_secret(first) is None
    assert cache.matrix.by_secret(rotated) == ENTERPRISE
    token = parse_qs(urlsplit(first_link).query)["token"][0]
    with pytest.raises(links.InvalidLink) as info:
        await links.verify_stored(pool, TEST_SECRET_KEY, token)
    assert info.value.reason == "revoked"
    assert await amocrm_text(pool) == amocrm

    # Reconnecting later registers the new secret, at the new version, numbers intact.
    assert (await adapter.register(ENTERPRISE)).ok
    module = sim.state.modules[CODE]
    assert module["clientId"] == rotated and module["active"] is True
    assert module["integrations"]["telephony"]["additionalCodes"] == [
        {"userId": "1", "code": "101"}]
    new_token = parse_qs(urlsplit(module["accountUrl"]).query)["token"][0]
    assert (await links.verify_stored(pool, TEST_SECRET_KEY, new_token)).token_version == 1
    assert (await stored(pool))["enabled"] is True


async def test_unknown_users_are_reported(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "404": "102"},
               external_phones={"0001363": "+375172000000"})
    result = await adapter.register(ENTERPRISE)
    assert result.ok
    joined = " ".join(result.warnings)
    assert "404" in joined and "notExistUsersIds" in joined
    assert "site_code" in joined  # lines configured without a site: said, not hidden


async def test_an_unpaid_account_is_reported_and_nothing_changes(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, enabled=False)
    sim.configure(module_402=True)
    result = await adapter.register(ENTERPRISE)
    assert not result.ok and result.error_id == "payment_required"
    assert "must be paid to edit modules" in result.message
    raw = await stored(pool)
    assert raw["enabled"] is False and "last_sync" not in raw
    assert "client_id" in raw  # generated once; the next try sends the same one
    (row,) = await pool.fetch("SELECT status, error_message FROM integration_logs")
    assert row["status"] == "error" and "must be paid" in row["error_message"]


async def test_validation_errors_name_the_fields(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url)
    sim.add_fault(path="/api/v5/integration-modules", status=400, body={
        "success": False, "errorMsg": "Integration module is not valid",
        "errors": {"integrations[telephony][makeCallUrl]": "This value should be a URL."}})
    result = await adapter.register(ENTERPRISE)
    assert not result.ok and result.error_id == "invalid_module"
    assert result.details == {"integrations[telephony][makeCallUrl]":
                              "This value should be a URL."}
    assert "integrations[telephony][makeCallUrl]" in result.message


async def test_a_wrong_key_and_an_unknown_enterprise_are_said_plainly(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto
) -> None:
    await seed(pool, crypto, sim.url, key="not-the-right-key-at-all-000")
    result = await adapter.register(ENTERPRISE)
    assert result.error_id == "auth_failed" and "rejected the API key" in result.message
    assert "not-the-right-key" not in result.message
    missing = await adapter.register("9999")
    assert missing.error_id == "unknown_enterprise" and "9999" in missing.message


async def test_the_daemon_serves_the_logo_and_uses_its_module_settings(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url)
    settings = make_settings(retailcrm_module_code="acme.phone-1", retailcrm_module_name="ACME")
    async with running(settings) as daemon, aiohttp.ClientSession() as http:
        async with http.get(f"{daemon.url}/retailcrm/logo.svg") as response:
            assert response.status == 200
            assert response.content_type == "image/svg+xml"
            body = await response.text()
        assert (await daemon.rt.adapter.register(ENTERPRISE)).ok
    assert body.lstrip().startswith("<svg") and "</svg>" in body
    module = sim.state.modules["acme.phone-1"]
    assert (module["code"], module["integrationCode"], module["name"]) == (
        "acme.phone-1", "acme.phone-1", "ACME")
    assert module["logo"] == f"{settings.public_url}/retailcrm/logo.svg"


@pytest.mark.parametrize("code", ["", "has space", "a/b", "-lead", "x" * 65])
def test_a_bad_module_code_stops_start_up_naming_the_variable(code: str) -> None:
    env = settings_env("postgresql://u@h/db", CRM_BRIDGE_RETAILCRM_MODULE_CODE=code)
    if not code:
        assert load(env).retailcrm_module_code == "vochi-telephony"  # empty: the default
        return
    with pytest.raises(SettingsError) as info:
        load(env)
    assert info.value.variable == "CRM_BRIDGE_RETAILCRM_MODULE_CODE"
