"""Property: whatever a call service inserts through the SQL path — payloads of any shape,
depth and size — the daemon keeps running, and every stored row's delivery ends delivered,
dead-lettered or skipped; none stays pending, none is classed a bug.

One daemon serves every example (it must survive all of them, in any order); each example
is one call's events, inserted as JSON text on a plain connection exactly as a call service
in any language would (``tests.support.seed.CALL_SERVICE_INSERT``). What PostgreSQL or the
trigger refuses is not stored and is no concern of the daemon's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from daemon.settings import Settings
from tests.support.daemon import InProcess, running
from tests.support.fakecrm import FAKE, FakeUpstream, fake_config
from tests.support.seed import CALL_SERVICE_INSERT, add_enterprise

TOKEN = "tok0001"
SETTLE_TIMEOUT_S = 15.0

# --------------------------------------------------------------------------- payloads
# Each strategy below yields JSON *text*: numbers of thousands of digits and nesting
# thousands deep cannot be written by json.dumps, and are what PostgreSQL accepts anyway.

_scalars = (st.none() | st.booleans() | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=5),
    max_leaves=25,
).map(json.dumps)  # ensure_ascii: lone surrogates and NUL go as escapes PostgreSQL refuses

_depth = st.sampled_from([2, 64, 999, 1_001, 3_000]) | st.integers(1, 3_000)
_deep = _depth.flatmap(lambda d: st.sampled_from([
    "[" * d + "]" * d, '{"a": ' * d + "1" + "}" * d, '[{"b": ' * d + "null" + "}]" * d]))
_digits = st.sampled_from([20, 400, 4_300, 4_301, 6_000]) | st.integers(1, 6_000)
_numbers = _digits.flatmap(lambda n: st.sampled_from([
    "9" * n, "-" + "1" * n, "0." + "1" * n, f"1e{n}", f"-2.5e-{n}"]))
_sizes = st.sampled_from([1_000, 100_000, 1_100_000])  # the last is past the 1 MiB cap
_large = _sizes.map(lambda n: json.dumps("x" * n))
_anything = _values | _deep | _numbers | _large

_fields = {
    "CallType": st.sampled_from(["0", "1", "2", '"0"', '"2"', '" 1 "', '"²"', '"١"', "3",
                                 "true", "null", '""', '"9' + "9" * 5_000 + '"']),
    "Phone": st.sampled_from(['"+375291112233"', '"375291112233"', '"151"', '""', "12345"]),
    "Extensions": st.sampled_from(['["150", "151"]', '[""]', "[]", '[150, "x"]', '"150"',
                                   "[null]", '[["150"]]']),
    "Trunk": st.sampled_from(['"0001363"', '""', "null", "1363"]),
    "CallStatus": st.sampled_from(['"2"', '"0"', '"1"', '"5"', "2", '"x"']),
    "StartTime": st.sampled_from(['"2025-01-09 19:20:00"', '""', '"0000-00-00 00:00:00"',
                                  '"2025-13-45 99:99:99"', '"yesterday"', "1736443200"]),
    "EndTime": st.sampled_from(['"2025-01-09 19:21:00"', '""', '"2025-1-9 9:21:00"']),
    "DateReceived": st.sampled_from(['"2025-01-09 19:19:59"', "null", "[]"]),
    "ExternalInitiated": st.sampled_from(["true", "false", '"1"', '"maybe"', "2", "null"]),
    "ConnectedLineNum": st.sampled_from(['"151"', '"<unknown>"', "151", "{}"]),
    "Channel": st.sampled_from(['"SIP/151-0000001c"', '"Local/150@from-internal-01;1"',
                                '"garbage"', "[]"]),
    "InternalCode": st.sampled_from(['"151"', '""', "151"]),
    "RecordUrl": st.sampled_from(['"https://rec.example/1.mp3"', '"javascript:alert(1)"',
                                  '""', "5"]),
    "raw": st.sampled_from(['{"UniqueId": "1.1"}', "[]", '"raw"']),
}


def _body(fields: dict[str, str]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}"


@dataclass(frozen=True)
class Call:
    """One call's events: (event type, body as JSON text with ``{uid}`` to fill in)."""

    events: list[tuple[str, str]]


