"""Fixtures of the RetailCRM tests: the simulator, the adapter on a real database, seed data.

Test modules that define their own ``sim`` or ``http`` fixture (test_client, test_simulator)
keep theirs: a module's fixture wins over these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from daemon.crypto import Crypto
from daemon.integrations.base import AdapterDeps
from daemon.integrations.retailcrm import RetailCrmAdapter, create_adapter
from daemon.integrations.retailcrm.simulator import Simulator, make_users, running_simulator
from daemon.pbx_simulator import PbxSimulator, running_pbx
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY
from tests.support.daemon import InProcess, running
from tests.support.seed import add_enterprise

KEY = "rcrm-KEY-5ecret-0123456789abcdef"
PUBLIC = "https://bridge.example.by"
ENTERPRISE = "0367"
CALLER = "+375291234567"
OTHER = "0368"
# RetailCRM's callback secrets of the two enterprises the telephony tests run.
CLIENT_ID = "cid-0367-7sQm1l0aX9vB2nR4kT6yW8zC3dF5gH7jK"
OTHER_CLIENT_ID = "cid-0368-Lp0oK9iJ8uH7yG6tF5rD4eS3wA2qZ1xC"
# Another integration's key in the same column: every write must leave it exactly as it is.
AMOCRM = {"enabled": True, "domain": "shop.amocrm.ru", "token": "amo-Token-не-трогать",
          "nested": {"list": [1, 2.5, None, "x"], "flag": False}}


@pytest.fixture
def crypto() -> Crypto:
    return Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    users = [*make_users(5), {"id": 6, "firstName": "Gone", "lastName": "Away", "active": False}]
    simulator = Simulator(api_keys=[KEY], users=users, managers={CALLER: 2})
    async with running_simulator(simulator) as running:
        yield running


@pytest.fixture
def adapter(pool: asyncpg.Pool, http: aiohttp.ClientSession, crypto: Crypto) -> RetailCrmAdapter:
    return create_adapter(AdapterDeps(
        crypto=crypto, http=http, pool=pool, public_url=PUBLIC, secret_key=TEST_SECRET_KEY,
        settings={"retailcrm_module_code": "vochi-telephony",
                  "retailcrm_module_name": "Vochi-CRM", "allow_private_crm": True}))


def retailcrm_config(crypto: Crypto, domain: str, key: str = KEY, **extra: Any) -> dict[str, Any]:
    """A stored retailcrm key (the API key encrypted, as the CLI stores it)."""
    return {"enabled": True, "domain": domain, "api_key": crypto.encrypt(key), **extra}


async def seed(
    pool: asyncpg.Pool, crypto: Crypto, domain: str, *, enterprise: str = ENTERPRISE,
    numbers: Iterable[str] = ("101", "102", "103"), key: str = KEY, **extra: Any,
) -> None:
    """An enterprise with amocrm + retailcrm configured and its internal numbers (owned by
    platform users named after them)."""
    await add_enterprise(pool, enterprise, token=f"tok{enterprise}", config={
        "amocrm": AMOCRM, "retailcrm": retailcrm_config(crypto, domain, key, **extra)})
    for number in numbers:
        user_id = await pool.fetchval(
            "INSERT INTO users (first_name, last_name) VALUES ($1, $2) RETURNING id",
            "Owner", number)
        await pool.execute(
            "INSERT INTO user_internal_phones (enterprise_number, phone_number, user_id) "
            "VALUES ($1, $2, $3)", enterprise, number, user_id)


async def amocrm_text(pool: asyncpg.Pool, enterprise: str = ENTERPRISE) -> str:
    """The amocrm key exactly as stored (jsonb's text form)."""
    value: str = await pool.fetchval(
        "SELECT (integrations_config -> 'amocrm')::text FROM enterprises WHERE number = $1",
        enterprise)
    return value


async def stored(pool: asyncpg.Pool, enterprise: str = ENTERPRISE) -> dict[str, Any]:
    """The retailcrm key as stored (secrets still encrypted)."""
    value = await pool.fetchval(
        "SELECT integrations_config -> 'retailcrm' FROM enterprises WHERE number = $1",
        enterprise)
    assert isinstance(value, Mapping)
    return dict(value)


@pytest_asyncio.fixture
async def pbx() -> AsyncIterator[PbxSimulator]:
    """The PBX simulator, knowing both enterprises' secrets (``secret-<number>``)."""
    simulator = PbxSimulator({f"secret-{ENTERPRISE}": ENTERPRISE, f"secret-{OTHER}": OTHER})
    async with running_pbx(simulator) as running_sim:
        yield running_sim


Telephony = Callable[..., AbstractAsyncContextManager[InProcess]]


@pytest.fixture
def telephony(sim: Simulator, pbx: PbxSimulator, pool: asyncpg.Pool, crypto: Crypto,
              make_settings: Callable[..., Settings]) -> Telephony:
    """``async with telephony(**settings) as daemon``: the daemon in this process with
    enterprise 0367 (numbers 101-103; manager 1 → 101, 2 → 102; ``CLIENT_ID``) and 0368
    (numbers 201-202; manager 1 → 201; ``OTHER_CLIENT_ID``) on the RetailCRM simulator,
    calls going to the PBX simulator."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[InProcess]:
        await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"},
                   client_id=crypto.encrypt(CLIENT_ID))
        await seed(pool, crypto, sim.url, enterprise=OTHER, numbers=("201", "202"),
                   user_extensions={"1": "201"}, client_id=crypto.encrypt(OTHER_CLIENT_ID))
        async with running(make_settings(pbx_url=pbx.url, **overrides)) as daemon:
            yield daemon

    return start
