"""Fixtures shared by the whole suite: a real PostgreSQL per test, settings, pools."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
import hypothesis
import pytest
import pytest_asyncio

from daemon import db
from daemon.settings import Settings, load
from tests.support import pg
from tests.support.fakecrm import FakeUpstream, running_upstream

TEST_SECRET_KEY = "test-secret-key-0123456789abcdef-0123456789"
TEST_FERNET_KEY = "hHTp3ZkJ7l7yG4Yh8hB8n6dO5S6dC3m4fS9Xf2h7gKk="
TEST_SERVICE_TOKEN = "test-service-token-abcdefghijklmnop"

# Property tests: a bounded run inside `make test` (the suite stays within minutes on two
# cores); HYPOTHESIS_PROFILE=thorough for a long hunt.
hypothesis.settings.register_profile(
    "suite", max_examples=150, deadline=timedelta(seconds=5), print_blob=True)
hypothesis.settings.register_profile("thorough", max_examples=3000, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The session's PostgreSQL server URL, with the migrated template database."""
    with pg.server() as url:
        pg.create_template(url)
        try:
            yield url
        finally:
            pg.drop_template(url)


@pytest_asyncio.fixture
async def database_url(pg_server: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name, url = await pg.clone(pg_server)
    try:
        yield url
    finally:
        await pg.drop(pg_server, name)


@pytest_asyncio.fixture
async def empty_database_url(pg_server: str) -> AsyncIterator[str]:
    """An empty database (no migrations) of this test's own."""
    name, url = await pg.clone(pg_server, template=None)
    try:
        yield url
    finally:
        await pg.drop(pg_server, name)


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's database."""
    p = await db.create_pool(database_url, min_size=1, max_size=5)
    try:
        yield p
    finally:
        await p.close()


def settings_env(database_url: str, **extra: str) -> dict[str, str]:
    """A complete, valid environment for the daemon on ``database_url``."""
    env = {
        "CRM_BRIDGE_DATABASE_URL": database_url,
        "CRM_BRIDGE_SECRET_KEY": TEST_SECRET_KEY,
        "CRM_BRIDGE_ENCRYPTION_KEYS": TEST_FERNET_KEY,
        "CRM_BRIDGE_SERVICE_TOKEN": TEST_SERVICE_TOKEN,
        "CRM_BRIDGE_PUBLIC_URL": "http://127.0.0.1:8019",
        "CRM_BRIDGE_LOG_FORMAT": "json",
        # The simulators listen on 127.0.0.1 over plain http.
        "CRM_BRIDGE_ALLOW_PRIVATE_CRM": "1",
    }
    env.update(extra)
    return env


@pytest.fixture
def make_settings(database_url: str) -> Callable[..., Settings]:
    """``make_settings(port=0, integration=..., ...)``: Settings for this test's database."""

    def build(**overrides: Any) -> Settings:
        return load(settings_env(database_url), **overrides)

    return build


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """The fake CRM the test adapter (tests.support.fakecrm) delivers to."""
    async with running_upstream() as up:
        yield up


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to servers under test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
