"""The demo's calls are the platform's real call shapes (read back by crm-bridge's own parser
and rules), its traffic keeps its rate and survives a failing sink, and its enterprises are
seeded and connected to RetailCRM through the adapter."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from daemon import calls
from daemon.calls import CallType, StoredEvent
from daemon.crypto import Crypto
from daemon.demo.enterprises import ENTERPRISES, connect, seed
from daemon.demo.scenarios import KINDS, CallFactory, Line, Step
from daemon.demo.traffic import Feed, SqlSink, Traffic
from daemon.integrations import load
from daemon.integrations.base import AdapterDeps
from daemon.integrations.retailcrm.simulator import Simulator, make_users, running_simulator
from tests.conftest import TEST_FERNET_KEY, TEST_SECRET_KEY
from tests.support.seed import register

LINE = Line("375291234567", "0001363", ("150", "151", "152", "153"))
NOW = datetime(2025, 9, 14, 9, 11, 55, tzinfo=UTC)


def stored(steps: Sequence[Step]) -> list[StoredEvent]:
    """The steps as crm_events rows, in the order the demo stores them."""
    ordered = sorted(steps, key=lambda s: s.at_s)
    return [StoredEvent(i, s.event_type, s.body["UniqueId"], s.body, s.record_url, s.origin,
                        NOW) for i, s in enumerate(ordered, start=1)]


def internal(number: str) -> bool:
    return number in LINE.extensions


EXPECTED = {  # kind: (direction, answered, live hangup stored, first event type)
    "incoming": (CallType.INCOMING, True, True, "start"),
    "missed": (CallType.INCOMING, False, True, "start"),
    "internal": (CallType.INTERNAL, True, True, "dial"),
    "late_dial": (CallType.INCOMING, False, True, "start"),
    "recovered": (CallType.INCOMING, True, False, "start"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed_", range(12))
def test_every_kind_is_read_by_the_parser_as_what_it_stands_for(kind: str, seed_: int) -> None:
    call = CallFactory(LINE, random.Random(seed_)).make(kind, NOW, 60)
    assert call.unique_id == f"{int(NOW.timestamp())}.60"
    events, malformed = calls.parse_call(stored(call.steps))
    assert malformed == []
    state = calls.fold_call(events)
    assert state.unique_id == call.unique_id and state.hangup is not None
    if kind == "outgoing":
        assert calls.direction(state, internal) is CallType.OUTGOING
        assert state.ringing[0] in LINE.extensions
        return
    direction, answered, live, first = EXPECTED[kind]
    assert calls.direction(state, internal) is direction
    assert calls.answered(state, internal) is answered
    assert state.hangup.is_download is not live
    assert call.steps[0].event_type == first
    if answered and direction is CallType.INCOMING:
        assert calls.answerer(state, internal) in state.ringing
        assert state.record_url is not None and state.record_url.startswith("https://")
    if kind == "late_dial":
        types = [s.event_type for s in sorted(call.steps, key=lambda s: s.at_s)]
        assert types == ["start", "hangup", "dial"], "the hangup is stored before its dial"
    if kind == "recovered":
        assert [s.origin for s in call.steps if s.event_type == "download"] == ["download"]
        assert not any(s.event_type == "hangup" for s in call.steps)


def test_the_mix_has_every_kind_and_real_body_shapes() -> None:
    factory = CallFactory(LINE, random.Random(3))
    made = [factory.next(NOW, seq) for seq in range(600)]
    assert {c.kind for c in made} == set(KINDS)
    bodies = [s.body for c in made for s in c.steps]
    assert {type(b.get("CallType")) for b in bodies if "CallType" in b} == {int, str}
    callers = [b["Phone"] for b in bodies if b.get("CallType") == 0]
    assert all(any(p.startswith(shape) for p in callers) for shape in ("+375", "375", "80"))
    assert any(b.get("StartTime") == "" for b in bodies), "seen: an empty StartTime"
    assert any(len(b.get("Extensions", [])) > 3 for b in bodies)
    assert all(isinstance(b["UniqueId"], str) for b in bodies)
    assert max(c.duration_s for c in made) < 45


class Recorder:
    """A sink that keeps what it is given (or refuses it while ``failing``)."""

    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.failing = False

    async def store(self, step: Step) -> None:
        if self.failing:
            raise OSError("the database went away")
        self.steps.append(step)


async def test_traffic_begins_calls_at_its_rate_and_cancels_them_when_stopped() -> None:
    sinks = [Recorder(), Recorder()]
    feeds = [Feed(CallFactory(LINE, random.Random(i)), sink) for i, sink in enumerate(sinks)]
    traffic = Traffic(feeds, calls_per_minute=1200)  # one every 50 ms
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    began = loop.time()
    task = asyncio.create_task(traffic.run(stopping))
    while traffic.counters.calls < 10:
        await asyncio.sleep(0.005)
    elapsed = loop.time() - began
    stopping.set()
    await asyncio.wait_for(task, 5)
    assert elapsed >= 9 * 0.05 - 0.005, "never faster than the rate, even to catch up"
    assert traffic.counters.calls >= 10
    firsts = [s.steps[0] for s in sinks]
    assert [f.event_type for f in firsts] == ["start", "start"], "an incoming call first"
    assert traffic.counters.events == sum(len(s.steps) for s in sinks)
    assert not traffic._tasks, "every call replay is cancelled"


async def test_a_failing_sink_is_counted_and_logged_once_each_way() -> None:
    sink = Recorder()
    traffic = Traffic([Feed(CallFactory(LINE, random.Random(1)), sink)], calls_per_minute=6000)
    stopping = asyncio.Event()
    with capture_logs() as logs:
        sink.failing = True
        task = asyncio.create_task(traffic.run(stopping))
        await asyncio.sleep(0.3)
        sink.failing = False
        await asyncio.sleep(0.3)
        stopping.set()
        await asyncio.wait_for(task, 5)
    assert traffic.counters.failed > 1 and traffic.counters.events > 0
    events = [entry["event"] for entry in logs]
    assert events.count("demo_events_not_stored") == 1
    assert events.count("demo_events_stored_again") == 1


async def test_sql_sink_stores_a_call_as_the_call_services_do(pool: asyncpg.Pool) -> None:
    firm = ENTERPRISES[0]
    await seed(pool, firm, "pbx-secret-0123456789")
    await pool.execute("UPDATE enterprises SET integrations_config = $1 WHERE number = $2",
                       {"retailcrm": {"enabled": True}}, firm.number)
    await register(pool, "retailcrm")
    line = Line(firm.name2, firm.trunk, firm.numbers)
    call = CallFactory(line, random.Random(5)).make("incoming", NOW, 1)
    sink = SqlSink(pool)
    for step in call.steps:
        await sink.store(step)
        await sink.store(step)  # a retried insert is a no-op
    rows = await pool.fetch("SELECT enterprise_number, event_type, payload::text, record_url "
                            "FROM crm_events ORDER BY id")
    assert [r["event_type"] for r in rows] == [s.event_type for s in call.steps]
    assert {r["enterprise_number"] for r in rows} == {firm.number}
    assert [json.loads(r["payload"]) for r in rows] == [s.body for s in call.steps]
    assert rows[-1]["record_url"] == call.steps[-1].record_url
    deliveries = await pool.fetchval("SELECT count(*) FROM crm_deliveries")
    assert deliveries == 2, "the dial and the hangup: RetailCRM acts on these"


async def test_the_enterprises_are_seeded_and_connected_through_the_adapter(
    pool: asyncpg.Pool,
) -> None:
    crypto = Crypto((TEST_FERNET_KEY,), TEST_SECRET_KEY)
    firm = ENTERPRISES[1]
    key = "demo-key-0123456789abcdef"
    sim = Simulator(api_keys=[key], users=make_users(firm.crm_users))
    async with running_simulator(sim), aiohttp.ClientSession() as http:
        adapter = load("retailcrm", AdapterDeps(
            crypto=crypto, http=http, pool=pool, public_url="http://127.0.0.1:8019",
            secret_key=TEST_SECRET_KEY, settings={"allow_private_crm": True}))
        await seed(pool, firm, "first-secret-0123456789")
        await seed(pool, firm, "pbx-secret-0123456789")  # a rerun updates the same rows
        url = sim.url
        message = await connect(adapter, firm, url, key)
    assert message.endswith(f"in RetailCRM at {url}: 2 manager extension(s), call cards "
                            "incoming on, outgoing on, hangup on.")
    row = await pool.fetchrow("SELECT name2, secret, integrations_config::text AS config "
                              "FROM enterprises WHERE number = $1", firm.number)
    assert (row["name2"], row["secret"]) == (firm.name2, "pbx-secret-0123456789")
    assert key not in row["config"], "the API key is stored encrypted"
    config = json.loads(row["config"])["retailcrm"]
    assert crypto.decrypt(config["api_key"]) == key
    assert config["enabled"] is True and config["user_extensions"] == dict(firm.managers)
    phones = await pool.fetch("SELECT phone_number FROM user_internal_phones "
                              "WHERE enterprise_number = $1 ORDER BY 1", firm.number)
    assert tuple(p["phone_number"] for p in phones) == firm.numbers
    module = sim.state.module
    assert module is not None and module["active"] is True
    assert module["integrations"]["telephony"]["additionalCodes"] == [
        {"userId": uid, "code": number} for uid, number in firm.managers.items()]
    edits = sim.recorded("/api/v5/integration-modules")
    assert len(edits) == 1, "switched off while the numbers were saved: one module edit"
