"""Every HTTP route under arbitrary input: bodies, headers, encodings, path segments, queries,
methods — never a 5xx, never a traceback or an error in the log.

The routes are read from the running app itself (sub-apps included), so a route added later
is covered without touching this file. Hypothesis draws each request; a worker thread sends it
byte for byte (tests/support/rawhttp.py) while the daemon runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote_from_bytes

import asyncpg
import pytest
import pytest_asyncio
import structlog
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator, running_simulator
from daemon.logconfig import redact
from daemon.settings import Settings
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY, TEST_SERVICE_TOKEN
from tests.retailcrm.conftest import KEY, seed
from tests.support import rawhttp
from tests.support.daemon import running

EXAMPLES = 1000
TOKEN = "tok0367"
CLIENT_ID = "client-id-of-0367-0123456789abcdefghijklmnopqrstuv"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
# Headers that frame the message: drawn freely, they would make the server wait for bytes
# that never come (a body deadline, not a bug) or answer twice (100-continue).
FRAMING = {"content-length", "transfer-encoding", "connection", "host", "expect", "upgrade"}
_PLACEHOLDER = re.compile(r"\{([^}]+)\}")


def routes(app: web.Application, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(path pattern, methods) of every route of ``app`` and its sub-apps."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for resource in app.router.resources():
        info = resource.get_info()
        if "app" in info:
            found += routes(info["app"], prefix + info["prefix"].rstrip("/"))
            continue
        pattern = info.get("formatter") or info.get("path")
        if pattern is None:
            continue
        methods = tuple(sorted({route.method for route in resource}))
        found.append((prefix + pattern, methods))
    return found


# -- strategies ----------------------------------------------------------------------------

header_bytes = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
header_text = st.from_regex(rb"\A[ -~]{0,60}\Z")
token_bytes = st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}\Z")
segment = st.one_of(
    st.sampled_from(["0367", "0368", "dial", "hangup", "download", "bridge_leave", "", ".."]),
    st.binary(max_size=24).map(lambda b: quote_from_bytes(b, safe="")),
    st.text(max_size=12).map(lambda t: quote_from_bytes(
        t.encode("utf-8", "surrogatepass"), safe="")),
)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.sampled_from(["\x00", "\ud800", "1796099999.60", TOKEN]),
)
json_value = st.recursive(
    json_leaf, lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20)
envelope = st.fixed_dictionaries({
    "token": st.one_of(st.just(TOKEN), json_leaf),
    "uniqueId": st.one_of(st.just("1757772742.60"), json_leaf),
    "event_type": st.one_of(st.sampled_from(["dial", "hangup", "start", "ring"]), json_leaf),
    "raw": st.one_of(st.fixed_dictionaries({"Token": st.just(TOKEN),
                                            "UniqueId": st.just("1757772742.60")}),
                     json_value),
}, optional={"record_url": json_value, "origin": json_value})


def encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


json_body = st.one_of(envelope, json_value).map(encode_json)
raw_json_text = st.sampled_from([
    b"[" * 3000 + b"]" * 3000, b'{"a": NaN}', b"[Infinity, -Infinity]", b"1e999",
    b"9" * 5000, b'{"token": "\\ud800"}', b'{"a": "\\u0000"}', b"{", b"\xff\xfe",
])
form_body = st.lists(st.tuples(st.sampled_from([b"clientId", b"activity", b"x"]),
                               st.one_of(st.just(CLIENT_ID.encode()), st.binary(max_size=30),
                                         st.just(b'{"active": true, "freeze": false}'))),
                     max_size=4).map(lambda pairs: b"&".join(
                         quote_from_bytes(k).encode() + b"=" + quote_from_bytes(v).encode()
                         for k, v in pairs))
multipart_body = st.binary(max_size=200).map(
    lambda junk: b"--zz\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n"
    + junk + b"\r\n--zz--\r\n")
body = st.one_of(st.just(b""), json_body, json_body, raw_json_text, form_body,
                 multipart_body, st.binary(max_size=300))
VALID_AUTH = f"Bearer {TEST_SERVICE_TOKEN}".encode()


def head_fields(value: st.SearchStrategy[bytes]) -> tuple[
        tuple[bytes, st.SearchStrategy[bytes | None]], ...]:
    """The headers every drawn request may carry, their free-form values drawn by ``value``:
    mostly what a real client sends, so that most requests reach the handlers' checks."""
    return (
        (b"Authorization", st.one_of(
            st.sampled_from([VALID_AUTH, VALID_AUTH, VALID_AUTH, None]),
            st.just(b"Bearer \xff\xfe"), value.map(lambda b: b"Bearer " + b))),
        (b"X-Service-Token", st.one_of(
            st.sampled_from([None, None, None, TEST_SERVICE_TOKEN.encode()]), value)),
        (b"Content-Type", st.one_of(st.sampled_from([None, b"application/json"]), st.sampled_from([
            b"application/json", b"application/x-www-form-urlencoded", b"multipart/form-data",
            b"multipart/form-data; boundary=zz", b"text/plain; charset=latin-1",
            b"application/json; charset=utf-16"]), value)),
        (b"Content-Encoding", st.one_of(
            st.sampled_from([None, None, None, b"gzip", b"deflate"]),
            st.sampled_from([b"br", b"identity", b"zstd", b"gzip, gzip"]), token_bytes)),
    )


