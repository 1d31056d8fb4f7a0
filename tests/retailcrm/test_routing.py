"""The responsible manager for a calling number, against the simulator, and the decision
which extension rings first."""

from __future__ import annotations

import time

import asyncpg
import pytest

from daemon.crypto import Crypto
from daemon.errors import Retryable
from daemon.integrations.base import Responsible, Route
from daemon.integrations.retailcrm import RetailCrmAdapter
from daemon.integrations.retailcrm.config import RetailCrmConfig
from daemon.integrations.retailcrm.routing import customer_name, decide
from daemon.integrations.retailcrm.simulator import Simulator
from tests.retailcrm.conftest import ENTERPRISE, seed, stored

MANAGER_PATH = "/api/v5/telephony/manager"


async def _config(adapter: RetailCrmAdapter, pool: asyncpg.Pool) -> RetailCrmConfig:
    return adapter.parse_config(await stored(pool))


@pytest.fixture
async def seeded(sim: Simulator, pool: asyncpg.Pool, crypto: Crypto) -> None:
    # Manager 2 is responsible for +375291234567 (the conftest's CALLER) and has 102;
    # manager 3 is responsible for another customer and has no number.
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    sim.set_managers({"+375291234567": 2, "+375447654321": 3})
    sim.set_customers({"+375291234567": {"firstName": "Мария", "lastName": "Козлова"},
                       "+375336660000": {"nickName": "ООО Ромашка"}})


@pytest.mark.usefixtures("seeded")
async def test_the_manager_and_customer_whatever_the_format(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    for dialled in ("+375291234567", "375291234567", "80291234567", "8 (029) 123-45-67",
                    "291234567"):
        found = await adapter.responsible_manager(ENTERPRISE, config, dialled)
        assert found.manager_id == "2" and found.manager_status == "free"
        assert found.customer_name == "Мария Козлова" and found.customer_id is not None
        assert found.manager_name == sim.users[2]["firstName"] + " " + sim.users[2]["lastName"]
        assert adapter.route(config, found, {}) == Route("102")
        request = sim.recorded(MANAGER_PATH)[-1]
        assert request.query["phone"] == "+375291234567", dialled  # normalised first
        # RetailCRM names the manager whatever their status; ``route`` applies our rule.
        assert request.query["ignoreStatus"] == "1" and request.query["details"] == "1"


@pytest.mark.usefixtures("seeded")
async def test_no_customer_no_manager_no_extension(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    nobody = await adapter.responsible_manager(ENTERPRISE, config, "+375290000000")
    assert nobody == Responsible()
    assert adapter.route(config, nobody, {}) == Route(None, "no_customer")
    company = await adapter.responsible_manager(ENTERPRISE, config, "+375336660000")
    assert company.customer_name == "ООО Ромашка" and company.manager_id is None
    assert adapter.route(config, company, {}) == Route(None, "no_manager")
    unmapped = await adapter.responsible_manager(ENTERPRISE, config, "+375447654321")
    assert unmapped.manager_id == "3"
    assert adapter.route(config, unmapped, {}) == Route(None, "no_extension")
    sim.configure(manager_404=True)  # the other reading of "no manager"
    assert await adapter.responsible_manager(ENTERPRISE, config, "+375290000000") == Responsible()
    count = len(sim.recorded(MANAGER_PATH))
    assert await adapter.responsible_manager(ENTERPRISE, config, "") == Responsible()
    assert await adapter.responsible_manager(ENTERPRISE, config, "150") == Responsible()
    assert len(sim.recorded(MANAGER_PATH)) == count  # nothing to ask about


@pytest.mark.usefixtures("seeded")
async def test_a_manager_away_is_not_rung_unless_the_enterprise_says_so(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    sim.users[2]["status"] = "dinner"
    found = await adapter.responsible_manager(ENTERPRISE, config, "+375291234567")
    assert found.manager_status == "dinner"
    assert adapter.route(config, found, {}) == Route(None, "manager_away")
    # The status RetailCRM reported through its callback is the newer word.
    assert adapter.route(config, found, {"2": "free"}) == Route("102")
    assert adapter.route(config, found, {"2": "break"}) == Route(None, "manager_away")
    assert adapter.route(config, found, {"2": "busy"}) == Route("102")  # the PBX can queue
    assert adapter.route(config, found, {"3": "break"}) == Route(None, "manager_away")
    keen = adapter.parse_config({**await stored(pool), "skip_away_managers": False})
    assert adapter.route(keen, found, {"2": "break"}) == Route("102")


def test_decide_reads_only_its_inputs() -> None:
    config = RetailCrmConfig(enabled=True, domain="https://x.retailcrm.ru", api_key="k",
                             user_extensions={"7": "150"})
    who = Responsible(customer_id="9", manager_id="7", manager_status="free")
    assert decide(config, who, {}) == Route("150")
    assert decide(config, who, {"7": "dinner"}) == Route(None, "manager_away")
    assert customer_name({"firstName": " ", "lastName": "", "nickName": "ИП Петров"}) == \
        "ИП Петров"
    assert customer_name({"id": 1}) is None


@pytest.mark.usefixtures("seeded")
async def test_a_slow_crm_is_cut_off_at_the_timeout(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    sim.add_fault(path=MANAGER_PATH, latency_ms=700)
    started = time.monotonic()
    with pytest.raises(Retryable) as info:
        await adapter.responsible_manager(ENTERPRISE, config, "+375291234567", timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    assert info.value.error_id == "timeout"
