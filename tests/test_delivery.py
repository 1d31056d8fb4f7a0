"""The delivery pipeline in process: polling, order, retries, guards, holds, masking, ingest."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from structlog.testing import capture_logs

from daemon.logconfig import redact
from daemon.settings import Settings
from tests.conftest import TEST_SERVICE_TOKEN
from tests.support.bodies import dial, hangup
from tests.support.daemon import running
from tests.support.fakecrm import FAKE, FakeUpstream, fake_config
from tests.support.seed import add_enterprise, insert_event
from tests.support.waiting import wait_until

FAST = {"retry_base_s": 0.05, "retry_max_s": 0.2, "poll_interval_s": 0.2}


async def statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM crm_deliveries GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def settled(pool: asyncpg.Pool, total: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = await statuses(pool)
        if counts.get("pending", 0) == 0 and sum(counts.values()) >= total:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled: {await statuses(pool)}")


async def enterprises(pool: asyncpg.Pool, settings: Settings, upstream: FakeUpstream,
                      count: int) -> list[str]:
    numbers = [f"{n + 1:04d}" for n in range(count)]
    for number in numbers:
        await add_enterprise(pool, number, token=f"tok{number}",
                             config=fake_config(settings, upstream.url, f"key-{number}"))
    return numbers


async def test_with_notify_off_delivery_happens_by_polling(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, notify=False, poll_interval_s=0.2)
    await enterprises(pool, settings, upstream, 1)
    async with running(settings) as daemon:
        assert daemon.rt.listener is None, "poll-only: no LISTEN connection at all"
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await wait_until(lambda: len(upstream.delivered()) == 1, timeout=5)
        # The config cache has no NOTIFY either: a manual refresh makes a change visible.
        await pool.execute("UPDATE enterprises SET integrations_config = '{}'")
        await asyncio.sleep(0.3)
        assert daemon.rt.cache.get("0001").serves
    assert await statuses(pool) == {"done": 1}


async def test_per_call_order_with_a_slow_first_event_and_three_instances(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    base = make_settings(integration=FAKE, poll_interval_s=0.05)
    await enterprises(pool, base, upstream, 1)
    for n in range(5):
        upstream.latency_s[f"1757772742.{n}/dial"] = 0.4  # every dial is slow
    instances = [make_settings(integration=FAKE, poll_interval_s=0.05, instance_id=f"i{k}")
                 for k in range(3)]
    async with running(instances[0]), running(instances[1]), running(instances[2]):
        for n in range(5):
            await insert_event(pool, "dial", dial(n, token="tok0001"))
            await insert_event(pool, "hangup", hangup(n, token="tok0001"))
        await settled(pool, 10)
    by_call: dict[str, dict[str, Any]] = {}
    for r in upstream.delivered():
        by_call.setdefault(r.unique_id, {})[r.event_type] = r
    assert len(by_call) == 5
    for uid, events in by_call.items():
        assert events["dial"].at <= events["hangup"].arrived, f"{uid}: hangup overtook dial"


async def test_500_then_recovery_is_retried_with_backoff_in_the_logs(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 1)
    upstream.fail_next("key-0001", 500, 502, 500)
    async with running(settings):
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await settled(pool, 1)
    row = await pool.fetchrow("SELECT status, attempts FROM crm_deliveries")
    assert (row["status"], row["attempts"]) == ("done", 4)
    logs = await pool.fetch("SELECT status, error_message, request_data, created_at "
                            "FROM integration_logs ORDER BY id")
    assert [r["status"] for r in logs] == ["error", "error", "error", "success"]
    assert [r["request_data"]["attempt"] for r in logs] == [1, 2, 3, 4]
    assert "http_500" in logs[0]["error_message"]
    assert all(a["created_at"] <= b["created_at"] for a, b in itertools.pairwise(logs))


async def test_400_fails_at_once_and_403_holds_the_enterprise(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 2)
    upstream.fail_next("key-0001", 400)
    upstream.fail_next("key-0002", 403)
    async with running(settings) as daemon:
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await insert_event(pool, "dial", dial(2, token="tok0002"))
        await wait_until(lambda: daemon.rt.cache.held().get("0002") == "auth_failed")
        # More events of the held enterprise wait: no request reaches the CRM for them.
        await insert_event(pool, "dial", dial(3, token="tok0002"))
        await insert_event(pool, "hangup", hangup(2, token="tok0002"))
        await asyncio.sleep(0.6)
        assert len([r for r in upstream.received if r.api_key == "key-0002"]) == 1
        rows = {r["event_id"]: r for r in await pool.fetch("SELECT * FROM crm_deliveries")}
        assert rows[1]["status"] == "failed"
        assert rows[1]["attempts"] == 1
        assert "http_400" in rows[1]["last_error"]
        assert rows[2]["status"] == "failed"  # the 403 itself is dead-lettered
        assert rows[3]["status"] == "pending"
        assert rows[4]["status"] == "pending"
        # The admin fixes the credentials: any change of the config lifts the hold.
        await pool.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                   '{fakecrm,note}', '"new key"') WHERE number = '0002'""")
        await wait_until(lambda: "0002" not in daemon.rt.cache.held())
        await settled(pool, 4)
    assert await pool.fetchval("SELECT count(*) FROM crm_holds") == 0
    assert await statuses(pool) == {"done": 2, "failed": 2}


