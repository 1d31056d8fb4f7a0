"""The whole way through the real daemon: events inserted like a call service inserts them,
delivered by the dispatcher through the RetailCRM adapter to the simulator, which records
exactly what RetailCRM would have received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from structlog.testing import capture_logs

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import seed
from tests.support.daemon import running
from tests.support.seed import insert_event, register
from tests.support.waiting import wait_until

TOKEN = "tok0367"
CALLER_LOCAL = "80291234567"
CALLER = "+375291234567"
LINE = "+375172000000"
RECORD = "https://records.example.by/1757772742.60.mp3"


async def statuses(pool: asyncpg.Pool) -> list[str]:
    return [r["status"] for r in await pool.fetch(
        "SELECT status FROM crm_deliveries ORDER BY event_id")]


def body(uid: str, **fields: Any) -> dict[str, Any]:
    return {"Token": TOKEN, "UniqueId": uid, **fields}


async def test_an_incoming_call_ringing_three_managers(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102", "3": "103"},
               external_phones={"0001363": LINE})
    uid = "1757772742.60"
    async with running(make_settings(poll_interval_s=0.2)):
        await insert_event(pool, "start", body(uid, CallType=0, Phone=CALLER_LOCAL,
                                               Trunk="0001363"))
        await insert_event(pool, "dial", body(
            uid, CallType=0, Phone=CALLER_LOCAL, ExtPhone=CALLER_LOCAL, Trunk="0001363",
            Extensions=["101", "102", "103", "+375297777777"]))
        await insert_event(pool, "bridge", body(
            uid, Channel="SIP/102-0000001a", Exten="102", CallerIDNum="102",
            CallerIDName="<unknown>", ConnectedLineNum=CALLER_LOCAL,
            ConnectedLineName="<unknown>", BridgeUniqueid="b-60"))
        await insert_event(pool, "hangup", body(
            uid, CallType=0, Phone=CALLER_LOCAL, Trunk="0001363", Extensions=[""],
            CallStatus="2", DateReceived="2025-01-09 19:19:50",
            StartTime="2025-01-09 19:20:00", EndTime="2025-01-09 19:21:05"),
            record_url=RECORD)
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1)
    assert await statuses(pool) == ["done", "done"]
    assert sim.state.call_events == [
        {"phone": CALLER, "type": "in", "codes": ["101", "102", "103"], "userIds": [1, 2, 3],
         "callExternalId": uid, "externalPhone": LINE},
        {"phone": CALLER, "type": "hangup", "hangupStatus": "answered",
         "codes": ["101", "102", "103"], "userIds": [1, 2, 3], "callExternalId": uid,
         "externalPhone": LINE},
    ]
    assert list(sim.state.uploaded_calls.values()) == [{
        "date": "2025-01-09 19:20:00", "type": "in", "phone": CALLER, "result": "answered",
        "duration": 65, "durationWaiting": 10, "code": "102", "userId": 2,
        "externalId": uid, "recordUrl": RECORD, "externalPhone": LINE,
    }]
    paths = [r.path for r in sim.recorded()]
    assert paths == ["/api/v5/telephony/call/event", "/api/v5/telephony/call/event",
                     "/api/v5/telephony/calls/upload"]
    logs = await pool.fetch("SELECT event_type, status FROM integration_logs ORDER BY id")
    # One row per attempt: the hangup's popup went at once, its upload after the settle
    # window, in a second attempt.
    assert [(r["event_type"], r["status"]) for r in logs] == [
        ("dial", "success"), ("hangup", "success"), ("hangup", "success")]


async def test_a_recovered_hangup_is_uploaded_without_a_popup(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    uid = "1757772742.61"
    async with running(make_settings(poll_interval_s=0.2)):
        await insert_event(pool, "download", body(
            uid, CallType=0, Phone="+375291112233", Trunk="0001363", Extensions=["101"],
            CallStatus="0", DateReceived="2025-01-09 19:30:00",
            StartTime="2025-01-09 19:30:00", EndTime="2025-01-09 19:30:25"))
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1)
    assert sim.state.call_events == []
    assert list(sim.state.uploaded_calls.values()) == [{
        "date": "2025-01-09 19:30:00", "type": "in", "phone": "+375291112233",
        "result": "no answer", "duration": 0, "durationWaiting": 25, "code": "101",
        "userId": 1, "externalId": uid,
    }]
    assert await statuses(pool) == ["done"]


async def test_a_backlog_of_downloads_goes_out_fifty_at_a_time(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    await register(pool, "retailcrm")
    for n in range(60):  # recovered while the daemon was down
        await insert_event(pool, "download", body(
            f"1757772800.{n}", CallType=0, Phone=f"+37529{1000000 + n}", Trunk="0001363",
            Extensions=["101"], CallStatus="2", StartTime="2025-01-09 20:00:00",
            EndTime="2025-01-09 20:01:00"))
    # Recovered long ago in real life: past their settle window when the daemon starts.
    async with running(make_settings(poll_interval_s=0.2, upload_settle_s=0.0)):
        await wait_until(lambda: len(sim.state.uploaded_calls) == 60)
    uploads = sim.recorded("/api/v5/telephony/calls/upload")
    assert sorted(len(r.form["calls"]) for r in uploads) == [10, 50]
    assert sim.recorded("/api/v5/telephony/call/event") == []
    await wait_until_done(pool, 60)


async def wait_until_done(pool: asyncpg.Pool, count: int) -> None:
    deadline = time.monotonic() + 5
    while (await statuses(pool)).count("done") != count:
        assert time.monotonic() < deadline, await statuses(pool)
        await asyncio.sleep(0.05)


async def test_a_record_url_that_is_no_http_url_never_reaches_retailcrm(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"}, popup_hangup=False)
    hangup = {"CallType": 0, "Phone": "+375291112233", "Trunk": "0001363",
              "Extensions": ["101"], "CallStatus": "2", "StartTime": "2025-01-09 19:30:00",
              "EndTime": "2025-01-09 19:30:25"}
    with capture_logs() as logs:
        async with running(make_settings(poll_interval_s=0.2)):
            await insert_event(pool, "hangup", body(
                "1757772742.62", RecordUrl="javascript:alert(1)", **hangup))
            await insert_event(pool, "hangup", body("1757772742.63", **hangup),
                               record_url="file:///etc/passwd")
            await insert_event(pool, "hangup", body("1757772742.64", **hangup),
                               record_url=RECORD)
            await wait_until(lambda: len(sim.state.uploaded_calls) == 3)
    uploaded = sim.state.uploaded_calls
    assert "recordUrl" not in uploaded["1757772742.62"]
    assert "recordUrl" not in uploaded["1757772742.63"]
    assert uploaded["1757772742.64"]["recordUrl"] == RECORD
    dropped = [e for e in logs if e["event"] == "record_url_dropped"]
    assert sorted(e["unique_id"] for e in dropped) == ["1757772742.62", "1757772742.63"]
    assert all("javascript" not in str(e) and "passwd" not in str(e) for e in dropped)
