"""The delivery pipeline end to end, in process: ingest → fan-out → dispatcher → fake CRM."""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg

from daemon.settings import Settings
from tests.support.bodies import dial, hangup
from tests.support.daemon import running
from tests.support.fakecrm import FAKE, FakeUpstream, fake_config
from tests.support.seed import add_enterprise, insert_event
from tests.support.waiting import wait_until


async def test_an_event_is_delivered_without_waiting_for_the_poll(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    settings = make_settings(integration=FAKE, poll_interval_s=30.0)
    await add_enterprise(pool, "0367", config=fake_config(settings, upstream.url, "key-0367"))
    async with running(settings):
        started = time.monotonic()
        await insert_event(pool, "dial", dial(1))
        await wait_until(lambda: len(upstream.delivered()) == 1, timeout=5)
        assert time.monotonic() - started < 2, "the doorbell, not the 30 s poll, woke it"
    row = await pool.fetchrow("SELECT status, attempts, delivered_at FROM crm_deliveries")
    assert row["status"] == "done" and row["attempts"] == 1 and row["delivered_at"]
    logs = await pool.fetch("SELECT * FROM integration_logs")
    assert [(r["status"], r["event_type"], r["enterprise_number"]) for r in logs] == [
        ("success", "dial", "0367")
    ]


async def test_the_next_event_of_a_call_goes_as_soon_as_the_one_before_settles(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream
) -> None:
    # The hangup is not due while its dial is in flight, and the doorbell's second look
    # comes and goes meanwhile: only the dial's settlement can wake the dispatcher for it.
    settings = make_settings(integration=FAKE, poll_interval_s=30.0)
    await add_enterprise(pool, "0367", config=fake_config(settings, upstream.url, "key-0367"))
    upstream.latency_s["1757772742.1/dial"] = 0.3
    async with running(settings):
        started = time.monotonic()
        await insert_event(pool, "dial", dial(1))
        await insert_event(pool, "hangup", hangup(1))
        await wait_until(lambda: len(upstream.delivered()) == 2, timeout=10)
        assert time.monotonic() - started < 2, "woken by the dial's settlement, not the poll"
    assert [r.event_type for r in upstream.delivered()] == ["dial", "hangup"]