@st.composite
def _event(draw: st.DrawFn) -> tuple[str, str]:
    event_type = draw(st.sampled_from(["dial", "dial", "hangup", "download", "start",
                                       "bridge", "bridge_leave", "call"]))
    if draw(st.integers(0, 19)) == 0:  # the whole body is no object at all
        return event_type, draw(_anything)
    token = draw(st.sampled_from([f'"{TOKEN}"'] * 8 + ['"0001"', "1", "null", '"nope"', "[]"]))
    uid = draw(st.sampled_from(['"{uid}"'] * 8 + ["1757772742.60", '""', "null",
                                                  '["{uid}"]']))
    fields = {"Token": token, "UniqueId": uid}
    for name in draw(st.lists(st.sampled_from(sorted(_fields)), unique=True, max_size=8)):
        fields[name] = draw(_fields[name] | _anything) if draw(st.booleans()) else draw(
            _fields[name])
    for name in draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)):
        fields[name] = draw(_anything)
    return event_type, _body(fields)


_calls = st.lists(_event(), min_size=1, max_size=4).map(Call)


# --------------------------------------------------------------------------- the harness


@dataclass
class Harness:
    daemon: InProcess
    pool: asyncpg.Pool
    conn: asyncpg.Connection  # plain: no JSON codec, bodies go as text
    calls: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def insert(self, call: Call) -> None:
        uid = f"9{next(self.calls)}.1"
        for event_type, body in call.events:
            try:
                status = await self.conn.execute(CALL_SERVICE_INSERT, event_type,
                                                 body.replace("{uid}", uid), None, None)
            except asyncpg.PostgresError as exc:
                # Refused: not JSON PostgreSQL stores, no UniqueId, a key too long...
                event(f"insert refused: {type(exc).__name__}")
                continue
            event("stored" if status == "INSERT 0 1" else "not stored (dropped, duplicate)")

    async def settled(self) -> dict[str, int]:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            rows = await self.pool.fetch(
                "SELECT status, count(*) AS n FROM crm_deliveries GROUP BY 1")
            counts = {r["status"]: r["n"] for r in rows}
            if not counts.get("pending"):
                return counts
            assert time.monotonic() < deadline, f"still pending: {counts}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def harness(
    pool: asyncpg.Pool, database_url: str, make_settings: Callable[..., Settings],
    upstream: FakeUpstream,
) -> AsyncIterator[Harness]:
    config = make_settings(integration=FAKE, poll_interval_s=0.1, retry_base_s=0.02,
                           retry_max_s=0.05, max_attempts=3)
    await add_enterprise(pool, "0001", token=TOKEN,
                         config=fake_config(config, upstream.url, "key-0001"))
    conn = await asyncpg.connect(database_url)
    try:
        async with running(config) as daemon:
            yield Harness(daemon, pool, conn)
    finally:
        await conn.close()


@settings(deadline=timedelta(seconds=SETTLE_TIMEOUT_S + 5),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(call=_calls)
async def test_any_payload_inserted_by_sql_ends_settled(harness: Harness, call: Call) -> None:
    await harness.insert(call)
    counts = await harness.settled()
    rt = harness.daemon.rt
    assert rt.supervisor.failed is None, rt.supervisor.failed
    assert {"dispatcher", "outcome-writer", "config-refresher"} <= set(rt.supervisor.names)
    assert set(counts) <= {"done", "failed", "skipped"}
    assert rt.metrics.bug_errors._value.get() == 0, "bad input is malformed, never a bug"
    for status, n in counts.items():
        event(f"deliveries so far {status}: {'some' if n else 'none'}")
