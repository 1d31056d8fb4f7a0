"""Smart redirect and the customer name through the real daemon and the RetailCRM simulator:
the answer, the cache, the hard deadline with RetailCRM stalling, statuses and mappings
taking effect at once, another enterprise's extension never returned, the transfer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from daemon.integrations.retailcrm import config as cfg
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.pbx import TRANSFER_PATH
from daemon.pbx_simulator import PbxSimulator
from tests.conftest import TEST_SERVICE_TOKEN
from tests.retailcrm.conftest import CALLER, CLIENT_ID, ENTERPRISE, OTHER, Telephony
from tests.support import openapi
from tests.support.daemon import InProcess
from tests.support.waiting import wait_until

MANAGER_PATH = "/api/v5/telephony/manager"
AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
DEADLINE_S = 0.4


async def ask(http: aiohttp.ClientSession, daemon: InProcess, path: str = "/api/smart-redirect",
              *, method: str = "GET", json: Any = None, expect: int = 200,
              **params: str) -> dict[str, Any]:
    """One request; its answer checked against docs/openapi.yaml."""
    async with http.request(method, daemon.url + path, params=params, json=json,
                            headers=AUTH) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == expect, body
        openapi.check(method, path, response.status, body)
        return body


@pytest.fixture(autouse=True)
def crm(sim: Simulator) -> Simulator:
    # Manager 2 (102) is responsible for CALLER, manager 3 (no number) for another customer;
    # a company without a manager; names for the customers.
    sim.set_managers({CALLER: 2, "+375447654321": 3})
    sim.set_customers({CALLER: {"firstName": "Мария", "lastName": "Козлова"},
                       "+375336660000": {"nickName": "ООО Ромашка"}})
    return sim


@pytest_asyncio.fixture
async def daemon(telephony: Telephony) -> AsyncIterator[InProcess]:
    async with telephony(smart_redirect_deadline_s=DEADLINE_S) as running_daemon:
        yield running_daemon


async def test_the_responsible_manager_then_from_the_cache(
    daemon: InProcess, http: aiohttp.ClientSession, sim: Simulator
) -> None:
    first = await ask(http, daemon, enterprise=ENTERPRISE, phone="80291234567",
                      unique_id="1757772742.70")
    manager = f"{sim.users[2]['firstName']} {sim.users[2]['lastName']}"
    assert first == {"extension": "102", "manager_id": "2", "manager_name": manager,
                     "customer_name": "Мария Козлова", "source": "retailcrm", "reason": None}
    # By Token, in another spelling of the same digits... the cache is by digits: same one.
    again = await ask(http, daemon, Token=f"tok{ENTERPRISE}", phone="80291234567")
    assert again == {**first, "source": "cache"}
    posted = await ask(http, daemon, method="POST",
                       json={"enterprise": ENTERPRISE, "phone": "80291234567"})
    assert posted["source"] == "cache" and posted["extension"] == "102"
    assert len(sim.recorded(MANAGER_PATH)) == 1
    name = await ask(http, daemon, "/api/customer-name", enterprise=ENTERPRISE,
                     phone="80291234567")
    assert name == {"customer_name": "Мария Козлова", "source": "cache", "reason": None}


async def test_no_customer_no_manager_no_extension_not_a_phone(
    daemon: InProcess, http: aiohttp.ClientSession, sim: Simulator
) -> None:
    nobody = await ask(http, daemon, enterprise=ENTERPRISE, phone="+375290000000")
    assert (nobody["extension"], nobody["reason"]) == (None, "no_customer")
    company = await ask(http, daemon, enterprise=ENTERPRISE, phone="+375336660000")
    assert (company["extension"], company["reason"]) == (None, "no_manager")
    assert company["customer_name"] == "ООО Ромашка"
    unmapped = await ask(http, daemon, enterprise=ENTERPRISE, phone="+375447654321")
    assert (unmapped["extension"], unmapped["reason"], unmapped["manager_id"]) == (
        None, "no_extension", "3")
    for caller in ("", "anonymous", "150"):
        answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=caller or "-")
        assert answer["reason"] == "not_a_phone"
    name = await ask(http, daemon, "/api/customer-name", enterprise=ENTERPRISE,
                     phone="+375290000000")
    assert name == {"customer_name": None, "source": "cache", "reason": "no_customer"}
    assert len(sim.recorded(MANAGER_PATH)) == 3  # the negative answers are cached too


async def test_retailcrm_stalling_gets_no_match_at_the_deadline_and_the_late_answer_is_kept(
    daemon: InProcess, http: aiohttp.ClientSession, sim: Simulator
) -> None:
    sim.add_fault(path=MANAGER_PATH, latency_ms=1200)
    with capture_logs() as logs:
        started = time.monotonic()
        answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
        elapsed = time.monotonic() - started
        assert (answer["extension"], answer["reason"]) == (None, "timeout")
        assert DEADLINE_S - 0.01 <= elapsed < DEADLINE_S + 0.15, elapsed
        # A second call from the same number meanwhile joins the running look-up.
        assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["reason"] == \
            "timeout"
        assert len(sim.recorded(MANAGER_PATH)) == 1
        registry = daemon.rt.metrics.registry
        await wait_until(lambda: registry.get_sample_value(
            "crm_bridge_routing_lookups_total", {"result": "late"}) == 1.0, timeout=5)
    assert any(e["event"] == "routing_lookup_late" for e in logs)
    started = time.monotonic()
    cached = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
    assert time.monotonic() - started < 0.2
    assert (cached["extension"], cached["source"]) == ("102", "cache")
    assert len(sim.recorded(MANAGER_PATH)) == 1


async def test_retailcrm_failing_is_no_match_and_remembered_briefly(
    daemon: InProcess, http: aiohttp.ClientSession, sim: Simulator
) -> None:
    sim.add_fault(path=MANAGER_PATH, status=500)
    answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
    assert (answer["extension"], answer["reason"]) == (None, "crm_unavailable")
    assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["source"] == "cache"
    assert len(sim.recorded(MANAGER_PATH)) == 1


async def test_a_status_callback_changes_routing_at_once(
    daemon: InProcess, http: aiohttp.ClientSession, sim: Simulator
) -> None:
    assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["extension"] == "102"

    async def status(word: str) -> None:
        async with http.post(daemon.url + "/retailcrm/user-status", data={
                "clientId": CLIENT_ID, "userId": "2", "code": "102", "status": word}) as resp:
            assert resp.status == 200

    async def routed() -> dict[str, Any]:
        return await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)

    await status("dinner")
    answer = await routed()
    assert (answer["extension"], answer["reason"], answer["source"]) == (
        None, "manager_away", "cache")
    await status("busy")
    assert (await routed())["extension"] == "102"
    await status("break")
    assert (await routed())["reason"] == "manager_away"
    assert len(sim.recorded(MANAGER_PATH)) == 1  # statuses apply to the cached look-up


async def test_statuses_reach_another_instance_through_the_notification(
    telephony: Telephony, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    async with telephony(smart_redirect_deadline_s=DEADLINE_S) as daemon:
        assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["extension"] == \
            "102"
        # Another instance stored it: this one only hears the NOTIFY.
        await pool.execute("INSERT INTO crm_user_status (enterprise_number, integration_type,"
                           " user_id, status) VALUES ($1, 'retailcrm', '2', 'break')", ENTERPRISE)
        answers: list[dict[str, Any]] = []

        async def away() -> bool:
            answers.append(await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))
            return answers[-1]["reason"] == "manager_away"

        deadline = time.monotonic() + 5
        while not await away():
            assert time.monotonic() < deadline, answers[-1]


async def test_a_mapping_change_counts_from_the_next_call_and_never_another_s_extension(
    daemon: InProcess, http: aiohttp.ClientSession, pool: asyncpg.Pool, sim: Simulator
) -> None:
    assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["extension"] == "102"
    await cfg.write_keys(pool, ENTERPRISE, {"user_extensions": {"1": "101", "2": "103"}})
    await wait_until(lambda: daemon.rt.cache.get(ENTERPRISE) is not None and
                     daemon.rt.cache.get(ENTERPRISE).config.user_extensions.get("2") == "103")
    answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
    assert (answer["extension"], answer["source"]) == ("103", "cache")
    # A map that names another enterprise's number (written around the checks, or stale):
    # that extension is never returned.
    with capture_logs() as logs:
        await cfg.write_keys(pool, ENTERPRISE, {"user_extensions": {"2": "201"}})
        await wait_until(lambda: daemon.rt.cache.get(ENTERPRISE).config.user_extensions.get(
            "2") == "201")
        answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
    assert (answer["extension"], answer["reason"]) == (None, "foreign_extension")
    assert any(e["event"] == "smart_redirect_foreign_extension" for e in logs)
    other = await ask(http, daemon, enterprise=OTHER, phone=CALLER)
    assert other["extension"] is None  # 0368 maps manager 1 only
    assert len(sim.recorded(MANAGER_PATH)) == 2  # one look-up per enterprise


async def test_redirect_asks_the_pbx_to_transfer_in_the_background(
    daemon: InProcess, http: aiohttp.ClientSession, pbx: PbxSimulator, pool: asyncpg.Pool
) -> None:
    answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER, from_ext="101",
                       redirect="1", unique_id="1757772742.71")
    assert (answer["extension"], answer["redirect"]) == ("102", "requested")
    await wait_until(lambda: len(pbx.received(TRANSFER_PATH)) == 1)
    (transfer,) = pbx.received(TRANSFER_PATH)
    assert transfer.query == {"transfer_type": "blind", "from_ext": "101", "to_ext": "102"}
    assert transfer.enterprise == ENTERPRISE
    await wait_until(lambda: not daemon.rt.redirect.stats()["transfers_in_flight"])
    await daemon.rt.audit.flushed()
    row = await pool.fetchrow("SELECT request_data, status FROM integration_logs "
                              "WHERE event_type = 'smart_redirect'")
    assert row["status"] == "success"
    assert row["request_data"] == {"from_ext": "101", "to_ext": "102",
                                   "unique_id": "1757772742.71"}
    again = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER, from_ext="102",
                      redirect="1")
    assert again["redirect"] == "not_needed"  # already ringing there


async def test_bad_requests_name_their_field(
    daemon: InProcess, http: aiohttp.ClientSession, pbx: PbxSimulator
) -> None:
    for params, field in [({"phone": CALLER}, "enterprise"),
                          ({"enterprise": ENTERPRISE}, "phone"),
                          ({"enterprise": ENTERPRISE, "phone": "1\x7f2"}, "phone"),
                          ({"enterprise": ENTERPRISE, "phone": CALLER, "redirect": "1"},
                           "from_ext"),
                          ({"enterprise": ENTERPRISE, "phone": CALLER, "from_ext": "101;ls",
                            "redirect": "1"}, "from_ext"),
                          ({"enterprise": ENTERPRISE, "phone": CALLER, "from_ext": "201",
                            "redirect": "1"}, "from_ext"),
                          ({"enterprise": ENTERPRISE, "phone": CALLER, "redirect": "maybe"},
                           "redirect")]:
        body = await ask(http, daemon, expect=400, **params)
        assert body["details"] == {"field": field}, params
    body = await ask(http, daemon, method="POST", json=["x"], expect=400)
    assert body["details"] == {"field": "body"}
    # A NUL never reaches the handler: the query is refused first, a JSON body by its parser.
    body = await ask(http, daemon, expect=400, enterprise=ENTERPRISE, phone="1\x002")
    assert body["details"] == {"field": "query"}
    body = await ask(http, daemon, method="POST", expect=400,
                     json={"enterprise": ENTERPRISE, "phone": "1\x002"})
    assert body["details"] == {"field": "phone"}
    assert (await ask(http, daemon, expect=404, enterprise="9999", phone=CALLER))[
        "error"] == "unknown_enterprise"
    async with http.get(daemon.url + "/api/smart-redirect",
                        params={"enterprise": ENTERPRISE, "phone": CALLER}) as response:
        assert response.status == 401
    async with http.get(daemon.url + "/api/customer-name",
                        params={"enterprise": ENTERPRISE, "phone": CALLER}) as response:
        assert response.status == 401
    assert pbx.requests == []


async def test_an_enterprise_without_the_integration_is_not_connected(
    daemon: InProcess, http: aiohttp.ClientSession, pool: asyncpg.Pool, sim: Simulator
) -> None:
    await cfg.write_keys(pool, ENTERPRISE, {"enabled": False})
    await wait_until(lambda: not daemon.rt.cache.get(ENTERPRISE).serves)
    answer = await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER)
    assert (answer["extension"], answer["reason"]) == (None, "not_connected")
    assert sim.recorded(MANAGER_PATH) == []


async def test_an_enterprise_may_ring_managers_who_are_away(
    daemon: InProcess, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO crm_user_status (enterprise_number, integration_type,"
                       " user_id, status) VALUES ($1, 'retailcrm', '2', 'dinner')", ENTERPRISE)
    daemon.rt.redirect.forget(ENTERPRISE)
    assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["reason"] == \
        "manager_away"
    url = f"{daemon.url}/api/config/{ENTERPRISE}"
    async with http.get(url, headers=AUTH) as response:
        assert (await response.json())["settings"]["skip_away_managers"] is True
    async with http.put(url, json={"skip_away_managers": False}, headers=AUTH) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["settings"]["skip_away_managers"] is False
    await wait_until(lambda: not daemon.rt.cache.get(ENTERPRISE).config.skip_away_managers)
    assert (await ask(http, daemon, enterprise=ENTERPRISE, phone=CALLER))["extension"] == "102"
    async with http.put(url, json={"skip_away_managers": "no"}, headers=AUTH) as response:
        assert response.status == 400
        assert (await response.json())["details"] == {"field": "skip_away_managers"}


async def test_an_ambiguous_token_is_refused_naming_its_enterprises(
    daemon: InProcess, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    await pool.execute("UPDATE enterprises SET name2 = 'shared-token' WHERE number IN ($1, $2)",
                       ENTERPRISE, OTHER)
    await daemon.rt.cache.refresh_all("test")
    body = await ask(http, daemon, expect=409, Token="shared-token", phone=CALLER)
    assert body["error"] == "ambiguous_token"
    assert body["details"] == {"field": "Token", "enterprises": [ENTERPRISE, OTHER]}
    body = await ask(http, daemon, "/api/customer-name", expect=409, Token="shared-token",
                     phone=CALLER)
    assert body["error"] == "ambiguous_token"
