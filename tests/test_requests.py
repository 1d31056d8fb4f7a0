"""Malformed requests get a clean 400 with a stable error id, before anything is stored or
authenticated, and never a 500 or a traceback in the log: JSON too deep, ``\\u0000`` or a lone
surrogate anywhere, ``NaN``/``Infinity``/``1e999``, ``origin`` as a list, a bad gzip body, a
call id as a JSON number, NUL in a path or query, non-ASCII credential headers, a callback's
form that is not UTF-8 or not multipart."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator, running_simulator
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, TEST_SERVICE_TOKEN
from tests.retailcrm.conftest import KEY, seed
from tests.support import rawhttp
from tests.support.daemon import running

TOKEN = "tok0367"
CLIENT_ID = "client-id-of-0367-0123456789abcdefghijklmnopqrstuv"
AUTH = (b"Authorization", f"Bearer {TEST_SERVICE_TOKEN}".encode())
JSON = (b"Content-Type", b"application/json")
FORM = (b"Content-Type", b"application/x-www-form-urlencoded")
ENVELOPE: dict[str, Any] = {
    "token": TOKEN, "uniqueId": "1796099999.60", "event_type": "dial",
    "raw": {"Token": TOKEN, "UniqueId": "1796099999.60", "CallType": 0,
            "Phone": "+375291234567", "Extensions": ["101"]},
}


def envelope(**changes: Any) -> bytes:
    return json.dumps({**ENVELOPE, **changes}).encode()


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    request: bytes
    status: int
    error: str
    field: str | None = None


def post(path: bytes, body: bytes, *headers: tuple[bytes, bytes]) -> bytes:
    return rawhttp.build(b"POST", path, [AUTH, JSON, *headers], body)


CASES = [
    Case("too deep", post(b"/api/events", b"[" * 5000 + b"]" * 5000), 400, "too_deep", "body"),
    Case("deep in raw", post(b"/api/events", envelope(raw=nested(40))), 400, "too_deep"),
    Case("NUL in a value", post(b"/api/events", envelope(raw={"Token": "t\x00"})), 400,
         "invalid_text", "raw.Token"),
    Case("NUL in a key", post(b"/api/events", envelope(raw={"x\x00": 1})), 400,
         "invalid_text", "raw.x\\x00"),
    Case("NUL in the raw route", post(b"/api/events/dial", json.dumps(
        {**ENVELOPE["raw"], "Phone": "\x00"}).encode()), 400, "invalid_text", "Phone"),
    Case("lone surrogate", post(b"/api/events", envelope().replace(
        b'"+375291234567"', b'"\\ud800"')), 400, "invalid_text", "raw.Phone"),
    Case("NaN", post(b"/api/events", envelope().replace(b'"CallType": 0', b'"CallType": NaN')),
         400, "invalid_number", "body"),
    Case("Infinity", post(b"/api/events", envelope().replace(b": 0", b": -Infinity")), 400,
         "invalid_number"),
    Case("1e999", post(b"/api/events", envelope().replace(b": 0", b": 1e999")), 400,
         "invalid_number"),
    Case("5,000 digits", post(b"/api/events", envelope().replace(b": 0", b": " + b"9" * 5000)),
         400, "invalid_number"),
    Case("not UTF-8", post(b"/api/events", b'{"token": "\xff\xfe"}'), 400, "invalid_json"),
    Case("origin a list", post(b"/api/events", envelope(origin=["live"])), 400,
         "invalid_field", "origin"),
    Case("origin an object", post(b"/api/events", envelope(origin={"live": 1})), 400,
         "invalid_field", "origin"),
    Case("uniqueId a number", post(b"/api/events", envelope().replace(
        b'"uniqueId": "1796099999.60"', b'"uniqueId": 1796099999.60')), 400, "invalid_field",
        "uniqueId"),
    Case("UniqueId a number", post(b"/api/events/dial", json.dumps(
        ENVELOPE["raw"]).encode().replace(b'"1796099999.60"', b"1796099999.60")), 400,
        "invalid_field", "UniqueId"),
    Case("bad gzip", post(b"/api/events", b"this is no gzip", (b"Content-Encoding", b"gzip")),
         400, "invalid_encoding", "body"),
    Case("gzip of a bad body", post(b"/api/events", gzip.compress(b"[NaN]"),
                                    (b"Content-Encoding", b"gzip")), 400, "invalid_number"),
    Case("unknown encoding", post(b"/api/events", envelope(), (b"Content-Encoding", b"zzz")),
         415, "unsupported_encoding", "Content-Encoding"),
    Case("NUL in a path segment", rawhttp.build(b"GET", b"/api/enablement/03%0067", [AUTH]),
         400, "invalid_path", "path"),
    Case("NUL in refresh", rawhttp.build(b"POST", b"/api/config-cache/refresh/0367%00",
                                         [AUTH]), 400, "invalid_path"),
    Case("NUL in an event type", post(b"/api/events/di%00al", envelope()), 400,
         "invalid_path"),
    Case("NUL in the query", rawhttp.build(b"GET", b"/health?x=%00", []), 400,
         "invalid_query", "query"),
    Case("non-ASCII Authorization", rawhttp.build(
        b"POST", b"/api/events", [(b"Authorization", b"Bearer \xff\xfe\xfd"), JSON],
        envelope()), 400, "invalid_header", "Authorization"),
    Case("non-ASCII X-Service-Token", rawhttp.build(
        b"POST", b"/api/events", [(b"X-Service-Token", "токен".encode()), JSON], envelope()),
        400, "invalid_header", "X-Service-Token"),
    Case("callback form not UTF-8", rawhttp.build(
        b"POST", b"/retailcrm/actions/activity", [FORM], b"clientId=\xff\xfe&activity=1"),
        400, "invalid_form"),
    Case("callback multipart without a boundary", rawhttp.build(
        b"POST", b"/retailcrm/actions/activity",
        [(b"Content-Type", b"multipart/form-data")], b"x"), 400, "invalid_form"),
    Case("callback multipart garbage", rawhttp.build(
        b"POST", b"/retailcrm/actions/activity",
        [(b"Content-Type", b"multipart/form-data; boundary=zz")], b"--zz\r\ngarbage"), 400,
        "invalid_form"),
    Case("callback activity too deep", rawhttp.build(
        b"POST", b"/retailcrm/actions/activity", [FORM],
        f"clientId={CLIENT_ID}&activity=".encode() + b"%5B" * 5000), 400, "activity"),
]


@pytest.fixture
def crypto() -> Crypto:
    return Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(Simulator(api_keys=[KEY])) as running_sim:
        yield running_sim


async def test_malformed_requests_are_400_with_a_stable_id_and_store_nothing(
    pool: asyncpg.Pool, crypto: Crypto, sim: Simulator, make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await seed(pool, crypto, sim.url, client_id=crypto.encrypt(CLIENT_ID))
    caplog.set_level(logging.INFO)
    with capture_logs() as logs:
        async with running(make_settings()) as daemon:
            for case in CASES:
                answer = await asyncio.to_thread(rawhttp.exchange, daemon.url, case.request)
                assert answer.status == case.status, (case.name, answer)
                body = answer.json()
                if case.error in {"invalid_form", "activity"}:  # RetailCRM's error shape
                    assert body["success"] is False, case.name
                    assert case.error in (body.get("error"), *body["errors"]), case.name
                    continue
                assert body["error"] == case.error, (case.name, body)
                if case.field is not None:
                    assert body["details"]["field"] == case.field, (case.name, body)
            assert await pool.fetchval("SELECT count(*) FROM crm_events") == 0
            assert await pool.fetchval("SELECT count(*) FROM crm_holds") == 0
            # The same requests made well are taken: the refusals were about the defects.
            good = await asyncio.to_thread(rawhttp.exchange, daemon.url,
                                           post(b"/api/events", envelope()))
            assert (good.status, good.json()["stored"]) == (202, True)
    assert [e for e in logs if e.get("exc_info") or e["log_level"] in {"error", "critical"}
            ] == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []
