"""The Runtime: every long-lived object of one process, built once and torn down in reverse.

``build`` is the composition root's one place of construction (no singletons; set-up and
teardown in pairs): pool, HTTP sessions (one for the CRM, one for the PBX), metrics
registry, crypto, adapter, config cache, listener, ownership, dispatcher, log writers, the
journal's live feed, the PBX client, the click-to-call throttle and smart redirect. Each is
set up with its teardown pushed onto one ``AsyncExitStack``. web/ reaches the Runtime
through ``RUNTIME``; an adapter's callback routes get only ``callback_deps``
(``integrations/base.py``).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import structlog
from aiohttp import web

from daemon import __version__, db, egress, loopwatch, retention, store
from daemon.auditlog import AuditLog
from daemon.cache import ConfigCache
from daemon.crypto import Crypto
from daemon.db import DatabaseHealth
from daemon.dispatcher import Dispatcher
from daemon.feed import JournalFeed
from daemon.guards import Guards
from daemon.integrations import load as load_adapter
from daemon.integrations.base import Adapter, AdapterDeps, CallbackDeps, IntegrationConfig
from daemon.listener import Listener
from daemon.logs import OutcomeWriter
from daemon.metrics import Metrics
from daemon.migrate import find_sql_dir, load_migrations
from daemon.ownership import BEATS_PER_LEASE, Ownership
from daemon.pbx import Pbx
from daemon.pbx import new_session as pbx_session
from daemon.redirect import SmartRedirect
from daemon.retry import Policy
from daemon.settings import Settings
from daemon.supervisor import Supervisor
from daemon.throttle import Throttle

log = structlog.get_logger(__name__)

HTTP_CONNECT_TIMEOUT_S = 5.0
PBX_CONNECTIONS = 100  # one Asterisk service: click-to-call and transfers, not a backlog


@dataclass(slots=True)
class Runtime:
    """The process's long-lived objects. Built by ``build``; one per process (or per test)."""

    settings: Settings
    pool: asyncpg.Pool
    http: aiohttp.ClientSession
    metrics: Metrics
    crypto: Crypto
    adapter: Adapter
    supervisor: Supervisor
    cache: ConfigCache
    guards: Guards
    writer: OutcomeWriter
    ownership: Ownership
    dispatcher: Dispatcher
    listener: Listener | None
    health: DatabaseHealth
    migrations: frozenset[int]  # the versions this build's sql/ holds (``/ready``)
    feed: JournalFeed
    pbx: Pbx
    make_call_throttle: Throttle
    audit: AuditLog
    redirect: SmartRedirect
    started_at: float = field(default_factory=time.time)

    def callback_deps(self) -> CallbackDeps:
        """What the adapter's callback routes may use (their sub-application's
        ``CALLBACK_DEPS``)."""
        return CallbackDeps(
            integration=self.adapter.name, pool=self.pool,
            enterprise_by_secret=self.cache.matrix.by_secret, config_of=self._config_of,
            serving_config=self._serving_config, statuses_changed=self.redirect.forget,
            pbx=self.pbx,
            make_call_throttle=self.make_call_throttle, audit=self.audit,
            metrics=self.metrics,
        )

    def _config_of(self, enterprise: str) -> IntegrationConfig | None:
        entry = self.cache.get(enterprise)
        return entry.config if entry is not None else None

    def _serving_config(self, enterprise: str) -> IntegrationConfig | None:
        entry = self.cache.get(enterprise)
        return entry.config if entry is not None and entry.serves else None


RUNTIME = web.AppKey("runtime", Runtime)


