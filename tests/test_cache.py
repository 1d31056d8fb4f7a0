"""The reactive core: LISTEN connection, ConfigCache, EnablementMatrix, config endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from daemon.cache import ConfigCache
from daemon.crypto import Crypto
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps
from daemon.metrics import Metrics
from daemon.runtime import on_config
from daemon.settings import Settings
from tests.conftest import TEST_SERVICE_TOKEN, settings_env
from tests.support.daemon import running, start_process
from tests.support.fakecrm import FAKE, fake_config
from tests.support.seed import add_enterprise
from tests.support.tcpproxy import proxy_to
from tests.support.waiting import wait_until

AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}


def _loads(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in metrics.cache_loads.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["reason"]] = sample.value
    return out


@pytest.fixture
async def cache_parts(pool: asyncpg.Pool, make_settings: Callable[..., Settings]):
    settings = make_settings(integration=FAKE)
    crypto = Crypto(settings.encryption_keys, settings.secret_key)
    async with aiohttp.ClientSession() as http:
        adapter = load(FAKE, AdapterDeps(crypto=crypto, http=http, pool=pool,
                                         public_url="http://x", secret_key="k" * 32))
        metrics = Metrics(adapter.name)
        cache = ConfigCache(pool, adapter, crypto, metrics, ttl_s=600, refresh_s=600)
        try:
            yield settings, cache, metrics
        finally:
            await cache.close()


async def test_a_config_update_reaches_the_cache_without_a_poll(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(integration=FAKE, config_refresh_s=600.0, config_ttl_s=600.0)
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://127.0.0.1:9", "k1"))
    async with running(settings) as daemon:
        cache = daemon.rt.cache
        assert cache.get("0367").serves
        started = time.monotonic()
        await pool.execute(
            """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                   '{fakecrm,enabled}', 'false') WHERE number = '0367'"""
        )
        await wait_until(lambda: not cache.get("0367").serves, timeout=5)
        assert time.monotonic() - started < 1.0, "NOTIFY, not the 600 s refresh or TTL"
        assert _loads(daemon.rt.metrics).get("notify", 0) >= 1
        assert cache.matrix.enabled("0367") == frozenset()


async def test_two_daemon_processes_both_see_a_change(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(integration=FAKE)
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://127.0.0.1:9", "k1"))
    env = settings_env(database_url, CRM_BRIDGE_INTEGRATION=FAKE,
                       CRM_BRIDGE_CONFIG_REFRESH_S="600", CRM_BRIDGE_CONFIG_TTL_S="600")
    daemons = [await start_process(env) for _ in range(2)]
    try:
        async with aiohttp.ClientSession(headers=AUTH) as http:
            for d in daemons:
                async with http.get(f"{d.url}/api/enablement/0367") as r:
                    assert (await r.json())["enabled"] == ["fakecrm"]
            await pool.execute(
                """UPDATE enterprises SET integrations_config = integrations_config
                       || '{"amocrm": {"enabled": true}}' WHERE number = '0367'"""
            )
            for d in daemons:
                for _ in range(100):
                    async with http.get(f"{d.url}/api/enablement/0367") as r:
                        if (await r.json())["enabled"] == ["amocrm", "fakecrm"]:
                            break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError(f"{d.url} never saw the change")
    finally:
        codes = [await d.stop() for d in daemons]
    assert codes == [0, 0]


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_listener_recovers_and_catches_up_after_termination(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings]
) -> None:
    parts = urlsplit(database_url)
    async with proxy_to(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        settings = make_settings(integration=FAKE, config_refresh_s=600.0, config_ttl_s=600.0,
                                 database_url=_via(database_url, proxy.port))
        await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
        async with running(settings) as daemon:
            listener = daemon.rt.listener
            assert listener is not None and listener.state.connected
            pid = listener.backend_pid
            proxy.blocked = True  # the listener cannot come back until we say so
            assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
            await wait_until(lambda: not listener.state.connected, timeout=5)
            # A change made while the listener is away: its NOTIFY is lost for good.
            await pool.execute(
                """UPDATE enterprises SET integrations_config = jsonb_set(integrations_config,
                       '{fakecrm,enabled}', 'false') WHERE number = '0367'"""
            )
            await asyncio.sleep(0.3)
            assert daemon.rt.cache.get("0367").serves, "nothing could have told it yet"
            proxy.blocked = False
            await wait_until(lambda: listener.state.connected, timeout=15)
            await wait_until(lambda: not daemon.rt.cache.get("0367").serves, timeout=5)
            assert listener.state.reconnects == 1
            assert listener.backend_pid != pid
            assert _loads(daemon.rt.metrics).get("connect", 0) >= 1


async def test_the_startup_load_is_the_first_catch_up(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(integration=FAKE, config_refresh_s=600.0, config_ttl_s=600.0)
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
    async with running(settings) as daemon:
        loads = _loads(daemon.rt.metrics)
        assert loads.get("startup") == 1 and "connect" not in loads, loads


async def test_catch_up_reloads_unless_a_refresh_began_after_listen(
    pool: asyncpg.Pool, cache_parts
) -> None:
    settings, cache, metrics = cache_parts
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
    await cache.refresh_all("startup")
    # A change whose notification nobody heard, then LISTEN: the load before it is stale.
    await add_enterprise(pool, "0367", config={"fakecrm": {"enabled": False}})
    listening_since = time.monotonic()
    await cache.catch_up(listening_since)
    assert not cache.get("0367").serves
    assert _loads(metrics).get("connect") == 1
    # A full refresh that began after LISTEN saw everything committed before it.
    await cache.refresh_all("startup")
    await cache.catch_up(listening_since)
    assert _loads(metrics).get("connect") == 1, "nothing left to catch up"
    await cache.catch_up(time.monotonic())  # a reconnect
    assert _loads(metrics).get("connect") == 2


async def test_a_paged_refresh_builds_what_loading_each_one_builds(
    pool: asyncpg.Pool, cache_parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, cache, _metrics = cache_parts
    for n in range(7):
        await add_enterprise(pool, f"05{n:02d}", active=n != 3, config={
            **fake_config(settings, "http://x:9", f"k{n}", enabled=n % 2 == 0),
            "amocrm": {"enabled": n > 2}, "bitrix": {"enabled": "yes"}, "other": [True]})
    await add_enterprise(pool, "0600", config={"fakecrm": "not an object",
                                               "amocrm": {"enabled": True}})
    await add_enterprise(pool, "0601", config={})
    # Not an object: only with the notify trigger (which rejects it) out of the way.
    await pool.execute("ALTER TABLE enterprises DISABLE TRIGGER crm_enterprises_notify")
    await pool.execute("UPDATE enterprises SET integrations_config = '[1]' WHERE number = '0601'")
    await pool.execute("ALTER TABLE enterprises ENABLE TRIGGER crm_enterprises_notify")
    await pool.execute("INSERT INTO crm_holds (enterprise_number, integration_type, reason) "
                       "VALUES ('0502', 'fakecrm', 'auth_failed'), "
                       "('0504', 'amocrm', 'deactivated')")
    monkeypatch.setattr("daemon.cache.PAGE", 2)
    assert await cache.refresh_all() == 9
    paged = {e.enterprise: dataclasses.replace(e, seq=0) for e in cache.entries()}
    for number in paged:
        await cache.load(number, "notify")
    assert {e.enterprise: dataclasses.replace(e, seq=0) for e in cache.entries()} == paged
    assert paged["0500"].enabled_types == frozenset({"fakecrm"})
    assert paged["0504"].enabled_types == frozenset({"fakecrm", "amocrm"})
    assert paged["0600"].enabled_types == frozenset({"amocrm"}) and paged["0600"].invalid
    assert paged["0601"].enabled_types == frozenset() and paged["0601"].config is None
    assert dict(paged["0502"].holds) == {"auth_failed": ""} and not paged["0504"].holds
    assert paged["0504"].enabled_types is paged["0506"].enabled_types, "one shared set"


async def test_single_flight_under_readers_and_a_notification_burst(
    pool: asyncpg.Pool, cache_parts
) -> None:
    settings, cache, metrics = cache_parts
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
    readers = [asyncio.create_task(cache.fetch("0367")) for _ in range(50)]
    for _ in range(20):
        on_config(cache, '{"enterprise": "0367", "keys": ["fakecrm"], "fields": []}')
    entries = await asyncio.gather(*readers)
    await wait_until(lambda: not cache._loads, timeout=5)
    assert all(e is not None and e.serves for e in entries)
    loads = _loads(metrics)
    assert 1 <= sum(loads.values()) <= 2, loads


async def test_a_malformed_config_leaves_the_others_intact(
    pool: asyncpg.Pool, cache_parts
) -> None:
    settings, cache, _metrics = cache_parts
    for n in range(5):
        await add_enterprise(pool, f"05{n:02d}",
                             config=fake_config(settings, "http://x:9", f"k{n}"))
    await add_enterprise(pool, "0666", config={"fakecrm": {"enabled": True, "url": 42,
                                                           "api_key": "gAAAA-not-a-token"}})
    await add_enterprise(pool, "0667", config={"fakecrm": {"enabled": True, "url": "http://x",
                                                           "api_key": "gAAAA-not-a-token"}})
    await cache.refresh_all()
    assert all(cache.get(f"05{n:02d}").serves for n in range(5))
    bad = cache.get("0666")
    assert bad.invalid == "url: expected an http(s) URL" and not bad.serves
    assert "cannot be decrypted" in cache.get("0667").invalid
    assert cache.held() == {"0666": "invalid_config", "0667": "invalid_config"}
    assert cache.matrix.enabled("0666") == frozenset()
    # A bad reload of one enterprise does not touch the others either.
    await add_enterprise(pool, "0500", config={"fakecrm": "not an object"})
    await cache.load("0500", "notify")
    assert cache.get("0500").invalid and all(cache.get(f"05{n:02d}").serves
                                             for n in range(1, 5))


async def test_a_stale_entry_is_served_while_its_reload_is_slow(
    pool: asyncpg.Pool, database_url: str, cache_parts
) -> None:
    settings, cache, _metrics = cache_parts
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
    await cache.refresh_all()
    stale = cache.get("0367")
    cache._entries["0367"] = dataclasses.replace(stale, expires_at=0.0)  # expire it now
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE crm_holds IN ACCESS EXCLUSIVE MODE")  # loads wait
        started = time.monotonic()
        served = cache.get("0367")  # starts the background reload, which now blocks
        assert served is not None and served.seq == stale.seq
        await asyncio.sleep(0.3)
        assert cache._loads, "the reload is still waiting on the lock"
        assert cache.get("0367").seq == stale.seq, "the stale entry is still served"
        assert time.monotonic() - started >= 0.3
        await tx.rollback()
    finally:
        await blocker.close()
    await wait_until(lambda: cache.get("0367").seq > stale.seq, timeout=5)


async def test_config_cache_endpoints(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(integration=FAKE)
    await add_enterprise(pool, "0367", config=fake_config(settings, "http://x:9", "k1"))
    await add_enterprise(pool, "0400", config={})
    async with running(settings) as daemon, aiohttp.ClientSession() as http:
        async with http.get(f"{daemon.url}/api/enablement/0367") as r:
            assert r.status == 401, "the service token is required"
        http.headers.update(AUTH)
        async with http.get(f"{daemon.url}/api/enablement/0400") as r:
            assert await r.json() == {"enterprise": "0400", "enabled": []}
        async with http.get(f"{daemon.url}/api/enablement/9999") as r:
            assert r.status == 404
        async with http.get(f"{daemon.url}/api/config-cache/active-enterprises") as r:
            assert (await r.json())["enterprises"] == ["0367"]
        # Bypass the trigger's NOTIFY path: change the row with the trigger disabled.
        await pool.execute("ALTER TABLE enterprises DISABLE TRIGGER crm_enterprises_notify")
        await pool.execute("UPDATE enterprises SET integrations_config = "
                           "'{\"amocrm\": {\"enabled\": true}}' WHERE number = '0400'")
        await pool.execute("ALTER TABLE enterprises ENABLE TRIGGER crm_enterprises_notify")
        async with http.post(f"{daemon.url}/api/config-cache/refresh/0400") as r:
            body = await r.json()
            assert body["enabled"] == ["amocrm"] and body["serves"] is False
        async with http.post(f"{daemon.url}/api/config-cache/refresh-all") as r:
            assert (await r.json())["entries"] == 2
        async with http.get(f"{daemon.url}/stats") as r:
            stats = await r.json()
            assert stats["listener"]["connected"] is True
            assert stats["cache"]["entries"] == 2
            assert "dispatcher" in stats["tasks"]
            assert set(stats) >= {"smart_redirect", "database", "guards"}
            assert stats["smart_redirect"]["cached_callers"] == 0
