"""The RetailCRM client against the simulator on 127.0.0.1: every endpoint, every error class.

No mocks: each test runs a real simulator and one real ``aiohttp.ClientSession``; failures
are produced by the simulator's faults, so the client sees exactly what it would on the wire.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from daemon import errors
from daemon.integrations.retailcrm.client import (
    MAX_UPLOAD_BATCH,
    Exchange,
    RetailCrmClient,
    form_body,
    parse_retry_after,
)
from daemon.integrations.retailcrm.simulator import Simulator, make_users, running_simulator

KEY = "rcrm-KEY-5ecret-0123456789abcdef"
CALLER = "+375291234567"
MODULE_CODE = "crm-bridge-0367"
MODULE: dict[str, Any] = {
    "code": MODULE_CODE,
    "integrationCode": "crm-bridge",
    "active": True,
    "name": "Телефония",
    "baseUrl": "https://bridge.example/retailcrm",
    "clientId": "c" * 40,
    "actions": {"activity": "/actions/activity"},
    "integrations": {
        "telephony": {
            "makeCallUrl": "https://bridge.example/retailcrm/make-call",
            "hangupEventSupported": True,
            "additionalCodes": [{"userId": 1, "code": "101"}, {"userId": 404, "code": "144"}],
        }
    },
}


def upload(external_id: str, **changes: Any) -> dict[str, Any]:
    call = {"date": "2025-01-09 19:20:00", "type": "in", "phone": CALLER, "code": "101",
            "userId": 1, "result": "answered", "duration": 42, "externalId": external_id}
    call.update(changes)
    return call


class Recorder:
    """Collects exchanges and gate calls, and proves the key never reached either."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.gated: list[str] = []

    async def gate(self, path: str) -> None:
        self.gated.append(path)

    def assert_no_key(self) -> None:
        for exchange in self.exchanges:
            assert KEY not in repr(exchange)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(api_keys=[KEY], users=make_users(250), managers={CALLER: 2})
    async with running_simulator(simulator) as running:
        yield running


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def client(sim: Simulator, http: aiohttp.ClientSession, rec: Recorder) -> RetailCrmClient:
    # A trailing slash, as an admin would paste it: the client strips it.
    return RetailCrmClient(http, sim.url + "/", KEY, timeout_s=2.0, gate=rec.gate,
                           on_exchange=rec.exchanges.append)


async def raises(kind: type[errors.DeliveryError], coro: Any) -> Any:
    """Await ``coro``, expect ``kind``, and check the error never quotes the key."""
    with pytest.raises(kind) as info:
        await coro
    assert KEY not in str(info.value)
    assert KEY not in repr(info.value)
    assert KEY not in repr(info.value.details)
    return info.value


# -- happy paths -------------------------------------------------------------------------------


async def test_credentials(client: RetailCrmClient, sim: Simulator, rec: Recorder) -> None:
    body = await client.credentials()
    assert body["success"] is True
    assert "telephony_write" in body["scopes"]
    [exchange] = rec.exchanges
    assert (exchange.method, exchange.path, exchange.status) == ("GET", "/api/credentials", 200)
    assert exchange.request == {}
    assert exchange.response == body
    assert exchange.duration_s > 0
    [record] = sim.recorded()
    assert (record.key_source, record.query) == ("header", {})  # never ?apiKey=
    rec.assert_no_key()
    assert KEY not in repr(client)


async def test_module_edit_and_get(client: RetailCrmClient, sim: Simulator, rec: Recorder) -> None:
    body = await client.edit_module(MODULE_CODE, MODULE)
    assert body == {"success": True, "info": {"notExistUsersIds": [404]}}
    assert await client.get_module(MODULE_CODE) == MODULE
    assert sim.state.modules[MODULE_CODE] == MODULE
    edit = rec.exchanges[0]
    assert edit.path == f"/api/v5/integration-modules/{MODULE_CODE}/edit"
    assert edit.request == {"integrationModule": MODULE}  # decoded back from the form's JSON
    assert rec.gated == [edit.path, f"/api/v5/integration-modules/{MODULE_CODE}"]
    with pytest.raises(ValueError, match="module code"):
        await client.get_module("../users")


