"""A delivery's steps through the real daemon and the simulator: a failed upload never shows
the popup again, a stale popup is skipped with its reason, and a hangup's upload waits the
settle window (its popup does not) and then names whoever a late event of the call says."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import seed
from tests.support.daemon import running
from tests.support.seed import insert_event, register
from tests.support.waiting import wait_until
from tests.test_delivery import settled

TOKEN = "tok0367"
CALLER = "+375291234567"
UPLOAD = "/api/v5/telephony/calls/upload"
EVENT = "/api/v5/telephony/call/event"


def body(uid: str, **fields: Any) -> dict[str, Any]:
    return {"Token": TOKEN, "UniqueId": uid, "CallType": 0, "Phone": CALLER,
            "Trunk": "0001363", **fields}


def hangup(uid: str, status: str = "2", extensions: tuple[str, ...] = ("",)) -> dict[str, Any]:
    return body(uid, Extensions=list(extensions), CallStatus=status,
                DateReceived="2025-01-09 19:19:50", StartTime="2025-01-09 19:20:00",
                EndTime="2025-01-09 19:21:05")


async def deliveries(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch("SELECT e.event_type, d.* FROM crm_deliveries d "
                            "JOIN crm_events e ON e.id = d.event_id ORDER BY d.event_id")
    return {r["event_type"]: r for r in rows}


async def test_a_failed_upload_is_retried_alone_and_the_popup_goes_once(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    sim.add_fault(path=UPLOAD, status=500, count=2)
    settings = make_settings(poll_interval_s=0.1, upload_settle_s=0.3, retry_base_s=0.1,
                             retry_max_s=0.2)
    async with running(settings):
        await insert_event(pool, "dial", body("1757772742.60", Extensions=["101"]))
        await insert_event(pool, "hangup", hangup("1757772742.60"))
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1, timeout=15)
    assert [e["type"] for e in sim.state.call_events] == ["in", "hangup"], "no popup twice"
    assert [r.status for r in sim.recorded(UPLOAD)] == [500, 500, 200]
    row = (await deliveries(pool))["hangup"]
    assert (row["status"], row["attempts"]) == ("done", 3), "the settle wait used no attempt"
    assert row["steps_done"] == ["popup", "upload"]
    logs = await pool.fetch("SELECT request_data, status FROM integration_logs "
                            "WHERE event_type = 'hangup' ORDER BY id")
    paths = [[x["path"] for x in r["request_data"]["requests"]] for r in logs]
    assert paths == [[EVENT], [UPLOAD], [UPLOAD], [UPLOAD]], "each attempt did only what was left"


async def test_a_stale_popup_is_skipped_with_its_reason_and_the_call_still_uploaded(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    await register(pool, "retailcrm")
    await insert_event(pool, "dial", body("1757772742.61", Extensions=["101"]))
    await insert_event(pool, "hangup", hangup("1757772742.61"))
    # The CRM was unreachable for ten minutes: nobody wants those cards any more.
    await pool.execute("UPDATE crm_events SET received_at = now() - interval '10 minutes'")
    async with running(make_settings(poll_interval_s=0.1)):
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1, timeout=10)
    assert sim.state.call_events == []
    rows = await deliveries(pool)
    assert rows["dial"]["status"] == "skipped"
    assert rows["dial"]["last_error"].startswith("stale_popup: not shown 6")
    assert rows["hangup"]["status"] == "done"
    outcome = await pool.fetchval("SELECT request_data->>'outcome' FROM integration_logs "
                                  "WHERE event_type = 'hangup'")
    assert outcome.startswith("call uploaded; stale_popup: not shown")


async def test_the_settle_window_delays_the_upload_but_not_the_hangup_event(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    settle_s = 2.0
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    uid = "1757772742.62"
    async with running(make_settings(poll_interval_s=0.1, upload_settle_s=settle_s)):
        stored_at = time.monotonic()
        # A missed call whose hangup is stored before its dial (two call-service processes).
        await insert_event(pool, "hangup", hangup(uid, status="0", extensions=("101",)))
        await wait_until(lambda: sim.recorded(EVENT), timeout=5)
        await insert_event(pool, "dial", body(uid, Extensions=["101", "102"]))
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1, timeout=10)
        await settled(pool, 2)
    (popup,) = sim.recorded(EVENT)
    (upload,) = sim.recorded(UPLOAD)
    assert popup.monotonic - stored_at < 1.0, "the cards are closed at once"
    assert popup.form["event"]["type"] == "hangup"
    assert upload.monotonic - stored_at >= settle_s, "the upload waited the window"
    item = upload.form["calls"][0]
    # The dial stored after the hangup still decides who the missed call belongs to: the
    # last ringing manager (without the window, the hangup's own 101 would have been sent).
    assert (item["result"], item["code"], item["userId"]) == ("no answer", "102", 2)
    rows = await deliveries(pool)
    assert rows["hangup"]["status"] == "done"
    assert (rows["dial"]["status"], rows["dial"]["last_error"]) == ("skipped", "late_dial")
    assert rows["dial"]["delivered_at"] is None
    later = await pool.fetchval(
        "SELECT count(*) FROM integration_logs WHERE event_type = 'dial'")
    assert later == 0, "the late dial waited behind the deferred hangup and sent nothing"


async def test_hangups_whose_popup_is_done_share_one_upload_request(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    await register(pool, "retailcrm")
    uids = [f"1757772742.7{n}" for n in range(3)]
    for uid in uids:
        await insert_event(pool, "hangup", hangup(uid, extensions=("101",)))
    # Their popups went out before a restart; the uploads are what is left, all due.
    await pool.execute("UPDATE crm_deliveries SET steps_done = '{popup}'")
    await pool.execute("UPDATE crm_events SET received_at = now() - interval '10 seconds'")
    async with running(make_settings(poll_interval_s=0.1)):
        await wait_until(lambda: len(sim.state.uploaded_calls) == 3)
        await settled(pool, 3)
    assert sim.recorded(EVENT) == [], "no popup again"
    (request,) = sim.recorded(UPLOAD)
    assert sorted(call["externalId"] for call in request.form["calls"]) == uids


async def test_a_backlog_past_its_popups_shares_upload_requests(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings]
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    await register(pool, "retailcrm")
    uids = [f"1757772742.8{n}" for n in range(5)]
    for uid in uids:
        await insert_event(pool, "hangup", hangup(uid, extensions=("101",)))
    # RetailCRM was unreachable for ten minutes: no popup is worth showing, every call
    # still goes to the history — together, not in a request each.
    await pool.execute("UPDATE crm_events SET received_at = now() - interval '10 minutes'")
    async with running(make_settings(poll_interval_s=0.1)):
        await wait_until(lambda: len(sim.state.uploaded_calls) == 5)
        await settled(pool, 5)
    assert sim.recorded(EVENT) == []
    (request,) = sim.recorded(UPLOAD)
    assert sorted(call["externalId"] for call in request.form["calls"]) == uids
    rows = await pool.fetch("SELECT request_data->>'outcome' AS outcome FROM integration_logs")
    assert len(rows) == 5, "a log row per delivery"
    assert all(r["outcome"].startswith("call uploaded; stale_popup: not shown") for r in rows)
