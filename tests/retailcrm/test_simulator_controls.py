"""The RetailCRM simulator's additions for the demo and dry runs: the last N requests, a
manager's click on a number (RetailCRM calling the module's makeCallUrl), keys read from a
file or standard input, and a taken port said in one line."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from daemon.integrations.retailcrm.simulator import Simulator, running_simulator
from daemon.serving import serving

KEY = "sim-key-0123456789abcdef"
CLIENT_ID = "client-id-" + "c" * 40
CALLER = "+375291112233"


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(Simulator(api_keys=[KEY], rate_limit=False)) as running:
        yield running


class Receiver:
    """A stand-in for crm-bridge's make-call route: records what RetailCRM sends it."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        fields = dict(request.query) if request.method == "GET" else {
            k: str(v) for k, v in (await request.post()).items()}
        self.received.append((request.method, fields))
        return web.json_response({"success": True})


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_route("*", "/retailcrm/make-call", recv.handle)
    async with serving(app) as url:
        recv.url = f"{url}/retailcrm/make-call"
        yield recv


def module(make_call_url: str, *, active: bool = True) -> dict[str, Any]:
    return {
        "code": "vochi-telephony", "integrationCode": "vochi-telephony", "active": active,
        "name": "Vochi-CRM", "baseUrl": "http://127.0.0.1:8019/retailcrm",
        "clientId": CLIENT_ID,
        "integrations": {"telephony": {
            "makeCallUrl": make_call_url,
            "additionalCodes": [{"userId": "1", "code": "150"}],
        }},
    }


async def register(http: aiohttp.ClientSession, sim: Simulator, body: dict[str, Any]) -> None:
    async with http.post(sim.url + "/api/v5/integration-modules/vochi-telephony/edit",
                         headers={"X-API-KEY": KEY},
                         data={"integrationModule": json.dumps(body)}) as resp:
        assert resp.status == 200, await resp.text()


async def click(http: aiohttp.ClientSession, sim: Simulator, body: Any) -> tuple[int, Any]:
    async with http.post(sim.url + "/_click", json=body) as resp:
        return resp.status, await resp.json()


async def test_requests_shows_the_last_n_and_counts_them_all(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        async with http.get(sim.url + "/api/credentials", headers={"X-API-KEY": KEY}):
            pass
    async with http.get(sim.url + "/api/v5/users", headers={"X-API-KEY": KEY}):
        pass
    async with http.get(sim.url + "/_requests", params={"limit": "2"}) as resp:
        last = await resp.json()
    assert last["count"] == 6
    assert [r["path"] for r in last["requests"]] == ["/api/credentials", "/api/v5/users"]
    async with http.get(sim.url + "/_requests",
                        params={"path": "/api/credentials", "limit": "0"}) as resp:
        assert await resp.json() == {"count": 5, "requests": []}
    async with http.get(sim.url + "/_requests", params={"limit": "-1"}) as resp:
        assert resp.status == 400
        assert "limit" in (await resp.json())["error"]


async def test_a_click_calls_make_call_url_as_retailcrm_does_and_never_shows_the_client_id(
    sim: Simulator, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    await register(http, sim, module(receiver.url))
    status, answer = await click(http, sim, {"userId": 1, "phone": CALLER})
    assert status == 200
    assert answer == {"success": True, "status": 200, "answer": {"success": True}}
    assert receiver.received == [("GET", {"clientId": CLIENT_ID, "code": "150",
                                           "phone": CALLER, "userId": "1"})]
    status, answer = await click(http, sim, {"userId": 1, "phone": CALLER, "code": "151",
                                             "externalPhone": "+375173000000",
                                             "method": "POST"})
    assert status == 200
    assert receiver.received[1] == ("POST", {
        "clientId": CLIENT_ID, "code": "151", "phone": CALLER, "userId": "1",
        "externalPhone": "+375173000000"})
    assert CLIENT_ID not in json.dumps(answer)
    assert sim.recorded("/api/v5/telephony") == [], "a click is a callback, not an API request"


async def test_a_click_that_retailcrm_could_not_make_says_why(
    sim: Simulator, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    status, answer = await click(http, sim, {"userId": 1, "phone": CALLER})
    assert (status, answer["success"]) == (409, False)
    assert "no active module" in answer["error"]
    await register(http, sim, module(receiver.url))
    status, answer = await click(http, sim, {"userId": 2, "phone": CALLER})
    assert status == 409 and "user 2 has no code" in answer["error"]
    status, answer = await click(http, sim, {"userId": 9, "phone": CALLER})
    assert status == 409 and "no user 9" in answer["error"]
    await register(http, sim, module("http://127.0.0.1:9/make-call"))
    status, answer = await click(http, sim, {"userId": 1, "phone": CALLER})
    assert status == 409 and "could not be reached" in answer["error"]
    assert CLIENT_ID not in answer["error"]
    assert receiver.received == []


@pytest.mark.parametrize(("body", "field"), [
    ({"phone": CALLER}, "userId"),
    ({"userId": True, "phone": CALLER}, "userId"),
    ({"userId": 1}, "phone"),
    ({"userId": 1, "phone": " "}, "phone"),
    ({"userId": 1, "phone": CALLER, "code": 150}, "code"),
    ({"userId": 1, "phone": CALLER, "method": "PUT"}, "method"),
    ({"userId": 1, "phone": CALLER, "clientId": "x"}, "unknown fields"),
    ([1], "unexpected JSON shape"),
])
async def test_a_malformed_click_is_refused_naming_the_field(
    sim: Simulator, http: aiohttp.ClientSession, body: Any, field: str
) -> None:
    status, answer = await click(http, sim, body)
    assert status == 400
    assert field in answer["error"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_command_line_reads_keys_from_standard_input() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.integrations.retailcrm.simulator", "--port", str(port),
         "--api-key-file", "-", "--users", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{KEY}\n\nsecond-key-0123456789\n")
        proc.stdin.close()
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
        assert f"http://127.0.0.1:{port}" in line and "2 key(s)" in line
        assert KEY not in line
        async with aiohttp.ClientSession() as http:
            for key in (KEY, "second-key-0123456789"):
                async with http.get(f"http://127.0.0.1:{port}/api/credentials",
                                    headers={"X-API-KEY": key}) as resp:
                    assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            stream.close()


def test_the_command_line_needs_a_key_and_says_a_taken_port_in_one_line() -> None:
    command = [sys.executable, "-m", "daemon.integrations.retailcrm.simulator"]
    none = subprocess.run([*command, "--port", "0"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert none.returncode == 2 and "--api-key-file" in none.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*command, "--port", str(port), "--api-key", KEY],
                              capture_output=True, text=True, timeout=30, check=False)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [busy.stderr.strip()], busy.stderr
    assert f"127.0.0.1:{port}" in busy.stderr and "--port" in busy.stderr
