"""Operator commands: replay failed deliveries, purge expired events."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import asyncpg

from daemon.settings import Settings
from tests.conftest import settings_env
from tests.support.bodies import dial, hangup
from tests.support.daemon import ROOT, running
from tests.support.fakecrm import FAKE, FakeUpstream
from tests.support.seed import insert_event
from tests.test_delivery import FAST, enterprises, settled, statuses


async def cli(database_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT,
        env=settings_env(database_url, CRM_BRIDGE_INTEGRATION=FAKE),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_replay_puts_failed_deliveries_back_and_they_go_out(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 2)
    upstream.fail_next("key-0001", 400, 400)
    upstream.fail_next("key-0002", 400)
    async with running(settings):
        await insert_event(pool, "dial", dial(1, token="tok0001"))
        await insert_event(pool, "dial", dial(2, token="tok0001"))
        await insert_event(pool, "dial", dial(3, token="tok0002"))
        await settled(pool, 3)
    assert await statuses(pool) == {"failed": 3}
    code, out = await cli(database_url, "replay", "--enterprise", "0001",
                          "--call", "1757772742.1")
    assert code == 0, out
    assert "1 deliveries put back in the queue" in out
    code, out = await cli(database_url, "replay", "--enterprise", "0001")
    assert "1 deliveries put back" in out, "only what is still failed"
    row = await pool.fetchrow("SELECT status, attempts, last_error FROM crm_deliveries "
                              "WHERE unique_id = '1757772742.2'")
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    async with running(settings):
        await settled(pool, 3)
    assert await statuses(pool) == {"done": 2, "failed": 1}
    code, out = await cli(database_url, "replay", "--since", "not-a-date")
    assert code == 2
    assert "ISO 8601" in out


async def test_purge_removes_old_delivered_events_in_batches(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    settings = make_settings(integration=FAKE, **FAST)
    await enterprises(pool, settings, upstream, 1)
    upstream.fail_next("key-0001", 400)
    async with running(settings):
        await insert_event(pool, "dial", dial(1, token="tok0001"))  # fails: kept
        await insert_event(pool, "hangup", hangup(1, token="tok0001"))  # its call: kept
        for n in range(2, 1203):
            await insert_event(pool, "bridge", dial(n, token="tok0001"))  # no delivery
        await insert_event(pool, "dial", dial(5000, token="tok0001"))  # recent: kept
        await settled(pool, 3)
    await pool.execute("UPDATE crm_events SET received_at = now() - interval '40 days' "
                       "WHERE unique_id <> '1757772742.5000'")
    code, out = await cli(database_url, "purge")
    assert code == 0, out
    assert "1201 events removed" in out
    left = await pool.fetch("SELECT unique_id, event_type FROM crm_events ORDER BY id")
    assert [(r["unique_id"], r["event_type"]) for r in left] == [
        ("1757772742.1", "dial"), ("1757772742.1", "hangup"), ("1757772742.5000", "dial")]
    code, out = await cli(database_url, "purge", "--older-than-days", "0.00001")
    assert "1 events removed" in out, "the recent done one goes with a shorter retention"
