"""Fixtures of the RetailCRM tests: the simulator, the adapter on a real database, seed data.

Test modules that define their own ``sim`` or ``http`` fixture (test_client, test_simulator)
keep theirs: a module's fixture wins over these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from daemon.crypto import Crypto
from daemon.integrations.base import AdapterDeps
from daemon.integrations.retailcrm import RetailCrmAdapter, create_adapter
from daemon.integrations.retailcrm.simulator import Simulator, make_users, running_simulator
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY
from tests.support.seed import add_enterprise

KEY = "rcrm-KEY-5ecret-0123456789abcdef"
PUBLIC = "https://bridge.example.by"
ENTERPRISE = "0367"
CALLER = "+375291234567"
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