async def test_the_rate_limit_is_never_exceeded(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, rate_limits=(("default", 10.0),),
                             enterprise_concurrency=8, poll_interval_s=0.1)
    await enterprises(pool, settings, upstream, 2)
    async with running(settings):
        for n in range(30):
            await insert_event(pool, "dial", dial(n, token="tok0001"))
            await insert_event(pool, "dial", dial(100 + n, token="tok0002"))
        await settled(pool, 60, timeout=30)
    assert len(upstream.delivered()) == 60
    assert upstream.per_second("key-0001") <= 10
    assert upstream.per_second("key-0002") <= 10
    # ...and it is used: about 10 per second, not far less.
    first = min(r.arrived for r in upstream.received if r.api_key == "key-0001")
    last = max(r.arrived for r in upstream.received if r.api_key == "key-0001")
    assert last - first < 4.0


async def test_the_breaker_opens_for_one_enterprise_without_slowing_others(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 2)
    upstream.down_keys.add("key-0001")
    async with running(settings) as daemon:
        for n in range(20):
            await insert_event(pool, "dial", dial(n, token="tok0001"))
        await wait_until(lambda: "0001" in daemon.rt.guards.stats()["breakers"], timeout=10)
        # Attempts that passed the breaker before it opened may still reach the CRM (on a
        # loaded host, well after): count from when none of 0001's is in flight any more.
        await wait_until(lambda: "0001" not in daemon.rt.guards.stats()["busy_enterprises"],
                         timeout=10)
        calls_while_open = len([r for r in upstream.received if r.api_key == "key-0001"])
        started = time.monotonic()
        for n in range(20):
            await insert_event(pool, "dial", dial(100 + n, token="tok0002"))
        await wait_until(lambda: len([r for r in upstream.delivered()
                                      if r.api_key == "key-0002"]) == 20, timeout=5)
        assert time.monotonic() - started < 2.0, "the healthy enterprise is not held back"
        assert len([r for r in upstream.received
                    if r.api_key == "key-0001"]) <= calls_while_open + 1, "open: no calls"
        stats = daemon.rt.guards.stats()["breakers"]
        assert stats["0001"]["state"] in {"open", "half_open"}
        upstream.down_keys.clear()
        await settled(pool, 40, timeout=20)
    assert (await statuses(pool)) == {"done": 40}


