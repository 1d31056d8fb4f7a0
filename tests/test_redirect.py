"""Smart redirect's core rules, with a CRM that is slow or broken on purpose: the deadline
is the deadline, a late answer lands in the cache, a crashing adapter routes the call anyway,
and a full cache drops its oldest callers at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest_asyncio

from daemon.integrations.base import IntegrationConfig, Responsible, Route
from daemon.redirect import SmartRedirect
from daemon.runtime import Runtime
from daemon.settings import Settings
from tests.support.daemon import running
from tests.support.fakecrm import FAKE, FakeCrmAdapter, fake_config
from tests.support.seed import add_enterprise

ENTERPRISE = "0367"
CALLER = "+375291234567"


class ScriptedCrm(FakeCrmAdapter):
    """The fake CRM whose look-up waits ``delay_s``, then names manager 7 (on 150) or
    raises ``error``."""

    def __init__(self, runtime: Runtime, delay_s: float = 0.0,
                 error: Exception | None = None) -> None:
        super().__init__(runtime.adapter._deps)  # type: ignore[attr-defined]
        self.delay_s = delay_s
        self.error = error
        self.calls = 0

    async def responsible_manager(self, enterprise: str, config: IntegrationConfig,
                                  phone: str, *, timeout_s: float = 1.0) -> Responsible:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return Responsible(customer_id="1", manager_id="7", manager_status="free")

    def route(self, config: IntegrationConfig, found: Responsible,
              statuses: Mapping[str, str]) -> Route:
        return Route("150" if found.manager_id == "7" else None, None)


@pytest_asyncio.fixture
async def rt(make_settings: Callable[..., Settings], pool: Any) -> AsyncIterator[Runtime]:
    settings = make_settings(integration=FAKE)
    await add_enterprise(pool, ENTERPRISE,
                         config=fake_config(settings, "http://127.0.0.1:9", "k"))
    await pool.execute("INSERT INTO user_internal_phones (enterprise_number, phone_number) "
                       "VALUES ($1, '150')", ENTERPRISE)
    async with running(settings) as daemon:
        yield daemon.rt


def smart(rt: Runtime, crm: ScriptedCrm, deadline_s: float, **options: Any) -> SmartRedirect:
    return SmartRedirect(rt.cache, crm, rt.pool, rt.audit, rt.pbx, rt.metrics,
                         deadline_s=deadline_s, lookup_timeout_s=5.0, **options)


async def test_the_deadline_holds_and_the_late_answer_is_kept(rt: Runtime) -> None:
    crm = ScriptedCrm(rt, delay_s=0.5)
    service = smart(rt, crm, deadline_s=0.2)
    entry = rt.cache.get(ENTERPRISE)
    assert entry is not None
    try:
        started = time.monotonic()
        answers = await asyncio.gather(*[service.answer(entry, CALLER) for _ in range(20)])
        elapsed = time.monotonic() - started
        assert {(a.extension, a.reason) for a in answers} == {(None, "timeout")}
        assert 0.19 <= elapsed < 0.3, elapsed
        assert crm.calls == 1  # twenty calls from one number, one look-up
        await asyncio.sleep(0.4)  # the look-up finishes meanwhile, into the cache
        cached = await service.answer(entry, CALLER)
        assert (cached.extension, cached.source) == ("150", "cache")
        assert crm.calls == 1
    finally:
        await service.close()


async def test_a_crashing_adapter_is_counted_and_the_call_still_routed(rt: Runtime) -> None:
    crm = ScriptedCrm(rt, error=RuntimeError("bug"))
    service = smart(rt, crm, deadline_s=1.0)
    entry = rt.cache.get(ENTERPRISE)
    assert entry is not None
    bugs = rt.metrics.registry.get_sample_value("crm_bridge_adapter_bugs_total") or 0.0
    try:
        answer = await service.answer(entry, CALLER)
        assert (answer.extension, answer.reason) == (None, "crm_unavailable")
        assert rt.metrics.registry.get_sample_value("crm_bridge_adapter_bugs_total") == \
            bugs + 1
    finally:
        await service.close()


async def test_a_full_cache_drops_its_oldest_tenth_at_once(rt: Runtime) -> None:
    crm = ScriptedCrm(rt)
    service = smart(rt, crm, deadline_s=1.0, max_cached=100)
    entry = rt.cache.get(ENTERPRISE)
    assert entry is not None
    try:
        for n in range(100):
            await service.answer(entry, f"+3752900{n:05d}")
        assert service.stats()["cached_callers"] == 100
        await service.answer(entry, "+375299999999")
        assert service.stats()["cached_callers"] == 91
        assert (await service.answer(entry, "+375299999999")).source == "cache"
        assert (await service.answer(entry, "+375290000000")).source == "fakecrm"  # gone
    finally:
        await service.close()
