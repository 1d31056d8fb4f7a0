"""The database going away: one classification, logged once each way, ``/ready`` saying
so, ingest answering 503, attempts retried as an outage — and a real PostgreSQL restarted
under load while the daemon runs: the process stays up and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from daemon import db
from daemon.migrate import find_sql_dir, load_migrations, migrate
from daemon.pgcluster import ThrowawayCluster
from daemon.settings import Settings, load
from tests.conftest import TEST_SERVICE_TOKEN, settings_env
from tests.support.bodies import dial, hangup
from tests.support.daemon import running, start_process
from tests.support.fakecrm import FAKE, FakeUpstream, fake_config
from tests.support.seed import CALL_SERVICE_INSERT, add_enterprise, insert_event
from tests.support.tcpproxy import TcpProxy, proxy_to
from tests.support.waiting import wait_until
from tests.test_delivery import settled, statuses

AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (OSError("reset"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (asyncpg.InterfaceError("connection is closed"), True),
        (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in "
                                     "progress"), True),
        (asyncpg.ConnectionDoesNotExistError("gone"), True),
        (asyncpg.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.TooManyConnectionsError("too many clients"), True),
        (asyncpg.AdminShutdownError("terminating connection"), True),
        (asyncpg.QueryCanceledError("statement timeout"), True),
        (asyncpg.UniqueViolationError("dup"), False),
        (asyncpg.DataError("bad"), False),
        (asyncpg.UndefinedTableError("no such table"), False),
        (asyncpg.CardinalityViolationError("ambiguous"), False),
        (ValueError("a bug"), False),
    ],
)
def test_one_classification_of_database_unavailable(exc: BaseException, expected: bool) -> None:
    assert db.unavailable(exc) is expected


def test_an_outage_is_logged_once_each_way() -> None:
    health = db.DatabaseHealth(rng=random.Random(1))
    with capture_logs() as logs:
        assert health.failed(OSError(), "dispatcher")
        assert health.failed(asyncpg.InterfaceError("closed"), "outcome-writer")
        assert not health.failed(ValueError(), "dispatcher"), "a bug is not an outage"
        health.succeeded()
        health.succeeded()
    assert [line["event"] for line in logs] == ["database_unavailable", "database_recovered"]
    assert logs[0]["task"] == "dispatcher" and logs[0]["error"] == "OSError"
    pauses = [health.pause_s(n) for n in range(1, 12)]
    assert all(0 < p <= db.PAUSE_MAX_S for p in pauses)
    assert pauses[0] <= db.PAUSE_FIRST_S and pauses[-1] >= db.PAUSE_MAX_S / 2, "grows, capped"


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}"))


@contextlib.asynccontextmanager
async def _proxied(database_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(database_url)
    async with proxy_to(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        yield proxy


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_ready_names_what_is_missing(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    http: aiohttp.ClientSession,
) -> None:
    async with running(make_settings(integration=FAKE, port=0)) as daemon:
        status, body = await _get(http, f"{daemon.url}/ready")
        assert status == 200, body
        assert {k: body[k] for k in ("status", "database", "listener", "migrations",
                                     "missing")} == {
            "status": "ready", "database": "ok", "listener": "connected",
            "migrations": "ok", "missing": []}
        await pool.execute("DELETE FROM schema_migrations WHERE version = 4")
        status, body = await _get(http, f"{daemon.url}/ready")
        assert (status, body["missing"], body["migrations"]) == (
            503, ["migrations"], {"pending": [4]})
    async with running(make_settings(integration=FAKE, notify=False)) as daemon:
        await pool.execute("INSERT INTO schema_migrations (version, name, checksum) "
                           "VALUES (4, 'poison_and_tokens', 'x')")
        status, body = await _get(http, f"{daemon.url}/ready")
        assert (status, body["listener"]) == (200, "poll-only")


async def test_while_the_database_is_away_ready_and_ingest_answer_503(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream, http: aiohttp.ClientSession,
) -> None:
    async with _proxied(database_url) as proxy:
        settings = make_settings(integration=FAKE, database_url=_via(database_url, proxy.port),
                                 poll_interval_s=0.1, db_command_timeout_s=1.0)
        await add_enterprise(pool, "0001", token="tok0001",
                             config=fake_config(settings, upstream.url, "key-0001"))
        with capture_logs() as logs:
            async with running(settings) as daemon:
                proxy.blocked = True
                proxy.drop_all()
                await wait_until(lambda: not daemon.rt.health.available, timeout=10)
                status, body = await _get(http, f"{daemon.url}/ready")
                assert status == 503 and "database" in body["missing"], body
                async with http.post(f"{daemon.url}/api/events/dial", headers=AUTH,
                                     json=dial(1, token="tok0001")) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"] == "1"
                    assert (await r.json())["error"] == "unavailable"
                # An admin page needs the database for its session: an HTML 503 too.
                async with http.get(f"{daemon.url}/fakecrm-admin/0001/journal",
                                    headers={"Cookie": "crm_bridge_admin=whatever"}) as r:
                    assert r.status == 503
                    assert r.content_type == "text/html"
                await asyncio.sleep(1.0)  # every loop keeps failing meanwhile
                proxy.blocked = False
                await wait_until(lambda: daemon.rt.health.available, timeout=15)

                async def ready() -> bool:
                    return (await _get(http, f"{daemon.url}/ready"))[0] == 200

                deadline = time.monotonic() + 20
                while not await ready():
                    assert time.monotonic() < deadline, "never ready again"
                    await asyncio.sleep(0.1)
                async with http.post(f"{daemon.url}/api/events/dial", headers=AUTH,
                                     json=dial(1, token="tok0001")) as r:
                    assert r.status == 202
                await wait_until(lambda: len(upstream.delivered()) == 1, timeout=10)
                assert daemon.rt.supervisor.failed is None
                assert {"dispatcher", "outcome-writer", "listener", "config-refresher",
                        "queue-stats", "purger"} <= set(daemon.rt.supervisor.names)
    events = [line["event"] for line in logs]
    assert events.count("database_unavailable") == 1, events
    assert events.count("database_recovered") == 1
    assert "request_failed" not in events, "an outage is no 500 with a traceback"
    assert "page_failed" not in events
    assert {"request_database_unavailable", "page_database_unavailable"} <= set(events)


async def test_a_call_that_cannot_be_loaded_is_retried_as_an_outage(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> None:
    # One enterprise slot: the second delivery waits for it while the first is at the CRM;
    # meanwhile crm_events is locked, so loading its call times out (the database is away,
    # as far as that attempt can tell).
    settings = make_settings(integration=FAKE, enterprise_concurrency=1,
                             db_command_timeout_s=0.5, retry_base_s=0.05, retry_max_s=0.1,
                             poll_interval_s=0.1)
    await add_enterprise(pool, "0001", token="tok0001",
                         config=fake_config(settings, upstream.url, "key-0001"))
    upstream.latency_s["1757772742.1"] = 1.0
    async with running(settings) as daemon:
        locker = await asyncpg.connect(database_url)
        try:
            async with locker.transaction():
                # One commit: one claim takes both (a saturated enterprise is left out of
                # later claims, so the second must come with the first).
                async with pool.acquire() as conn, conn.transaction():
                    await insert_event(conn, "dial", dial(1, token="tok0001"))
                    await insert_event(conn, "dial", dial(2, token="tok0001"))
                deadline = time.monotonic() + 10
                while await pool.fetchval("SELECT count(*) FROM crm_deliveries "
                                          "WHERE locked_by IS NOT NULL") < 2:
                    assert time.monotonic() < deadline, "both claimed"
                    await asyncio.sleep(0.01)
                assert len(upstream.arrivals) <= 1, "the second waits for the slot"
                await locker.execute("LOCK TABLE crm_events IN ACCESS EXCLUSIVE MODE")
                await wait_until(lambda: daemon.rt.metrics.retries.labels("error")
                                 ._value.get() >= 1, timeout=10)
        finally:
            await locker.close()
        await settled(pool, 2)
        bugs = daemon.rt.metrics.bug_errors._value.get()
    assert await statuses(pool) == {"done": 2}
    errors = [r["error_message"] for r in await pool.fetch(
        "SELECT error_message FROM integration_logs WHERE status = 'error'")]
    assert errors and all(e.startswith("database_unavailable: the database was unavailable")
                          for e in errors), errors
    assert bugs == 0, "an outage is not an adapter bug"


# ---------------------------------------------------------------------- real restarts

ENTERPRISES = 8
CALLS = 300


class CallService:
    """Inserts calls as a platform's call service would: retrying each insert until it
    goes through (a retried insert is a no-op: the event is unique)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.inserted = 0
        self.failures = 0
        self._conn: asyncpg.Connection | None = None

    async def insert(self, event_type: str, body: dict[str, Any]) -> None:
        while True:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(self.url, timeout=2)
                await self._conn.execute(CALL_SERVICE_INSERT, event_type, json.dumps(body),
                                         None, None, timeout=2)
                self.inserted += 1
                return
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError, TimeoutError):
                self.failures += 1
                if self._conn is not None:
                    self._conn.terminate()
                    self._conn = None
                await asyncio.sleep(0.05)

    async def run(self) -> None:
        for n in range(CALLS):
            token = f"tok{n % ENTERPRISES + 1:04d}"
            await self.insert("dial", dial(n, token=token))
            await self.insert("hangup", hangup(n, token=token))
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_postgresql_restarts_under_load_lose_nothing(
    tmp_path: Path, upstream: FakeUpstream, http: aiohttp.ClientSession,
) -> None:
    cluster = ThrowawayCluster(tmp_path / "pg")
    if cluster.as_postgres:
        os.chmod(tmp_path, 0o755)
    server = await asyncio.to_thread(cluster.start)
    try:
        admin = await asyncpg.connect(server)
        # The throwaway cluster trades durability for speed; an immediate (crash) restart
        # would then lose the last commits it acknowledged. Durable, like production.
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            await admin.execute(f"ALTER SYSTEM SET {setting} = on")
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute("CREATE DATABASE crm")
        await admin.close()
        url = urlunsplit(urlsplit(server)._replace(path="/crm"))
        conn = await db.connect(url)
        try:
            await migrate(conn, load_migrations(find_sql_dir()))
        finally:
            await conn.close()
        env = settings_env(url, CRM_BRIDGE_INTEGRATION=FAKE, CRM_BRIDGE_POLL_INTERVAL_S="0.2",
                           CRM_BRIDGE_DB_COMMAND_TIMEOUT_S="2", CRM_BRIDGE_LISTENER_PROBE_S="1",
                           CRM_BRIDGE_RETRY_BASE_S="0.1", CRM_BRIDGE_RETRY_MAX_S="0.5")
        settings = load(env)
        pool = await db.create_pool(url, min_size=1, max_size=2)
        for n in range(1, ENTERPRISES + 1):
            await add_enterprise(pool, f"{n:04d}", token=f"tok{n:04d}",
                                 config=fake_config(settings, upstream.url, f"key-{n:04d}"))
        await pool.close()
        daemon = await start_process(env)
        service = CallService(url)
        seen: list[int] = []
        try:
            writer = asyncio.create_task(service.run())
            for mode in ("fast", "immediate", "fast"):
                await asyncio.sleep(1.5)
                restart = asyncio.create_task(asyncio.to_thread(cluster.restart, mode))
                while not restart.done():
                    seen.append(await _ready(http, daemon.url))
                    await asyncio.sleep(0.1)
                await restart
                deadline = time.monotonic() + 30
                while (status := await _ready(http, daemon.url)) != 200:
                    seen.append(status)
                    assert time.monotonic() < deadline, "not ready again within 30 s"
                    await asyncio.sleep(0.1)
                seen.append(status)
                assert daemon.proc.returncode is None, "the process stays up"
            await asyncio.wait_for(writer, 120)
            pool = await db.create_pool(url, min_size=1, max_size=2)
            try:
                await settled(pool, 2 * CALLS, timeout=120)
                events = {r["id"] for r in await pool.fetch("SELECT id FROM crm_events")}
                final = await statuses(pool)
            finally:
                await pool.close()
            assert daemon.proc.returncode is None
            code = await daemon.stop()
        finally:
            await service.close()
            if daemon.proc.returncode is None:
                await daemon.kill()
    finally:
        await asyncio.to_thread(cluster.destroy)
    assert code == 0
    assert len(events) == 2 * CALLS, "every call's insert went through in the end"
    assert final == {"done": 2 * CALLS}, "nothing lost, nothing dead-lettered"
    assert {r.event_id for r in upstream.delivered()} == events
    assert 503 in seen and seen[-1] == 200, "/ready said so, then recovered"
    lines = [line.get("event") for line in daemon.lines]
    assert "task_crashed" not in lines and "adapter_bug" not in lines
    assert lines.count("database_unavailable") >= 3
    assert lines.count("database_recovered") >= 3


async def _ready(http: aiohttp.ClientSession, url: str) -> int:
    try:
        async with http.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status
    except (aiohttp.ClientError, TimeoutError):
        return 0