async def test_a_malformed_stored_body_fails_alone(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 1)
    async with running(settings):
        await insert_event(pool, "dial", dial(1, token="tok0001", CallType="sideways"))
        await insert_event(pool, "hangup", hangup(1, token="tok0001"))
        await insert_event(pool, "dial", dial(2, token="tok0001"))
        await settled(pool, 3)
    rows = {(r["unique_id"], r["event_type"]): r for r in await pool.fetch(
        "SELECT d.*, e.event_type FROM crm_deliveries d JOIN crm_events e ON e.id = d.event_id")}
    bad = rows[("1757772742.1", "dial")]
    assert bad["status"] == "failed"
    assert "CallType" in bad["last_error"]
    # Its own call's next event is not blocked forever (a failed one counts as settled).
    assert rows[("1757772742.1", "hangup")]["status"] == "done"
    assert rows[("1757772742.2", "dial")]["status"] == "done"


async def test_no_secret_in_integration_logs_or_log_output(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 1)
    upstream.fail_next("key-0001", 500)  # the upstream echoes the key in every answer
    with capture_logs() as captured:
        async with running(settings):
            await insert_event(pool, "dial", dial(1, token="tok0001"))
            await insert_event(pool, "dial", dial(2, token="tok0001"))
            await settled(pool, 2)
    rows = await pool.fetch("SELECT * FROM integration_logs")
    assert len(rows) == 3
    dumped = json.dumps([dict(r) for r in rows], default=str)
    assert "key-0001" not in dumped
    assert "***" in dumped, "the echoed key was masked, not dropped silently"
    text = json.dumps(captured, default=str)
    for secret in ("key-0001", settings.secret_key, settings.service_token,
                   *settings.encryption_keys):
        assert secret not in text
    stored = await pool.fetchval("SELECT integrations_config::text FROM enterprises")
    assert "key-0001" not in stored, "the API key is encrypted at rest"


async def test_graceful_stop_finishes_in_flight_work(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, shutdown_grace_s=5.0)
    await enterprises(pool, settings, upstream, 1)
    upstream.slow_keys["key-0001"] = 0.5
    async with running(settings) as daemon:
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await wait_until(lambda: daemon.rt.dispatcher.stats()["in_flight"] == 1)
    # The stop waited for the attempt: it is settled, not left leased.
    row = await pool.fetchrow("SELECT status, locked_by FROM crm_deliveries")
    assert (row["status"], row["locked_by"]) == ("done", None)


async def test_a_stop_past_the_grace_releases_the_lease(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, shutdown_grace_s=0.2, attempt_timeout_s=5.0,
                             lease_s=30.0)
    await enterprises(pool, settings, upstream, 1)
    upstream.slow_keys["key-0001"] = 3.0
    async with running(settings) as daemon:
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await wait_until(lambda: daemon.rt.dispatcher.stats()["in_flight"] == 1)
    row = await pool.fetchrow("SELECT status, locked_by, locked_until, attempts "
                              "FROM crm_deliveries")
    assert row["status"] == "pending"
    assert row["locked_by"] is None and row["locked_until"] is None, "released, not leased"
    assert row["attempts"] == 0, "an interrupted attempt is not counted"


# ---------------------------------------------------------------------- HTTP ingest

ENVELOPE = {"token": "tok0001", "uniqueId": "1757772742.60", "event_type": "dial",
            "raw": dial(60, token="tok0001"), "record_url": None}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**ENVELOPE, "token": ""}, "token"),
        ({k: v for k, v in ENVELOPE.items() if k != "uniqueId"}, "uniqueId"),
        ({**ENVELOPE, "uniqueId": ["x"]}, "uniqueId"),
        ({**ENVELOPE, "event_type": "ring"}, "event_type"),
        ({**ENVELOPE, "raw": "not an object"}, "raw"),
        ({**ENVELOPE, "record_url": "ftp://x/y.wav"}, "record_url"),
        ({**ENVELOPE, "origin": "replayed"}, "origin"),
        (["not", "an", "object"], "body"),
    ],
)
async def test_ingest_rejects_bad_bodies_naming_the_field(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream,
    body: Any, field: str,
) -> None:
    settings = make_settings(integration=FAKE)
    await enterprises(pool, settings, upstream, 1)
    async with running(settings) as daemon, aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
    ) as http:
        async with http.post(f"{daemon.url}/api/events", json=body) as r:
            assert r.status == 400
            answer = await r.json()
        assert answer["details"]["field"] == field
        assert answer["error"] == "invalid_field"
        async with http.post(f"{daemon.url}/api/events", data=b"{not json") as r:
            assert r.status == 400
            assert (await r.json())["details"]["field"] == "body"
    assert await pool.fetchval("SELECT count(*) FROM crm_events") == 0


