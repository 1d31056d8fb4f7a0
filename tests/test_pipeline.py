"""The delivery pipeline end to end, in process: ingest → fan-out → dispatcher → fake CRM."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from daemon.crypto import Crypto
from daemon.settings import Settings
from tests.support.daemon import running
from tests.support.fakecrm import FakeUpstream
from tests.support.seed import add_enterprise, insert_event

FAKE = "tests.support.fakecrm"


def fake_config(settings: Settings, url: str, key: str, **extra: Any) -> dict[str, Any]:
    crypto = Crypto(settings.encryption_keys, settings.secret_key)
    return {"fakecrm": {"enabled": True, "url": url, "api_key": crypto.encrypt(key), **extra}}


def dial(n: int | str, token: str = "tok0367", **extra: Any) -> dict[str, Any]:
    return {"Token": token, "UniqueId": f"1757772742.{n}", "CallType": 0,
            "Phone": "+375291112233", "Extensions": ["150"], "Trunk": "0001363", **extra}


def hangup(n: int | str, token: str = "tok0367") -> dict[str, Any]:
    return {"Token": token, "UniqueId": f"1757772742.{n}", "CallType": 0,
            "Phone": "+375291112233", "Extensions": [""], "CallStatus": "2",
            "StartTime": "2025-01-09 19:20:00", "EndTime": "2025-01-09 19:21:00"}


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


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
