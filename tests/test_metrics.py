"""The metrics as Prometheus sees them: labels that do not collide with its own, no
``_created`` series, a breaker series only while the breaker is not closed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from daemon import __version__, db
from daemon.cache import ConfigCache
from daemon.crypto import Crypto
from daemon.guards import Guards
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps
from daemon.metrics import Metrics
from daemon.settings import Settings
from tests.support.daemon import running
from tests.support.fakecrm import FAKE
from tests.support.waiting import wait_until
from tests.test_guards import Clock


def _samples(text: str) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for family in text_string_to_metric_families(text)
            for s in family.samples]


async def test_the_scraped_series_carry_no_instance_label_and_no_created_series(
    make_settings: Callable[..., Settings],
) -> None:
    async with running(make_settings(integration=FAKE)) as daemon, \
            aiohttp.ClientSession() as http, http.get(f"{daemon.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
        integration = daemon.rt.adapter.name
    samples = _samples(text)
    info = [labels for name, labels in samples if name == "crm_bridge_info"]
    assert info == [{"integration": integration, "version": __version__,
                     "host": socket.gethostname()}], "the same series after a restart"
    assert all("instance" not in labels for _name, labels in samples), \
        "Prometheus owns the instance label: ours would be renamed exported_instance"
    assert not [name for name, _ in samples if name.endswith("_created")]
    assert "crm_bridge_deliveries_total" in text, "counters are there, only _created is not"
    names = {name for name, _ in samples}
    assert "crm_bridge_notification_queue_usage_ratio" in names
    assert "crm_bridge_notification_queue_usage" not in names


def test_dropping_created_series_is_this_registry_s_choice_alone() -> None:
    other = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("other_things", "x", registry=other).inc()
    Metrics("t").render()
    assert "other_things_created" in prometheus_client.generate_latest(other).decode()


def _breaker(metrics: Metrics, enterprise: str) -> float | None:
    return metrics.registry.get_sample_value("crm_bridge_breaker_state",
                                             {"enterprise": enterprise})


def test_a_breaker_has_a_series_only_while_it_is_not_closed() -> None:
    clock, metrics = Clock(), Metrics("t")
    guards = Guards({"default": 10}, 4, metrics, threshold=2, cooldown_s=2.0, clock=clock)
    guards.failed("0367")
    assert _breaker(metrics, "0367") is None, "failing but still closed: no series"
    guards.failed("0367")
    assert _breaker(metrics, "0367") == 2, "open"
    clock.now += 2.0
    assert guards.admit("0367") is None
    assert _breaker(metrics, "0367") == 1, "half-open"
    guards.succeeded("0367")
    assert _breaker(metrics, "0367") is None, "closed: the series is gone"
    assert "crm_bridge_breaker_state{" not in metrics.render().decode()
    guards.succeeded("0368")  # an enterprise that never failed
    assert "crm_bridge_breaker_state{" not in metrics.render().decode()


async def test_a_failed_config_load_is_counted(
    database_url: str, make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(integration=FAKE)
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    await pool.close()  # every load now fails as a lost database does
    crypto = Crypto(settings.encryption_keys, settings.secret_key)
    metrics = Metrics("t")
    stopping = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        adapter = load(FAKE, AdapterDeps(crypto=crypto, http=http, pool=pool,
                                         public_url="http://x", secret_key="k" * 32))
        cache = ConfigCache(pool, adapter, crypto, metrics, ttl_s=600, refresh_s=0.01)
        refresher = asyncio.create_task(cache.run_refresher(stopping))
        try:
            await wait_until(lambda: metrics.registry.get_sample_value(
                "crm_bridge_config_load_failures_total", {"scope": "all"}))
            cache.invalidate("0367")
            await wait_until(lambda: metrics.registry.get_sample_value(
                "crm_bridge_config_load_failures_total", {"scope": "one"}))
        finally:
            stopping.set()
            await asyncio.wait_for(refresher, 5)
            await cache.close()