@st.composite
def requests(draw: st.DrawFn, table: list[tuple[str, tuple[str, ...]]]) -> bytes:
    """One whole request to one of the app's routes (or a path next to them)."""
    pattern, methods = draw(st.sampled_from(table))
    method = draw(st.one_of(st.sampled_from(methods), st.sampled_from(METHODS)))
    path = _PLACEHOLDER.sub(lambda _m: draw(segment), pattern)
    if draw(st.booleans()):
        path += "/" + draw(segment) if draw(st.booleans()) else ""
        path += "?" + "&".join(f"{draw(segment)}={draw(segment)}"
                               for _ in range(draw(st.integers(0, 3))))
    # One request in four has header values of any byte (most are then refused by the
    # server's own parser), the others printable ones.
    free = header_bytes if draw(st.integers(0, 3)) == 0 else header_text
    headers: list[tuple[bytes, bytes]] = []
    for name, strategy in head_fields(free):
        value = draw(strategy)
        if value is not None:
            headers.append((name, value))
    extra = draw(st.one_of(st.none(), st.tuples(token_bytes, free)))
    if extra is not None and extra[0].lower().decode() not in FRAMING:
        headers.append(extra)
    payload = draw(body)
    compress = dict(headers).get(b"Content-Encoding")
    if compress == b"gzip" and draw(st.booleans()):
        payload = gzip.compress(payload)
    elif compress == b"deflate" and draw(st.booleans()):
        payload = zlib.compress(payload)
    return rawhttp.build(method.encode(), path.encode("ascii"), headers, payload)


@st.composite
def ingest_requests(draw: st.DrawFn) -> bytes:
    """A well-formed ingest request around an arbitrary Asterisk body: what reaches the
    store (and the dispatcher) with whatever the body holds."""
    unique_id = f"1757772742.{draw(st.integers(0, 10**6))}"
    raw = draw(st.dictionaries(st.text(max_size=12), json_value, max_size=6))
    raw.update({"Token": TOKEN, "UniqueId": unique_id})
    event_type = draw(st.sampled_from(["dial", "hangup", "download", "start", "bridge"]))
    if draw(st.booleans()):
        path, value = "/api/events/" + event_type, raw
    else:
        path, value = "/api/events", {
            "token": TOKEN, "uniqueId": unique_id, "event_type": event_type, "raw": raw,
            **draw(st.fixed_dictionaries({}, optional={
                "record_url": st.one_of(st.just("https://rec.example/a.mp3"), json_leaf),
                "origin": st.sampled_from(["live", "download"])}))}
    payload = json.dumps(value, ensure_ascii=draw(st.booleans())).encode(
        "utf-8", "surrogatepass")
    headers = [(b"Authorization", VALID_AUTH), (b"Content-Type", b"application/json")]
    if draw(st.booleans()):
        headers.append((b"Content-Encoding", b"gzip"))
        payload = gzip.compress(payload)
    return rawhttp.build(b"POST", path.encode(), headers, payload)


# -- the suite -----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with running_simulator(Simulator(api_keys=[KEY])) as running_sim:
        yield running_sim


async def test_no_route_answers_5xx_or_logs_a_traceback_whatever_it_is_sent(
    pool: asyncpg.Pool, sim: Simulator, make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    await seed(pool, crypto, sim.url, client_id=crypto.encrypt(CLIENT_ID))
    caplog.set_level(logging.INFO)
    answers: dict[int, int] = {}
    with capture_logs(processors=[structlog.processors.format_exc_info, redact]) as logs:
        async with running(make_settings(http_body_timeout_s=3.0)) as daemon:
            table = routes(daemon.app)
            assert len(table) >= 10, table  # health, metrics, stats, the API, callbacks

            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(st.one_of(requests(table), ingest_requests()))
            def never_5xx(request: bytes) -> None:
                answer = rawhttp.exchange(daemon.url, request)
                answers[answer.status] = answers.get(answer.status, 0) + 1
                assert answer.status < 500, (request[:300], answer)

            await asyncio.to_thread(never_5xx)
    print("statuses:", sorted(answers.items()))
    assert sum(answers.values()) >= EXAMPLES
    assert answers.get(202, 0) >= EXAMPLES // 10, answers  # many got through to the store
    bad = [e for e in logs if "exception" in e or e["log_level"] in {"error", "critical"}]
    assert bad == [], bad[:3]
    records = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert records == [], [r.getMessage() for r in records[:3]]