async def test_call_event_goes_as_a_json_form_field(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    await client.edit_module(MODULE_CODE, MODULE)
    event = {"type": "in", "phone": CALLER, "codes": ["101", "177"], "userIds": [1],
             "callExternalId": "1757772742.60", "site": "магазин"}
    body = await client.call_event(event)
    assert body == {"success": True, "notExistCodes": ["177"]}
    assert sim.state.call_events == [event]
    [record] = sim.recorded("/api/v5/telephony/call/event")
    assert record.form == {"event": event}
    assert rec.exchanges[-1].request == {"event": event}


async def test_upload_calls_and_duplicates(client: RetailCrmClient, sim: Simulator) -> None:
    body = await client.upload_calls([upload("a"), upload("b", result="no answer")])
    assert body == {"success": True, "processedCallsCount": 2, "duplicateCalls": []}
    body = await client.upload_calls([upload("b"), upload("c")])
    assert body == {"success": True, "processedCallsCount": 1, "duplicateCalls": ["b"]}
    assert list(sim.state.uploaded_calls) == ["a", "b", "c"]


async def test_upload_batch_limits_are_checked_before_sending(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    body = await client.upload_calls([upload(str(i)) for i in range(MAX_UPLOAD_BATCH)])
    assert body["processedCallsCount"] == MAX_UPLOAD_BATCH
    with pytest.raises(ValueError, match="at most 50"):
        await client.upload_calls([upload(str(i)) for i in range(MAX_UPLOAD_BATCH + 1)])
    with pytest.raises(ValueError, match="at least one"):
        await client.upload_calls([])
    assert len(sim.recorded()) == 1
    assert len(rec.gated) == 1


async def test_responsible_manager(client: RetailCrmClient, sim: Simulator) -> None:
    manager = await client.responsible_manager(CALLER)
    assert manager is not None
    assert manager["id"] == 2
    assert sim.recorded()[-1].query == {"phone": CALLER, "details": "1", "ignoreStatus": "0"}
    assert await client.responsible_manager("+375290000000") is None  # manager: null
    sim.configure(manager_404=True)
    assert await client.responsible_manager("+375290000000") is None  # 404
    sim.users[2]["status"] = "busy"
    assert await client.responsible_manager(CALLER) is None
    manager = await client.responsible_manager(CALLER, ignore_status=True)
    assert manager is not None
    assert sim.recorded()[-1].query["ignoreStatus"] == "1"


async def test_users_walks_every_page(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    users = await client.users()
    assert [u["id"] for u in users] == list(range(1, 251))
    assert rec.gated == ["/api/v5/users"] * 3  # the gate sees every page
    assert [e.request for e in rec.exchanges] == [
        {"limit": "100", "page": str(page), "filter[active]": "1"} for page in (1, 2, 3)
    ]
    sim.set_users([*make_users(2), {"id": 3, "active": False}, {"id": 4, "isManager": False}])
    assert [u["id"] for u in await client.users()] == [1, 2, 4]
    assert [u["id"] for u in await client.users(active_only=False)] == [1, 2, 3, 4]
    assert [u["id"] for u in await client.users(managers_only=True)] == [1, 2]
    assert sim.recorded()[-1].query["filter[isManager]"] == "1"


async def test_set_user_status(client: RetailCrmClient, sim: Simulator) -> None:
    assert await client.set_user_status(3, "break") == {"success": True}
    assert sim.users[3]["status"] == "break"
    assert sim.recorded()[-1].form == {"status": "break"}
    with pytest.raises(ValueError, match="status"):
        await client.set_user_status(3, "away")
    with pytest.raises(ValueError, match="user_id"):
        await client.set_user_status(0, "free")
    error = await raises(errors.Permanent, client.set_user_status(9999, "free"))
    assert (error.error_id, error.status) == ("http_404", 404)


# -- error classes ----------------------------------------------------------------------------


async def test_server_error_is_retryable(client: RetailCrmClient, sim: Simulator) -> None:
    sim.add_fault(status=500)
    error = await raises(errors.Retryable, client.call_event({"type": "in", "phone": CALLER}))
    assert (error.error_id, error.status, error.rate_limited) == ("http_500", 500, False)
    assert "/api/v5/telephony/call/event" in str(error)
    assert "HTTP 500" in str(error)


@pytest.mark.parametrize("status", [503, 429])
async def test_rate_limited_answer_carries_retry_after(
    client: RetailCrmClient, sim: Simulator, status: int
) -> None:
    sim.add_fault(status=status, retry_after=7)
    error = await raises(errors.Retryable, client.credentials())
    assert (error.error_id, error.status) == ("rate_limited", status)
    assert error.rate_limited is True
    assert error.retry_after == 7.0


@pytest.mark.parametrize("fault", [{"latency_ms": 400}, {"stall": True}])
async def test_timeout_is_retryable(
    sim: Simulator, http: aiohttp.ClientSession, rec: Recorder, fault: dict[str, Any]
) -> None:
    client = RetailCrmClient(http, sim.url, KEY, timeout_s=0.1, on_exchange=rec.exchanges.append)
    sim.add_fault(**fault)
    started = time.monotonic()
    error = await raises(errors.Retryable, client.credentials())
    assert time.monotonic() - started < 0.35
    assert (error.error_id, error.status) == ("timeout", None)
    assert "timed out after 0.1 s" in str(error)
    [exchange] = rec.exchanges
    assert (exchange.status, exchange.response) == (None, None)


async def test_per_call_timeout_override(client: RetailCrmClient, sim: Simulator) -> None:
    sim.add_fault(latency_ms=300)
    error = await raises(errors.Retryable, client.credentials(timeout_s=0.05))
    assert error.error_id == "timeout"


async def test_outage_is_a_retryable_connection_error(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    sim.add_fault(outage=True)
    error = await raises(errors.Retryable, client.credentials())
    assert (error.error_id, error.status) == ("connection", None)
    assert rec.exchanges[-1].status is None


async def test_nobody_listening_is_a_retryable_connection_error(
    http: aiohttp.ClientSession, rec: Recorder
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RetailCrmClient(http, f"http://127.0.0.1:{port}", KEY,
                             on_exchange=rec.exchanges.append)
    error = await raises(errors.Retryable, client.credentials())
    assert error.error_id == "connection"
    assert f"127.0.0.1:{port}" in str(error)
    assert len(rec.exchanges) == 1


async def test_validation_error_is_permanent_with_retailcrm_errors(
    client: RetailCrmClient,
) -> None:
    # The trap: a hangup status where an upload result belongs.
    error = await raises(errors.Permanent,
                         client.upload_calls([upload("x", result="no answered")]))
    assert (error.error_id, error.status) == ("http_400", 400)
    assert "calls[0][result]" in error.details
    assert "Calls are not valid" in str(error)
    assert "calls[0][result]" in str(error)


async def test_unpaid_account_is_permanent_payment_required(
    client: RetailCrmClient, sim: Simulator
) -> None:
    sim.configure(module_402=True)
    error = await raises(errors.Permanent, client.edit_module(MODULE_CODE, MODULE))
    assert (error.error_id, error.status) == ("payment_required", 402)


async def test_wrong_key_is_auth_failed(
    sim: Simulator, http: aiohttp.ClientSession, rec: Recorder
) -> None:
    client = RetailCrmClient(http, sim.url, "not-" + KEY, on_exchange=rec.exchanges.append)
    error = await raises(errors.AuthFailed, client.credentials())
    assert (error.error_id, error.status) == ("auth_failed", 403)
    assert 'Wrong "apiKey" value.' in str(error)
    assert "not-" + KEY not in repr(rec.exchanges) + str(error)


@pytest.mark.parametrize(
    ("status", "message"),
    [(200, 'Wrong "apiKey" value.'), (400, "Account does not exist."),
     (404, "Account does not exist")],
)
async def test_auth_error_messages_mean_auth_failed_at_any_status(
    client: RetailCrmClient, sim: Simulator, status: int, message: str
) -> None:
    sim.add_fault(status=status, body={"success": False, "errorMsg": message})
    error = await raises(errors.AuthFailed, client.credentials())
    assert (error.error_id, error.status) == ("auth_failed", status)


async def test_success_false_in_a_2xx_is_permanent(client: RetailCrmClient, sim: Simulator) -> None:
    sim.add_fault(status=200, body={"success": False, "errorMsg": "Call is not found"})
    error = await raises(errors.Permanent, client.call_event({"type": "in", "phone": CALLER}))
    assert (error.error_id, error.status) == ("success_false", 200)
    assert "Call is not found" in str(error)


async def test_other_4xx_is_permanent(client: RetailCrmClient, sim: Simulator) -> None:
    error = await raises(errors.Permanent, client.get_module("never-registered"))
    assert (error.error_id, error.status) == ("http_404", 404)
    sim.add_fault(status=460, body={"success": False, "errorMsg": "Partially uploaded",
                                    "errors": ["calls[1]: bad"]})
    error = await raises(errors.Permanent, client.upload_calls([upload("a")]))
    assert (error.error_id, error.details) == ("http_460", ["calls[1]: bad"])


async def test_html_page_is_permanent_not_json(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    sim.add_fault(html=True)
    error = await raises(errors.Permanent, client.credentials())
    assert (error.error_id, error.status) == ("not_json", 200)
    assert str(error).startswith(f"{sim.url} did not answer like a RetailCRM API endpoint")
    assert "(HTTP 200, text/html)" in str(error)
    assert rec.exchanges[-1].response.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(("status", "error_id"), [(502, "http_502"), (503, "rate_limited")])
async def test_html_error_page_from_a_proxy_stays_retryable(
    client: RetailCrmClient, sim: Simulator, status: int, error_id: str
) -> None:
    sim.add_fault(html=True, status=status)
    error = await raises(errors.Retryable, client.credentials())
    assert (error.error_id, error.status) == (error_id, status)


async def test_json_that_is_not_an_object_is_not_json(
    client: RetailCrmClient, sim: Simulator
) -> None:
    sim.add_fault(status=200, body=["not", "retailcrm"])
    error = await raises(errors.Permanent, client.credentials())
    assert error.error_id == "not_json"


async def test_the_key_never_leaks_even_when_the_server_echoes_it(
    client: RetailCrmClient, sim: Simulator, rec: Recorder
) -> None:
    sim.add_fault(status=400, count=1,
                  body={"success": False, "errorMsg": f"bad key {KEY}", "errors": {"k": KEY}})
    error = await raises(errors.Permanent, client.credentials())
    assert "bad key ***" in str(error)
    sim.add_fault(html=True, body=f"<html>your key is {KEY}</html>", count=1)
    await raises(errors.Permanent, client.credentials())
    sim.add_fault(status=200, body={"success": True, "echo": KEY}, count=1)
    assert (await client.credentials())["echo"] == "***"
    sim.add_fault(status=500, count=1)
    await raises(errors.Retryable, client.credentials())
    assert len(rec.exchanges) == 4
    rec.assert_no_key()


async def test_a_gate_refusal_sends_nothing(
    sim: Simulator, http: aiohttp.ClientSession, rec: Recorder
) -> None:
    async def closed_gate(path: str) -> None:
        raise errors.Retryable(f"local rate limit for {path}", rate_limited=True,
                               error_id="rate_limited")

    client = RetailCrmClient(http, sim.url, KEY, gate=closed_gate,
                             on_exchange=rec.exchanges.append)
    with pytest.raises(errors.Retryable, match="local rate limit for /api/v5/users"):
        await client.users()
    assert sim.recorded() == []
    assert rec.exchanges == []


# -- the simulator's rate limit, seen by the client --------------------------------------------


async def test_exceeding_the_rate_limit_gets_503(client: RetailCrmClient) -> None:
    for _ in range(10):
        await client.credentials()
    error = await raises(errors.Retryable, client.credentials())
    assert (error.error_id, error.status, error.rate_limited) == ("rate_limited", 503, True)
    assert error.retry_after is None
    # The telephony allowance is separate: the general one being spent does not matter.
    assert await client.responsible_manager(CALLER) is not None


async def test_respecting_the_rate_limit_gets_no_503(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    arrivals: deque[float] = deque()

    async def ten_per_second(path: str) -> None:
        # What the daemon's guards do: at most 10 requests in any second (with a margin).
        while len(arrivals) >= 10:
            wait = arrivals[0] + 1.02 - time.monotonic()
            if wait <= 0:
                arrivals.popleft()
            else:
                await asyncio.sleep(wait)
        arrivals.append(time.monotonic())

    client = RetailCrmClient(http, sim.url, KEY, gate=ten_per_second)
    for _ in range(12):
        await client.credentials()
    assert [r.status for r in sim.recorded()] == [200] * 12
    assert sim.peak_rate(bucket="general") == 10


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=200), max_size=4))
def test_form_bodies_are_what_urlencode_writes(fields: dict[str, str]) -> None:
    assert form_body(fields) == urlencode(fields).encode()


def test_a_form_body_of_json_fields_and_names() -> None:
    fields = {"event": '{"phone":"+375 29 123","codes":["150"],"name":"Анна ~ O\'Neil"}',
              "calls": "[]", "status": "free"}
    assert form_body(fields) == urlencode(fields).encode()
