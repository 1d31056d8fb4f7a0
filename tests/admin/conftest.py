"""Fixtures of the admin UI and API tests: the real daemon in-process on a real database,
the RetailCRM simulator as the enterprises' account, and browsers-to-be (HTTP clients with
their own cookie jars) signed in through real admin links."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from daemon import links
from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator, make_users, running_simulator
from daemon.runtime import Runtime
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, TEST_SERVICE_TOKEN
from tests.retailcrm.conftest import CALLER, KEY, seed
from tests.support.daemon import running

A = "0367"
B = "0999"
PREFIX = "/retailcrm-admin"
SERVICE = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
_CSRF = re.compile(r'<meta name="csrf-token" content="([0-9a-f]+)">')


@dataclass(slots=True)
class Bridge:
    """The daemon under test."""

    url: str
    rt: Runtime
    pool: asyncpg.Pool

    async def link(self, enterprise: str, **options: Any) -> str:
        """An admin link's token for ``enterprise``, as ``crm-bridge admin-link`` makes."""
        token = await links.issue(self.pool, TEST_SECRET_KEY, enterprise, "retailcrm",
                                  **options)
        assert token is not None
        return token


@dataclass(slots=True)
class Browser:
    """An HTTP client with its own cookies, signed in (or not) to one enterprise."""

    http: aiohttp.ClientSession
    url: str
    csrf: str = ""

    async def sign_in(self, bridge: Bridge, enterprise: str) -> aiohttp.ClientResponse:
        token = await bridge.link(enterprise)
        response = await self.http.get(f"{self.url}{PREFIX}/?token={token}",
                                       allow_redirects=False)
        assert response.status == 303, await response.text()
        page = await self.http.get(f"{self.url}{PREFIX}/{enterprise}/connection")
        assert page.status == 200, await page.text()
        found = _CSRF.search(await page.text())
        assert found is not None
        self.csrf = found.group(1)
        return response

    def headers(self) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf}


@pytest.fixture
def crypto() -> Crypto:
    return Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)


@pytest_asyncio.fixture
async def admin_sim() -> AsyncIterator[Simulator]:
    users = [*make_users(3), {"id": 4, "firstName": "<script>alert(1)</script>",
                              "lastName": "Хакер", "status": "dinner"}]
    async with running_simulator(Simulator(api_keys=[KEY], users=users,
                                           managers={CALLER: 2})) as sim:
        yield sim


@pytest_asyncio.fixture
async def bridge(pool: asyncpg.Pool, crypto: Crypto, admin_sim: Simulator,
                 make_settings: Callable[..., Settings]) -> AsyncIterator[Bridge]:
    await seed(pool, crypto, admin_sim.url, enterprise=A, numbers=("101", "102", "103"))
    await seed(pool, crypto, admin_sim.url, enterprise=B, numbers=("201",))
    async with running(make_settings(poll_interval_s=0.2)) as daemon:
        yield Bridge(daemon.url, daemon.rt, pool)


@pytest_asyncio.fixture
async def browser(bridge: Bridge) -> AsyncIterator[Browser]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar,
                                     timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Browser(http, bridge.url)


@pytest_asyncio.fixture
async def other_browser(bridge: Bridge) -> AsyncIterator[Browser]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar,
                                     timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield Browser(http, bridge.url)
