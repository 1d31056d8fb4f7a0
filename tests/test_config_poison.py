"""One enterprise's unusable configuration — unreadable JSON, wrong types anywhere — marks
that enterprise invalid and never fails start-up, a load, a full refresh or the refresher."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations.retailcrm import config as retailcrm_config
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, TEST_SERVICE_TOKEN
from tests.support.daemon import running
from tests.support.fakecrm import FAKE, fake_config
from tests.support.seed import add_enterprise
from tests.support.waiting import wait_until

AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
DEEP = 3_000
LONG_NUMBER = "9" * 5_000


async def _put_text(url: str, number: str, config: str) -> None:
    """An enterprise whose integrations_config is ``config`` (JSON text, stored as it is)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO enterprises (number, name2, active, integrations_config) "
            "VALUES ($1, $2, true, $3::jsonb)", number, f"tok{number}", config)
    finally:
        await conn.close()


def _with(good: dict[str, Any], **raw: str) -> str:
    """``{"fakecrm": good + raw}`` as JSON text, ``raw`` values being JSON text themselves."""
    text = json.dumps(good)[:-1]
    return '{"fakecrm": ' + text + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}}"


async def test_unusable_configurations_mark_their_enterprise_invalid_only(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(integration=FAKE, config_refresh_s=0.3)
    good = fake_config(settings, "http://127.0.0.1:9", "key")["fakecrm"]
    await add_enterprise(pool, "0001", config={"fakecrm": good})
    await _put_text(database_url, "0002", _with(good, big=LONG_NUMBER))
    await _put_text(database_url, "0003", _with(good, deep="[" * DEEP + "]" * DEEP))
    await _put_text(database_url, "0004", '{"fakecrm": [1, 2]}')
    await _put_text(database_url, "0005", _with({**good, "url": 5}))
    # Another integration's key is never decoded here: its oddities are not ours.
    await _put_text(database_url, "0006", json.dumps({"fakecrm": good})[:-1]
                    + ', "amocrm": {"n": ' + LONG_NUMBER + "}}")
    async with running(settings) as daemon:  # start-up loads them all
        cache = daemon.rt.cache
        assert {e.enterprise for e in cache.entries() if e.serves} == {"0001", "0006"}
        invalid = cache.stats()["invalid"]
        assert invalid == {
            "0002": "fakecrm: the stored configuration cannot be read: holds a number too "
                    "long to read",
            "0003": "fakecrm: the stored configuration cannot be read: nested too deeply to "
                    "read",
            "0004": "fakecrm: expected an object",
            "0005": "url: expected an http(s) URL",
        }
        assert cache.held() == dict.fromkeys(invalid, "invalid_config")
        async with http.get(f"{daemon.url}/stats", headers=AUTH) as r:
            assert r.status == 200
            assert (await r.json())["cache"]["invalid"] == invalid
        async with http.post(f"{daemon.url}/api/config-cache/refresh/0002", headers=AUTH) as r:
            assert r.status == 200
            body = await r.json()
            assert (body["invalid"], body["held"], body["serves"]) == (
                invalid["0002"], "invalid_config", False)
        async with http.post(f"{daemon.url}/api/config-cache/refresh-all", headers=AUTH) as r:
            assert (r.status, await r.json()) == (200, {"entries": 6})
        # A change breaking a good one arrives by NOTIFY; the periodic refresher goes on.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE enterprises SET integrations_config = $1::jsonb WHERE number = '0001'",
                _with(good, deep="{\"a\": " * DEEP + "1" + "}" * DEEP))
        finally:
            await conn.close()
        await wait_until(lambda: "0001" in cache.stats()["invalid"], timeout=5)
        refreshed = cache.last_full_refresh_at
        await wait_until(lambda: (cache.last_full_refresh_at or 0) > (refreshed or 0),
                         timeout=5)
        assert "config-refresher" in daemon.rt.supervisor.names
        assert daemon.rt.metrics.cache_invalid._value.get() == 5


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_KEYS = ("enabled", "domain", "api_key", "client_id", "popup_incoming", "popup_outgoing",
         "popup_hangup", "upload_history", "upload_recordings", "log_internal", "time_zone",
         "crm_time_zone", "region", "user_extensions", "external_phones", "site_code",
         "token_version", "last_sync", "sync_pending")


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=8))
def test_retailcrm_config_of_any_shape_parses_or_names_the_field(raw: dict[str, Any]) -> None:
    # Whatever stands under each key, the parser answers with a config or a ConfigError:
    # never another exception (the cache would still survive one, as a logged bug).
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    started = time.monotonic()
    field: str | None = None
    try:
        retailcrm_config.parse(raw, crypto)
    except ConfigError as exc:
        field = exc.field
    assert field is None or field in _KEYS or field.split(".")[0] in _KEYS
    assert time.monotonic() - started < 1.0
