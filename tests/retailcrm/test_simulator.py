"""The RetailCRM simulator, spoken to over real HTTP: strictness, faults, rate limit, controls.

The simulator stands in for RetailCRM in every other test, so what it refuses matters as much
as what it accepts: a bridge that only passes against a lenient fake would fail in production.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from daemon.integrations.retailcrm.simulator import (
    MAX_UPLOAD_BATCH,
    WRONG_KEY_MSG,
    Simulator,
    key_fingerprint,
    make_users,
    running_simulator,
)

KEY = "sim-key-0123456789abcdef"
OTHER_KEY = "sim-key-second-fedcba9876"
CALLER = "+375291234567"
HEADERS = {"X-API-KEY": KEY}

MODULE: dict[str, Any] = {
    "code": "crm-bridge-0367",
    "integrationCode": "crm-bridge",
    "active": True,
    "name": "Телефония",
    "logo": "https://bridge.example/static/logo.svg",
    "baseUrl": "https://bridge.example/retailcrm",
    "clientId": "c" * 40,
    "accountUrl": "https://bridge.example/retailcrm/account",
    "actions": {"activity": "/actions/activity"},
    "availableCountries": ["BY", "RU"],
    "integrations": {
        "telephony": {
            "makeCallUrl": "https://bridge.example/retailcrm/make-call",
            "changeUserStatusUrl": "https://bridge.example/retailcrm/status",
            "allowEdit": False,
            "inputEventSupported": True,
            "outputEventSupported": True,
            "hangupEventSupported": True,
            "additionalCodes": [{"userId": 1, "code": "101"}, {"userId": 2, "code": "102"}],
            "externalPhones": [{"siteCode": "main", "externalPhone": "+375173000000"}],
        }
    },
}


def upload(external_id: str = "1757772742.60", **changes: Any) -> dict[str, Any]:
    call = {
        "date": "2025-01-09 19:20:00", "type": "in", "phone": CALLER, "code": "101",
        "userId": 1, "result": "answered", "duration": 42, "externalId": external_id,
    }
    call.update(changes)
    return call


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    users = [*make_users(3), {"id": 4, "active": False}, {"id": 5, "isManager": False}]
    simulator = Simulator(api_keys=[KEY, OTHER_KEY], users=users, managers={CALLER: 2})
    async with running_simulator(simulator) as running:
        yield running


async def call(
    http: aiohttp.ClientSession,
    sim: Simulator,
    method: str,
    path: str,
    *,
    form: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    """One request; form values that are not strings go as JSON strings (RetailCRM's way)."""
    if form is not None:
        kwargs["data"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in form.items()}
    async with http.request(
        method, sim.url + path, headers=HEADERS if headers is None else headers, **kwargs
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def control(http: aiohttp.ClientSession, sim: Simulator, method: str, path: str,
                  body: Any = None) -> Any:
    async with http.request(method, sim.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


# -- authentication and wire format --------------------------------------------------------


async def test_api_key_is_required_and_checked(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    wrong = {"success": False, "errorMsg": WRONG_KEY_MSG}
    assert await call(http, sim, "GET", "/api/credentials", headers={}) == (403, wrong)
    assert await call(http, sim, "GET", "/api/credentials", headers={"X-API-KEY": "nope"}) == (
        403, wrong,
    )
    status, body = await call(http, sim, "GET", "/api/credentials")
    assert status == 200
    assert body["success"] is True
    assert "telephony_write" in body["scopes"]
    assert body["sitesAvailable"] == ["main"]
    status, _ = await call(http, sim, "GET", "/api/credentials", headers={"X-API-KEY": OTHER_KEY})
    assert status == 200
    status, _ = await call(http, sim, "GET", "/api/credentials", headers={},
                           params={"apiKey": KEY})
    assert status == 200

    log = await control(http, sim, "GET", "/_requests")
    assert [(r["key_ok"], r["key_source"], r["status"]) for r in log["requests"]] == [
        (False, None, 403), (False, "header", 403), (True, "header", 200),
        (True, "header", 200), (True, "query", 200),
    ]
    assert KEY not in json.dumps(log)
    assert KEY not in json.dumps(sim.snapshot())


@pytest.mark.parametrize("kind", ["json", "multipart"])
async def test_post_bodies_must_be_form_encoded(
    sim: Simulator, http: aiohttp.ClientSession, kind: str
) -> None:
    event = json.dumps({"type": "in", "phone": CALLER})
    if kind == "json":
        kwargs: dict[str, Any] = {"json": {"event": event}}
    else:
        payload = aiohttp.FormData()
        payload.add_field("event", event)
        payload.add_field("file", b"x", filename="x.bin")
        kwargs = {"data": payload}
    status, body = await call(http, sim, "POST", "/api/v5/telephony/call/event", **kwargs)
    assert status == 400
    assert body["success"] is False
    assert "x-www-form-urlencoded" in body["errorMsg"]
    assert sim.state.call_events == []


async def test_unknown_api_routes_answer_json(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, sim, "GET", "/api/v5/nothing-here")
    assert status == 404
    assert body["success"] is False
    status, body = await call(http, sim, "GET", "/api/v5/telephony/call/event")
    assert status == 405
    assert body["success"] is False


# -- call events -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({}, "event"),
        ({"event": "{not json"}, "event"),
        ({"event": ["a list"]}, "event"),
        ({"event": {"type": "ringing", "phone": CALLER}}, "event[type]"),
        ({"event": {"type": "in"}}, "event[phone]"),
        ({"event": {"type": "hangup", "phone": CALLER}}, "event[hangupStatus]"),
        # The trap, the other way round: uploads say "no answer", events "no answered".
        ({"event": {"type": "hangup", "phone": CALLER, "hangupStatus": "no answer"}},
         "event[hangupStatus]"),
        ({"event": {"type": "in", "phone": CALLER, "codes": [101]}}, "event[codes]"),
        ({"event": {"type": "in", "phone": CALLER, "userIds": ["1"]}}, "event[userIds]"),
        ({"event": {"type": "in", "phone": CALLER, "userId": 1}}, "event[userId]"),
    ],
)
async def test_call_event_validation(
    sim: Simulator, http: aiohttp.ClientSession, form: dict[str, Any], field: str
) -> None:
    status, body = await call(http, sim, "POST", "/api/v5/telephony/call/event", form=form)
    assert status == 400, body
    assert body["success"] is False
    assert body["errorMsg"]
    assert field in body["errors"]
    assert sim.state.call_events == []


async def test_call_event_accepted_and_recorded(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.state.modules[MODULE["code"]] = MODULE  # codes 101 and 102 are registered
    event = {"type": "hangup", "phone": CALLER, "codes": ["101", "199"], "userIds": [1, 77],
             "hangupStatus": "no answered", "callExternalId": "1757772742.60"}
    status, body = await call(http, sim, "POST", "/api/v5/telephony/call/event",
                              form={"event": event})
    assert status == 200
    assert body == {"success": True, "notExistCodes": ["199"], "notExistUsers": [77]}
    assert sim.state.call_events == [event]
    [record] = sim.recorded("/api/v5/telephony/call/event")
    assert record.form == {"event": event}  # decoded back from its JSON string


# -- uploads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calls", "field"),
    [
        # The trap: "no answered" is a hangup status, not an upload result.
        ([upload(result="no answered")], "calls[0][result]"),
        ([upload(), upload("2", date="2025-01-09T19:20:00")], "calls[1][date]"),
        ([upload(date="2025-02-30 10:00:00")], "calls[0][date]"),
        ([upload(type="hangup")], "calls[0][type]"),
        ([upload(phone="")], "calls[0][phone]"),
        ([{k: v for k, v in upload().items() if k != "externalId"}], "calls[0][externalId]"),
        ([upload(duration=-1)], "calls[0][duration]"),
        ([upload(hangupStatus="answered")], "calls[0][hangupStatus]"),
        ([upload(str(i)) for i in range(MAX_UPLOAD_BATCH + 1)], "calls"),
        ([], "calls"),
        ({"not": "a list"}, "calls"),
    ],
)
async def test_upload_validation(
    sim: Simulator, http: aiohttp.ClientSession, calls: Any, field: str
) -> None:
    status, body = await call(http, sim, "POST", "/api/v5/telephony/calls/upload",
                              form={"calls": calls})
    assert status == 400, body
    assert field in body["errors"]
    assert sim.state.uploaded_calls == {}


async def test_upload_reports_duplicates_by_external_id(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    path = "/api/v5/telephony/calls/upload"
    batch = [upload(str(i)) for i in range(MAX_UPLOAD_BATCH)]
    assert await call(http, sim, "POST", path, form={"calls": batch}) == (
        200, {"success": True, "processedCallsCount": MAX_UPLOAD_BATCH, "duplicateCalls": []},
    )
    status, body = await call(http, sim, "POST", path,
                              form={"calls": [upload("7"), upload("new"), upload("new")]})
    assert (status, body) == (
        200, {"success": True, "processedCallsCount": 1, "duplicateCalls": ["7", "new"]},
    )
    assert len(sim.state.uploaded_calls) == MAX_UPLOAD_BATCH + 1
    assert sim.snapshot()["uploaded_calls"][-1]["externalId"] == "new"


# -- the integration module -------------------------------------------------------------------


def module_with(**changes: Any) -> dict[str, Any]:
    module: dict[str, Any] = json.loads(json.dumps(MODULE))
    module.update(changes)
    return module


def telephony_with(**changes: Any) -> dict[str, Any]:
    module = module_with()
    module["integrations"]["telephony"].update(changes)
    return module


@pytest.mark.parametrize(
    ("module", "field"),
    [
        (module_with(makeCallUrl="https://bridge.example/make-call"), "makeCallUrl"),
        (module_with(code="another-code"), "code"),
        ({k: v for k, v in MODULE.items() if k != "clientId"}, "clientId"),
        (module_with(baseUrl="bridge.example"), "baseUrl"),
        (module_with(actions={"activity": "/a", "settings": "/s"}), "actions[settings]"),
        (module_with(active="yes"), "active"),
        (module_with(colour="red"), "colour"),
        (telephony_with(clickToCall=True), "integrations[telephony][clickToCall]"),
        (telephony_with(additionalCodes=[{"code": "101"}]),
         "integrations[telephony][additionalCodes]"),
        (telephony_with(hangupEventSupported="1"),
         "integrations[telephony][hangupEventSupported]"),
    ],
)
async def test_module_edit_validation(
    sim: Simulator, http: aiohttp.ClientSession, module: dict[str, Any], field: str
) -> None:
    path = f"/api/v5/integration-modules/{MODULE['code']}/edit"
    status, body = await call(http, sim, "POST", path, form={"integrationModule": module})
    assert status == 400, body
    assert field in body["errors"]
    assert sim.state.modules == {}


async def test_module_edit_stores_and_reports_unknown_users(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    code = MODULE["code"]
    assert (await call(http, sim, "GET", f"/api/v5/integration-modules/{code}"))[0] == 404
    # userId as a numeric string is accepted too (the official Go client sends one).
    module = telephony_with(
        additionalCodes=[{"userId": 1, "code": "101"}, {"userId": "99", "code": "199"}],
        externalPhones=[{"siteCode": "shop2", "externalPhone": "+375173000001"}],
    )
    status, body = await call(http, sim, "POST", f"/api/v5/integration-modules/{code}/edit",
                              form={"integrationModule": module})
    assert (status, body) == (
        200, {"success": True, "info": {"notExistUsersIds": [99], "notExistSiteCodes": ["shop2"]}},
    )
    assert await call(http, sim, "GET", f"/api/v5/integration-modules/{code}") == (
        200, {"success": True, "integrationModule": module},
    )
    assert (await control(http, sim, "GET", "/_state"))["module"] == module


async def test_module_edit_on_an_unpaid_account_answers_402(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    await control(http, sim, "POST", "/_config", {"module_402": True})
    path = f"/api/v5/integration-modules/{MODULE['code']}/edit"
    status, body = await call(http, sim, "POST", path, form={"integrationModule": MODULE})
    assert status == 402
    assert body["success"] is False
    await control(http, sim, "POST", "/_config", {"module_402": False})
    assert (await call(http, sim, "POST", path, form={"integrationModule": MODULE}))[0] == 200


# -- users, statuses, managers --------------------------------------------------------------------


async def test_users_pagination_and_filters(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.set_users([*make_users(41), {"id": 42, "active": False}, {"id": 43, "isManager": False}])
    status, body = await call(http, sim, "GET", "/api/v5/users", params={"page": "3"})
    assert status == 200
    assert body["pagination"] == {"limit": 20, "totalCount": 43, "currentPage": 3,
                                  "totalPageCount": 3}
    assert [u["id"] for u in body["users"]] == [41, 42, 43]
    assert set(body["users"][0]) >= {"id", "active", "email", "firstName", "lastName",
                                     "patronymic", "phone", "status", "online", "isManager",
                                     "groups"}
    _, body = await call(http, sim, "GET", "/api/v5/users",
                         params={"limit": "50", "filter[active]": "1", "filter[isManager]": "1"})
    assert body["pagination"]["totalCount"] == 41
    _, body = await call(http, sim, "GET", "/api/v5/users", params={"filter[isManager]": "0"})
    assert [u["id"] for u in body["users"]] == [43]
    for params, field in [({"limit": "30"}, "limit"), ({"page": "0"}, "page"),
                          ({"filter[colour]": "red"}, "filter[colour]")]:
        status, body = await call(http, sim, "GET", "/api/v5/users", params=params)
        assert status == 400
        assert field in body["errors"]


async def test_user_status(sim: Simulator, http: aiohttp.ClientSession) -> None:
    assert await call(http, sim, "POST", "/api/v5/users/2/status", form={"status": "dinner"}) == (
        200, {"success": True},
    )
    assert sim.users[2]["status"] == "dinner"
    assert [(s["userId"], s["status"]) for s in sim.state.statuses] == [(2, "dinner")]
    status, body = await call(http, sim, "POST", "/api/v5/users/2/status",
                              form={"status": "away"})
    assert status == 400
    assert "status" in body["errors"]
    status, body = await call(http, sim, "POST", "/api/v5/users/999/status",
                              form={"status": "free"})
    assert status == 404
    assert body["success"] is False


async def test_responsible_manager(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.state.modules[MODULE["code"]] = MODULE
    path = "/api/v5/telephony/manager"
    # Another spelling of the same number: the map matches on digits.
    status, body = await call(http, sim, "GET", path,
                              params={"phone": "375 29 123-45-67", "details": "1"})
    assert status == 200
    assert body["manager"]["id"] == 2
    assert body["manager"]["code"] == "102"
    assert {"customer", "links"} <= set(body)
    assert await call(http, sim, "GET", path, params={"phone": "+375290000000"}) == (
        200, {"success": True, "manager": None},
    )
    sim.users[2]["status"] = "busy"
    _, body = await call(http, sim, "GET", path, params={"phone": CALLER, "ignoreStatus": "0"})
    assert body["manager"] is None
    _, body = await call(http, sim, "GET", path, params={"phone": CALLER, "ignoreStatus": "1"})
    assert body["manager"]["id"] == 2
    sim.configure(manager_404=True)
    status, body = await call(http, sim, "GET", path, params={"phone": "+375290000000"})
    assert status == 404
    assert body["success"] is False
    status, body = await call(http, sim, "GET", path)
    assert status == 400
    assert "phone" in body["errors"]


async def test_a_customer_with_a_name_and_perhaps_no_manager(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    path = "/api/v5/telephony/manager"
    reply = await control(http, sim, "POST", "/_customers", {
        CALLER: {"firstName": "Мария", "lastName": "Козлова"},
        "+375 33 666-00-00": {"nickName": "ООО Ромашка", "password": "ignored"}})
    assert reply == {"success": True, "count": 2}
    _, body = await call(http, sim, "GET", path, params={"phone": CALLER, "details": "1"})
    assert body["manager"]["id"] == 2
    assert (body["customer"]["firstName"], body["customer"]["lastName"]) == ("Мария", "Козлова")
    # Known, but nobody responsible: the customer comes with a null manager (details only).
    _, body = await call(http, sim, "GET", path, params={"phone": "375336660000", "details": "1"})
    assert body["manager"] is None and body["customer"]["nickName"] == "ООО Ромашка"
    assert "password" not in body["customer"]
    _, body = await call(http, sim, "GET", path, params={"phone": "375336660000"})
    assert body == {"success": True, "manager": None}
    async with http.post(sim.url + "/_customers", json={CALLER: "Мария"}) as resp:
        assert resp.status == 400
    sim.reset(users=True)
    assert sim.customers == {}


# -- rate limit ----------------------------------------------------------------------------------


async def test_rate_limit_counts_per_key_and_telephony_separately(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    users = [await call(http, sim, "GET", "/api/v5/users") for _ in range(11)]
    assert [s for s, _ in users] == [200] * 10 + [503]
    assert users[-1][1] == {"success": False, "errorMsg": "Rate limit exceeded"}
    # Telephony paths have their own, larger allowance...
    phones = [
        (await call(http, sim, "GET", "/api/v5/telephony/manager", params={"phone": CALLER}))[0]
        for _ in range(41)
    ]
    assert phones == [200] * 40 + [503]
    # ...and every key its own windows.
    other = await call(http, sim, "GET", "/api/v5/users", headers={"X-API-KEY": OTHER_KEY})
    assert other[0] == 200
    assert sim.peak_rate(bucket="general") == 12
    assert sim.peak_rate(bucket="telephony") == 41


async def test_rate_limit_window_slides(sim: Simulator, http: aiohttp.ClientSession) -> None:
    first = time.monotonic()
    for _ in range(10):
        assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 503
    await asyncio.sleep(first + 1.05 - time.monotonic())
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200


async def test_rate_limit_can_be_switched_off(sim: Simulator, http: aiohttp.ClientSession) -> None:
    config = await control(http, sim, "POST", "/_config", {"rate_limit": False})
    assert config["config"]["rate_limit"] is False
    statuses = [(await call(http, sim, "GET", "/api/credentials"))[0] for _ in range(25)]
    assert statuses == [200] * 25


# -- faults --------------------------------------------------------------------------------------


async def test_fault_answer_count_and_path(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "/_fault",
                  {"path": "/api/v5/telephony", "status": 500, "count": 2, "retry_after": 3})
    async with http.post(sim.url + "/api/v5/telephony/call/event", headers=HEADERS) as resp:
        assert resp.status == 500
        assert resp.headers["Retry-After"] == "3"
        assert (await resp.json())["success"] is False
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200  # another path
    assert (await call(http, sim, "GET", "/api/v5/telephony/manager"))[0] == 500
    # The count is used up: the normal answer (here a validation error) is back.
    assert (await call(http, sim, "GET", "/api/v5/telephony/manager"))[0] == 400
    assert sim.faults == []


async def test_fault_html_page(sim: Simulator, http: aiohttp.ClientSession) -> None:
    await control(http, sim, "POST", "/_fault", {"html": True})
    async with http.get(sim.url + "/api/credentials", headers=HEADERS) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "<html" in await resp.text()
    await control(http, sim, "DELETE", "/_fault")
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200


async def test_fault_latency_delays_the_normal_answer(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.add_fault(latency_ms=150, count=1)
    started = time.monotonic()
    status, body = await call(http, sim, "GET", "/api/credentials")
    assert (status, body["success"]) == (200, True)
    assert time.monotonic() - started >= 0.15


async def test_fault_outage_closes_the_connection(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    sim.add_fault(outage=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(http, sim, "POST", "/api/v5/telephony/call/event", form={"event": {}})
    assert sim.recorded()[-1].status is None


async def test_fault_stall_holds_until_reset(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.add_fault(stall=True, path="/api/v5/telephony")
    # A POST: aiohttp would quietly resend a GET on a fresh connection after the drop.
    stalled = asyncio.create_task(
        call(http, sim, "POST", "/api/v5/telephony/call/event", form={"event": {}})
    )
    await asyncio.sleep(0.2)
    assert not stalled.done()
    await control(http, sim, "POST", "/_reset")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await asyncio.wait_for(stalled, 2)


async def test_fault_bloat_streams_a_huge_or_inflating_body(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    await control(http, sim, "POST", "/_fault", {"bloat_bytes": 3_000_000, "count": 1})
    async with http.get(sim.url + "/api/credentials", headers=HEADERS) as resp:
        assert (resp.status, resp.content_length) == (200, 3_000_000)
        body = await resp.read()
    assert body.startswith(b'{"success": true, "pad": "') and len(body) == 3_000_000
    await control(http, sim, "POST", "/_fault", {"bloat_bytes": 3_000_000, "gzip": True})
    async with http.get(sim.url + "/api/credentials", headers=HEADERS,
                        auto_decompress=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        wire = await resp.read()
    assert len(wire) < 30_000  # a bomb: a few KiB inflating to 3 MB
    assert len(zlib.decompress(wire, 31)) == 3_000_000


async def test_fault_control_rejects_nonsense(sim: Simulator, http: aiohttp.ClientSession) -> None:
    for body in ({"status": 42}, {"colour": "red"}, {"count": 0}, [1, 2], {"gzip": True},
                 {"bloat_bytes": -1}):
        async with http.post(sim.url + "/_fault", json=body) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]
    assert sim.faults == []


# -- controls ------------------------------------------------------------------------------------


async def test_controls_users_keys_reset_state(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    await control(http, sim, "POST", "/_users", [{"id": 7, "firstName": "Ирина"}])
    _, body = await call(http, sim, "GET", "/api/v5/users")
    assert [u["firstName"] for u in body["users"]] == ["Ирина"]
    await control(http, sim, "POST", "/_managers", {CALLER: 7})
    _, body = await call(http, sim, "GET", "/api/v5/telephony/manager", params={"phone": CALLER})
    assert body["manager"]["id"] == 7

    await control(http, sim, "POST", "/_keys", {"keys": ["brand-new-key"]})
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 403
    assert (await call(http, sim, "GET", "/api/credentials",
                       headers={"X-API-KEY": "brand-new-key"}))[0] == 200

    await call(http, sim, "POST", "/api/v5/users/7/status", form={"status": "break"},
               headers={"X-API-KEY": "brand-new-key"})
    state = await control(http, sim, "GET", "/_state")
    assert state["statuses"][0]["status"] == "break"
    assert state["request_count"] == 5
    only = await control(http, sim, "GET", "/_requests?path=/api/v5/users")
    assert only["count"] == 2

    await control(http, sim, "POST", "/_reset")  # keeps users and keys
    state = await control(http, sim, "GET", "/_state")
    assert (state["request_count"], state["statuses"]) == (0, [])
    assert [u["id"] for u in state["users"]] == [7]
    assert sim.keys == {"brand-new-key"}

    await control(http, sim, "POST", "/_reset", {"users": True, "keys": True})
    assert sorted(sim.users) == [1, 2, 3, 4, 5]
    assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200


async def test_peak_rate_counts_arrivals_in_any_window() -> None:
    simulator = Simulator(rate_limit=False)
    async with running_simulator(simulator) as sim, aiohttp.ClientSession() as http:
        headers = {"X-API-KEY": "sim-api-key"}
        for _ in range(5):
            await call(http, sim, "GET", "/api/credentials", headers=headers)
        assert sim.peak_rate() == 5
        assert sim.peak_rate(window_s=1e-9) == 1
        assert sim.peak_rate(bucket="telephony") == 0


async def test_requests_are_told_apart_by_key_and_faults_can_target_one_key() -> None:
    simulator = Simulator(api_keys=[KEY, OTHER_KEY], rate_limit=False, seed=3)
    async with running_simulator(simulator) as sim, aiohttp.ClientSession() as http:
        down = sim.add_fault(api_key=OTHER_KEY, status=500)
        sometimes = sim.add_fault(path="/api/v5/users", status=503, ratio=0.5)
        for _ in range(3):
            assert (await call(http, sim, "GET", "/api/credentials"))[0] == 200
            assert (await call(http, sim, "GET", "/api/credentials",
                               headers={"X-API-KEY": OTHER_KEY}))[0] == 500
        statuses = [(await call(http, sim, "GET", "/api/v5/users"))[0] for _ in range(40)]
        assert 5 < statuses.count(503) < 35 and statuses.count(200) == 40 - statuses.count(503)
        mine = [r for r in sim.recorded() if r.key_id == key_fingerprint(KEY)]
        theirs = [r for r in sim.recorded() if r.key_id == key_fingerprint(OTHER_KEY)]
        assert len(mine) == 43 and len(theirs) == 3
        assert {r.fault for r in theirs} == {"status_500"}
        assert {r.fault for r in mine} == {None, "status_503"}
        assert sim.peak_rate(api_key=OTHER_KEY) == 3
        state = await control(http, sim, "GET", "/_state")
        assert KEY not in json.dumps(state) and OTHER_KEY not in json.dumps(state)
        assert OTHER_KEY not in json.dumps(await control(http, sim, "GET", "/_requests"))
        sim.remove_fault(down)
        sim.remove_fault(sometimes)
        assert (await call(http, sim, "GET", "/api/credentials",
                           headers={"X-API-KEY": OTHER_KEY}))[0] == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_command_line_serves_a_demo_account() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.integrations.retailcrm.simulator", "--port", str(port),
         "--api-key", KEY, "--users", "25", "--manager", f"{CALLER}=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
        assert f"http://127.0.0.1:{port}" in line
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/api/v5"
            async with http.get(url + "/users", headers=HEADERS) as resp:
                assert (await resp.json())["pagination"]["totalCount"] == 25
            async with http.get(url + "/telephony/manager", headers=HEADERS,
                                params={"phone": CALLER}) as resp:
                assert (await resp.json())["manager"]["id"] == 3
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
