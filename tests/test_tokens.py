"""Tenant identity: one Token rule in the SQL trigger, the in-memory index and the HTTP
ingest; ambiguity refused everywhere; the index follows every change at once; and no event
ever reaches a CRM with another enterprise's key."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from daemon.cache import AmbiguousToken, ConfigCache, EnablementMatrix, Entry
from daemon.crypto import Crypto
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps
from daemon.metrics import Metrics
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, TEST_SERVICE_TOKEN
from tests.support.bodies import dial
from tests.support.daemon import running
from tests.support.fakecrm import FAKE, FakeUpstream, fake_config
from tests.support.seed import insert_event, register
from tests.support.waiting import wait_until
from tests.test_delivery import settled
from tests.test_operations import cli

AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class Ent:
    number: str
    name2: str | None = None
    secret: str | None = None
    active: bool = True


async def _put(pool: asyncpg.Pool, settings: Settings, url: str, *enterprises: Ent) -> None:
    for e in enterprises:
        await pool.execute(
            "INSERT INTO enterprises (number, name2, secret, active, integrations_config) "
            "VALUES ($1, $2, $3, $4, $5)", e.number, e.name2, e.secret, e.active,
            fake_config(settings, url, f"key-{e.number}"))


# (enterprises, Token, who it names: a number, AMBIGUOUS or None)
CASES = {
    "name2": ([Ent("0001", "T")], "T", "0001"),
    "secret": ([Ent("0001", "x", "T")], "T", "0001"),
    "number": ([Ent("0001", "x", "s")], "0001", "0001"),
    "name2 before secret": ([Ent("0001", "T"), Ent("0002", "y", "T")], "T", "0001"),
    "name2 before number": ([Ent("0001", "0002"), Ent("0002", "y")], "0002", "0001"),
    "secret before number": ([Ent("0001", "x", "0002"), Ent("0002", "y")], "0002", "0001"),
    "two active name2": ([Ent("0001", "T"), Ent("0002", "T")], "T", AMBIGUOUS),
    "an inactive duplicate": ([Ent("0001", "T"), Ent("0002", "T", active=False)], "T", "0001"),
    "only inactive": ([Ent("0001", "T", active=False)], "T", None),
    "two active secrets": ([Ent("0001", "x", "T"), Ent("0002", "y", "T")], "T", AMBIGUOUS),
    "name2 decides before shared secrets": (
        [Ent("0001", "T"), Ent("0002", "y", "T"), Ent("0003", "z", "T")], "T", "0001"),
    "inactive by number": ([Ent("0001", "x", active=False)], "0001", None),
    "empty Token": ([Ent("0001", "")], "", None),
}


def _names(matrix: EnablementMatrix, token: str) -> str | None:
    try:
        return matrix.by_token(token)
    except AmbiguousToken:
        return AMBIGUOUS


@pytest.fixture
async def fake_cache(pool: asyncpg.Pool) -> AsyncIterator[ConfigCache]:
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    async with aiohttp.ClientSession() as http:
        adapter = load(FAKE, AdapterDeps(crypto=crypto, http=http, pool=pool,
                                         public_url="http://x", secret_key=TEST_SECRET_KEY))
        cache = ConfigCache(pool, adapter, crypto, Metrics(adapter.name), ttl_s=600,
                            refresh_s=600)
        try:
            yield cache
        finally:
            await cache.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_the_trigger_and_the_index_apply_one_rule(
    case: str, pool: asyncpg.Pool, make_settings: Callable[..., Settings],
    fake_cache: ConfigCache,
) -> None:
    enterprises, token, expected = CASES[case]
    await register(pool, "fakecrm")
    await _put(pool, make_settings(integration=FAKE), "http://127.0.0.1:9", *enterprises)
    # SQL: what a call service's INSERT does.
    error = ""
    try:
        status = await insert_event(pool, "dial", dial(1, token=token))
    except asyncpg.CardinalityViolationError as exc:
        by_sql: str | None = AMBIGUOUS
        error = str(exc)
    else:
        by_sql = await pool.fetchval("SELECT enterprise_number FROM crm_events")
        assert (status == "INSERT 0 1") == (by_sql is not None)
    # Memory: what the HTTP ingest asks.
    await fake_cache.refresh_all()
    by_index = _names(fake_cache.matrix, token)
    assert (by_sql, by_index) == (expected, expected)
    if expected == AMBIGUOUS:
        assert "is ambiguous" in error
        assert await pool.fetchval("SELECT count(*) FROM crm_events") == 0


async def test_an_ambiguous_secret_is_never_shown(pool: asyncpg.Pool,
                                                  make_settings: Callable[..., Settings]) -> None:
    await register(pool, "fakecrm")
    await _put(pool, make_settings(integration=FAKE), "http://127.0.0.1:9",
               Ent("0001", "x", "s3cr3t-shared"), Ent("0002", "y", "s3cr3t-shared"))
    with pytest.raises(asyncpg.CardinalityViolationError) as caught:
        await insert_event(pool, "dial", dial(1, token="s3cr3t-shared"))
    message = str(caught.value)
    assert "s3cr3t" not in message
    assert "the Token (not shown) is ambiguous: it is the secret of 2 active enterprises " \
           "(0001, 0002)" in message


def _entry(number: str, name2: str | None, secret_fp: str | None, active: bool = True) -> Entry:
    return Entry(enterprise=number, token=name2, secret_fp=secret_fp, active=active,
                 enabled_types=frozenset({"fakecrm"}), config=None, invalid=None, holds={},
                 seq=1, expires_at=time.monotonic() + 60)


def test_the_index_is_a_multimap_and_keeps_no_secret() -> None:
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    matrix = EnablementMatrix(crypto)
    a = _entry("0001", "T", crypto.fingerprint("sa"))
    b = _entry("0002", "T", crypto.fingerprint("sb"))
    matrix.put(None, a)
    matrix.put(None, b)
    with pytest.raises(AmbiguousToken) as caught:
        matrix.by_token("T")
    assert (caught.value.level, caught.value.enterprises) == ("name2", ("0001", "0002"))
    assert matrix.ambiguous_count == 1
    assert matrix.ambiguous() == {"name2": [["0001", "0002"]], "secret": []}
    assert matrix.by_token("sb") == "0002", "by the secret's fingerprint"
    assert "sb" not in repr(vars(matrix)), "the secret itself is nowhere in the index"
    matrix.put(b, None)  # B goes: A is un-shadowed without a rebuild
    assert (matrix.by_token("T"), matrix.ambiguous_count) == ("0001", 0)
    assert matrix.by_token("sb") is None
    matrix.put(a, _entry("0001", "T", None, active=False))
    assert matrix.by_token("T") is None and matrix.by_token("0001") is None


async def test_every_identity_change_reaches_the_index_at_once(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(integration=FAKE, config_refresh_s=600.0, config_ttl_s=600.0)
    await _put(pool, settings, "http://127.0.0.1:9", Ent("0001", "T", "sa"),
               Ent("0002", "T", "sb"))
    async with running(settings) as daemon:
        matrix = daemon.rt.cache.matrix

        def names(token: str) -> str | None:
            return _names(matrix, token)

        async def after(sql: str, token: str, expected: str | None) -> None:
            started = time.monotonic()
            await pool.execute(sql)
            await wait_until(lambda: names(token) == expected, timeout=5)
            assert time.monotonic() - started < 2, "a NOTIFY, not the 600 s refresh"

        assert names("T") == AMBIGUOUS
        await after("UPDATE enterprises SET active = false WHERE number = '0002'", "T", "0001")
        await after("UPDATE enterprises SET active = true WHERE number = '0002'", "T", AMBIGUOUS)
        await after("UPDATE enterprises SET name2 = 'U' WHERE number = '0002'", "T", "0001")
        await after("UPDATE enterprises SET name2 = 'T' WHERE number = '0002'", "T", AMBIGUOUS)
        await after("DELETE FROM enterprises WHERE number = '0002'", "T", "0001")
        await after("UPDATE enterprises SET secret = 'new' WHERE number = '0001'", "new", "0001")
        assert names("sa") is None
        await after("UPDATE enterprises SET number = '0009' WHERE number = '0001'", "T", "0009")
        await wait_until(lambda: daemon.rt.cache.get("0001") is None, timeout=5)
        assert names("0001") is None and names("0009") == "0009"


async def test_no_event_ever_goes_out_with_another_enterprises_key(
    pool: asyncpg.Pool, make_settings: Callable[..., Settings], upstream: FakeUpstream,
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(integration=FAKE, poll_interval_s=0.1, config_refresh_s=600.0)
    await _put(pool, settings, upstream.url, Ent("0001", "shared", "sa"),
               Ent("0002", "shared", "sb"))
    sent: list[str] = []  # unique ids stored for 0001, by any path

    answers: list[dict[str, object]] = []

    async def post(n: int, *, envelope: bool = False) -> int:
        body = dial(n, token="shared")
        if envelope:
            body = {"token": "shared", "uniqueId": body["UniqueId"], "event_type": "dial",
                    "raw": body}
        url = f"{daemon.url}/api/events" + ("" if envelope else "/dial")
        async with http.post(url, json=body, headers=AUTH) as response:
            answers.append(await response.json())
            return response.status

    async def insert(n: int) -> None:
        await insert_event(pool, "dial", dial(n, token="shared"))
        sent.append(f"1757772742.{n}")

    async with running(settings) as daemon:
        await register(pool, "fakecrm")
        # Two active enterprises share the Token: refused on every path, nothing stored.
        assert (await post(1), await post(2, envelope=True)) == (409, 409)
        assert answers == [
            {"error": "ambiguous_token", "message": f"{field}: the Token is the name2 of 2 "
             "active enterprises (0001, 0002); nothing was stored",
             "details": {"field": field, "enterprises": ["0001", "0002"]}}
            for field in ("Token", "token")]
        with pytest.raises(asyncpg.CardinalityViolationError, match="ambiguous"):
            await insert(3)
        assert await pool.fetchval("SELECT count(*) FROM crm_events") == 0
        # The duplicate goes inactive: the Token names 0001 alone, on every path.
        await pool.execute("UPDATE enterprises SET active = false WHERE number = '0002'")
        await wait_until(lambda: _names(daemon.rt.cache.matrix, "shared") == "0001")
        for n in (4, 5):
            assert await post(n) == 202
            sent.append(f"1757772742.{n}")
        await insert(6)
        # Active again, then deleted: ambiguous, then 0001's at once.
        await pool.execute("UPDATE enterprises SET active = true WHERE number = '0002'")
        await wait_until(lambda: (daemon.rt.cache.matrix.ambiguous_count == 1))
        assert await post(7) == 409
        await pool.execute("DELETE FROM enterprises WHERE number = '0002'")
        await wait_until(lambda: daemon.rt.cache.matrix.ambiguous_count == 0)
        assert await post(8) == 202
        sent.append("1757772742.8")
        await insert(9)
        await settled(pool, len(sent))
        await asyncio.sleep(0.2)
    received = upstream.received
    assert sorted(r.unique_id for r in received) == sorted(sent)
    assert {(r.enterprise, r.api_key) for r in received} == {("0001", "key-0001")}


async def test_check_lists_ambiguous_tokens_without_secrets(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(integration=FAKE)
    await _put(pool, settings, "http://127.0.0.1:9", Ent("0001", "shared"),
               Ent("0002", "shared"), Ent("0003", "x", "topsecret"),
               Ent("0004", "y", "topsecret"), Ent("0005", "shared", active=False))
    code, out = await cli(database_url, "check")
    assert code == 1, out
    assert "ambiguous Token 'shared': the name2 of active enterprises 0001, 0002" in out
    assert "ambiguous Token (a secret, not shown): the secret of active enterprises " \
           "0003, 0004" in out
    assert "topsecret" not in out
    await pool.execute("UPDATE enterprises SET active = false WHERE number IN ('0002', '0004')")
    code, out = await cli(database_url, "check")
    assert code == 0, out
