"""The responsible manager's extension for a calling number, against the simulator."""

from __future__ import annotations

import time

import asyncpg
import pytest

from daemon.crypto import Crypto
from daemon.errors import Retryable
from daemon.integrations.retailcrm import RetailCrmAdapter
from daemon.integrations.retailcrm.config import RetailCrmConfig
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


@pytest.mark.usefixtures("seeded")
async def test_the_manager_s_extension_whatever_the_format(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    for dialled in ("+375291234567", "375291234567", "80291234567", "8 (029) 123-45-67",
                    "291234567"):
        assert await adapter.responsible_extension(ENTERPRISE, config, dialled) == "102"
        request = sim.recorded(MANAGER_PATH)[-1]
        assert request.query["phone"] == "+375291234567", dialled  # normalised first
        assert request.query["ignoreStatus"] == "0"


@pytest.mark.usefixtures("seeded")
async def test_no_manager_no_extension_or_not_free_is_none(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    assert await adapter.responsible_extension(ENTERPRISE, config, "+375290000000") is None
    assert await adapter.responsible_extension(ENTERPRISE, config, "+375447654321") is None
    sim.users[2]["status"] = "dinner"
    assert await adapter.responsible_extension(ENTERPRISE, config, "+375291234567") is None
    sim.users[2]["status"] = "free"
    sim.configure(manager_404=True)  # the other reading of "no manager"
    assert await adapter.responsible_extension(ENTERPRISE, config, "+375290000000") is None
    count = len(sim.recorded(MANAGER_PATH))
    assert await adapter.responsible_extension(ENTERPRISE, config, "") is None
    assert await adapter.responsible_extension(ENTERPRISE, config, "150") is None
    assert len(sim.recorded(MANAGER_PATH)) == count  # nothing to ask about


@pytest.mark.usefixtures("seeded")
async def test_a_slow_crm_is_cut_off_at_the_timeout(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool
) -> None:
    config = await _config(adapter, pool)
    sim.add_fault(path=MANAGER_PATH, latency_ms=700)
    started = time.monotonic()
    with pytest.raises(Retryable) as info:
        await adapter.responsible_extension(ENTERPRISE, config, "+375291234567",
                                            timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    assert info.value.error_id == "timeout"