async def test_ingest_stores_acknowledges_and_ignores(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE)
    await enterprises(pool, settings, upstream, 1)
    await add_enterprise(pool, "0400", token="tok0400", config={})
    async with running(settings) as daemon, aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/api/events", json=ENVELOPE) as r:
            assert r.status == 401
        http.headers["Authorization"] = f"Bearer {TEST_SERVICE_TOKEN}"
        async with http.post(f"{daemon.url}/api/events", json=ENVELOPE) as r:
            assert r.status == 202
            assert (await r.json())["stored"] is True
        async with http.post(f"{daemon.url}/api/events", json=ENVELOPE) as r:
            assert (await r.json())["stored"] is False, "a retried post is a no-op"
        async with http.post(f"{daemon.url}/api/events/hangup",
                             json=hangup(60, token="tok0001")) as r:
            assert r.status == 202
        async with http.post(f"{daemon.url}/api/events/bridge_leave",
                             json={"Token": "tok0001"}) as r:
            assert (r.status, (await r.json())["ignored"]) == (202, "bridge_leave")
        async with http.post(f"{daemon.url}/api/events",
                             json={**ENVELOPE, "token": "nobody"}) as r:
            assert r.status == 404
        # Nothing enabled: answered from memory, nothing stored.
        async with http.post(f"{daemon.url}/api/events",
                             json={**ENVELOPE, "token": "tok0400"}) as r:
            assert (r.status, (await r.json())["stored"]) == (202, False)
        await wait_until(lambda: len(upstream.delivered()) == 2)
    events = await pool.fetch("SELECT event_type, payload FROM crm_events ORDER BY id")
    assert [e["event_type"] for e in events] == ["dial", "hangup"]
    assert events[0]["payload"] == ENVELOPE["raw"], "stored exactly as received"


async def test_metrics_expose_the_pipeline(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 1)
    upstream.fail_next("key-0001", 500)
    async with running(settings) as daemon, aiohttp.ClientSession() as http:
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await settled(pool, 1)
        await daemon.rt.writer.flushed()
        async with http.get(f"{daemon.url}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line and not line.startswith("#"))
    assert float(lines['crm_bridge_deliveries_total{outcome="done"}']) == 1
    assert float(lines['crm_bridge_deliveries_total{outcome="retried"}']) == 1
    assert float(lines['crm_bridge_retries_scheduled_total{reason="error"}']) == 1
    assert float(lines["crm_bridge_listener_connected"]) == 1
    assert float(lines["crm_bridge_log_rows_total"]) == 2
    assert float(lines["crm_bridge_attempt_seconds_count"]) == 2
    for name in ("crm_bridge_queue_depth", "crm_bridge_queue_oldest_due_seconds",
                 "crm_bridge_notification_queue_usage_ratio", "crm_bridge_config_entries",
                 "crm_bridge_leases_reclaimed_total", "crm_bridge_rate_limited_waits_total",
                 "crm_bridge_event_loop_lag_seconds"):
        assert name in lines, name


async def test_an_enterprise_s_secrets_never_reach_a_log_line_by_value(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration="tests.support.leaky", max_attempts=1, **FAST)
    await enterprises(pool, settings, upstream, 1)
    processors = [structlog.processors.format_exc_info, redact]  # the production chain's end
    with capture_logs(processors=processors) as captured:
        async with running(settings):
            await insert_event(pool, "dial", dial(1, token="tok0001"))
            await settled(pool, 1)
    events = [e["event"] for e in captured]
    assert "crm_echoed" in events and "adapter_bug" in events  # it did try to leak
    text = json.dumps(captured, default=str)
    assert "a bug quoting ***" in text and "said ***" in text
    assert "key-0001" not in text