@asynccontextmanager
async def build(settings: Settings) -> AsyncIterator[Runtime]:
    """Set everything up; on exit stop the background tasks and tear down in reverse."""
    async with AsyncExitStack() as stack:
        pool = await db.create_pool(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            command_timeout_s=settings.db_command_timeout_s,
            application_name=f"crm-bridge:{settings.integration}",
        )
        stack.push_async_callback(pool.close)
        http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=settings.attempt_timeout_s, connect=HTTP_CONNECT_TIMEOUT_S
            ),
            connector=egress.connector(allow_private=settings.allow_private_crm,
                                       limit=max(100, settings.concurrency)),
        )
        stack.push_async_callback(http.close)
        metrics = Metrics(settings.integration)
        health = DatabaseHealth(metrics)
        crypto = Crypto(settings.encryption_keys, settings.secret_key)
        adapter = load_adapter(
            settings.integration,
            AdapterDeps(
                crypto=crypto, http=http, pool=pool, public_url=settings.public_url,
                secret_key=settings.secret_key, settings=settings.adapter_settings(),
                health=health,
            ),
        )
        supervisor = Supervisor()
        cache = ConfigCache(pool, adapter, crypto, metrics, ttl_s=settings.config_ttl_s,
                            refresh_s=settings.config_refresh_s, health=health)
        stack.push_async_callback(cache.close)
        guards = Guards({**adapter.rate_limits, **dict(settings.rate_limits)},
                        settings.enterprise_concurrency, metrics)
        writer = OutcomeWriter(pool, adapter.name, metrics, health=health)
        ownership = Ownership(pool, adapter.name, settings.instance_id, metrics,
                              ownership_s=settings.ownership_s, health=health)
        doorbell_window_s = await store.doorbell_window_s(pool)
        dispatcher = Dispatcher(
            pool, adapter, cache, guards, writer, metrics, ownership,
            instance_id=settings.instance_id, http=http,
            policy=Policy(settings.max_attempts, settings.max_age_s, settings.retry_base_s,
                          settings.retry_max_s),
            concurrency=settings.concurrency, poll_interval_s=settings.poll_interval_s,
            attempt_timeout_s=settings.attempt_timeout_s, lease_s=settings.lease_s,
            grace_s=settings.shutdown_grace_s, notify=settings.notify,
            doorbell_window_s=doorbell_window_s,
            takeover_s=max(2 * settings.poll_interval_s,
                           settings.ownership_s / BEATS_PER_LEASE),
            max_lease_expiries=settings.max_lease_expiries, health=health,
        )
        ownership.busy = dispatcher.busy
        feed = JournalFeed(pool, adapter.name, metrics, doorbell_window_s=doorbell_window_s,
                           health=health)
        writer.on_written(feed.settled)
        listener = (_listener(settings, cache, dispatcher, feed, metrics, health)
                    if settings.notify else None)
        if listener is None:  # poll only: no LISTEN connection to report, nor to alert on
            metrics.registry.unregister(metrics.listener_connected)
        pbx_http = pbx_session(settings.pbx_timeout_s, connections=PBX_CONNECTIONS,
                               connect_timeout_s=HTTP_CONNECT_TIMEOUT_S)
        stack.push_async_callback(pbx_http.close)
        pbx = Pbx(pool, pbx_http, settings.pbx_url, timeout_s=settings.pbx_timeout_s,
                  metrics=metrics)
        audit = AuditLog(pool, metrics, health=health)
        redirect = SmartRedirect(cache, adapter, pool, audit, pbx, metrics,
                                 deadline_s=settings.smart_redirect_deadline_s,
                                 lookup_timeout_s=settings.attempt_timeout_s)
        stack.push_async_callback(redirect.close)
        runtime = Runtime(
            settings=settings, pool=pool, http=http, metrics=metrics, crypto=crypto,
            adapter=adapter, supervisor=supervisor, cache=cache, guards=guards, writer=writer,
            ownership=ownership, dispatcher=dispatcher, listener=listener, health=health,
            migrations=frozenset(m.version for m in
                                 load_migrations(find_sql_dir(settings.sql_dir))),
            feed=feed, pbx=pbx, make_call_throttle=Throttle(settings.make_call_rate),
            audit=audit, redirect=redirect,
        )
        metrics.info.labels(adapter.name, __version__, socket.gethostname()).set(1)
        await store.register_integration(pool, adapter.name, adapter.event_types)
        if listener is not None:
            stack.push_async_callback(listener.close)
            await listener.open()  # LISTEN first: then the startup load is the first catch-up
        await cache.refresh_all("startup")
        await ownership.beat()  # alive before the first claim: enterprises hash to us
        stack.push_async_callback(ownership.retire)
        stack.push_async_callback(supervisor.cancel_all)
        _start_tasks(runtime)
        yield runtime


def _listener(settings: Settings, cache: ConfigCache, dispatcher: Dispatcher,
              feed: JournalFeed, metrics: Metrics, health: DatabaseHealth) -> Listener:
    async def catch_up(since: float) -> None:
        await cache.catch_up(since)
        dispatcher.wake()
        feed.wake()

    def on_events(payload: str) -> None:
        dispatcher.doorbell(payload)
        feed.ring(payload)

    return Listener(
        settings.database_url,
        {"crm_events": on_events, "crm_config": lambda p: on_config(cache, p)},
        catch_up, metrics, probe_interval_s=settings.listener_probe_s,
        command_timeout_s=settings.db_command_timeout_s,
        application_name=f"crm-bridge:{settings.integration}:listener", health=health,
    )


def on_config(cache: ConfigCache, payload: str) -> None:
    """``NOTIFY crm_config`` → reload that enterprise. A malformed payload raises (dropped)."""
    enterprise = json.loads(payload)["enterprise"]
    if not isinstance(enterprise, str) or not enterprise:
        raise ValueError("crm_config payload without an enterprise")
    cache.invalidate(enterprise)


def _start_tasks(rt: Runtime) -> None:
    s, stopping = rt.settings, rt.supervisor.stopping
    spawn = rt.supervisor.spawn
    if rt.listener is not None:
        spawn("listener", rt.listener.run(stopping))
    spawn("config-refresher", rt.cache.run_refresher(stopping))
    spawn("ownership", rt.ownership.run(stopping))
    spawn("dispatcher", rt.dispatcher.run(stopping))
    spawn("outcome-writer", rt.writer.run(rt.dispatcher.finished))
    spawn("audit-log", rt.audit.run(stopping))
    spawn("queue-stats", rt.dispatcher.run_stats(stopping))
    spawn("journal-feed", rt.feed.run(stopping))
    spawn("loop-watch", loopwatch.run(rt.metrics, stopping))
    spawn("purger", retention.run_purger(rt.pool, s.retention_days * 86_400,
                                         s.purge_interval_s, rt.metrics, stopping,
                                         health=rt.health))
    for name, coro in rt.adapter.tasks(stopping).items():
        spawn(f"{rt.adapter.name}-{name}", coro)
