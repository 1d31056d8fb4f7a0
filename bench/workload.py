"""What the benchmarks feed the pipeline: enterprises, real call bodies, a queued backlog.

Call bodies have the shape the platform's Asterisk listener really sends (docs/events.md):
incoming and outgoing calls, answered and missed, several ringing extensions.
They are inserted exactly as a call service does — ``CALL_SERVICE_INSERT``, one row per
statement, autocommit — so the fan-out triggers resolve the enterprise by ``Token``, create
the deliveries and ring the doorbell.

A *backlog* is inserted while no daemon runs, then *frozen* (its deliveries made due a day
from now) and vacuumed, so daemons can start and settle before the clock starts; *release*
makes every delivery due at once and rings the doorbell, and the clock runs from its commit
until the queue has no pending delivery left. Daemon start-up is thus not counted, and two
daemon processes start draining at the same moment.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from daemon.crypto import Crypto

# The call services' documented statement (docs/events.md), verbatim.
CALL_SERVICE_INSERT = (
    "INSERT INTO crm_events (event_type, payload) VALUES ($1, $2) ON CONFLICT DO NOTHING"
)
EXTENSIONS = ("150", "151", "152", "153")
USER_EXTENSIONS = {"1": "150", "2": "151", "3": "152"}
TRUNK = "0001363"
LINE = "+375173334455"
DRAIN_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Enterprise:
    """One seeded enterprise: its number and its ``Token`` (``enterprises.name2``)."""

    number: str
    token: str


def enterprises(count: int, *, start: int = 1) -> list[Enterprise]:
    """``count`` enterprises with numbers ``0001``… and 12-digit tokens."""
    width = max(4, len(str(start + count)))
    return [Enterprise(f"{n:0{width}d}", f"37529{n:07d}") for n in range(start, start + count)]


# ---------------------------------------------------------------------- configurations


def noop_config(revision: int | None = None) -> dict[str, Any]:
    """``integrations_config`` enabling the no-op adapter."""
    value: dict[str, Any] = {"enabled": True}
    if revision is not None:
        value["revision"] = revision
    return {"noop": value}


def fakecrm_config(crypto: Crypto, url: str, api_key: str) -> dict[str, Any]:
    """``integrations_config`` of the test suite's HTTP adapter (tests.support.fakecrm)."""
    return {"fakecrm": {"enabled": True, "url": url, "api_key": crypto.encrypt(api_key)}}


def retailcrm_config(crypto: Crypto, domain: str, api_key: str, client_id: str) -> dict[str, Any]:
    """A complete, realistic ``integrations_config->'retailcrm'`` (config.py's stored shape):
    the API key and the clientId encrypted, three managers mapped, one line's own number."""
    return {"retailcrm": {
        "enabled": True, "domain": domain, "api_key": crypto.encrypt(api_key),
        "popup_incoming": True, "popup_outgoing": True, "popup_hangup": True,
        "upload_history": True, "upload_recordings": True, "log_internal": False,
        "time_zone": "Europe/Minsk", "crm_time_zone": "Europe/Minsk", "region": "BY",
        "user_extensions": dict(USER_EXTENSIONS), "external_phones": {TRUNK: LINE},
        "site_code": "main", "client_id": crypto.encrypt(client_id), "token_version": 1,
        "last_sync": datetime.now(UTC).isoformat(timespec="seconds"), "sync_pending": False,
    }}


ADD_ENTERPRISE = """
INSERT INTO enterprises (number, name, name2, secret, active, integrations_config)
VALUES ($1, $2, $3, $4, true, $5)
"""
ADD_EXTENSION = """
INSERT INTO user_internal_phones (enterprise_number, phone_number, user_id) VALUES ($1, $2, $3)
"""


async def seed(conn: asyncpg.Connection, firms: Sequence[Enterprise],
               config: Callable[[Enterprise], Mapping[str, Any]], *,
               extensions: bool = False) -> None:
    """Insert ``firms`` with ``config(firm)`` as their integrations_config (and, when asked,
    their internal numbers ``EXTENSIONS``). ``conn`` is a plain asyncpg connection."""
    rows = [(f.number, f"Enterprise {f.number}", f.token, f"secret-{f.number}",
             json.dumps(dict(config(f)))) for f in firms]
    async with conn.transaction():
        await conn.executemany(ADD_ENTERPRISE, rows)
        if extensions:
            await conn.executemany(ADD_EXTENSION, [
                (f.number, ext, i + 1) for f in firms for i, ext in enumerate(EXTENSIONS)])


async def register(conn: asyncpg.Connection, integration: str,
                   event_types: Iterable[str] = ("dial", "hangup", "download")) -> None:
    """What a daemon does at start-up: the fan-out creates deliveries for ``integration``."""
    await conn.execute(
        "INSERT INTO crm_integrations (integration_type, event_types) VALUES ($1, $2) "
        "ON CONFLICT (integration_type) DO UPDATE SET event_types = EXCLUDED.event_types",
        integration, sorted(event_types))


# ---------------------------------------------------------------------- call bodies


def dial_body(token: str, uid: str, rng: random.Random) -> tuple[dict[str, Any], bool]:
    """A dial as the listener sends it; (body, incoming)."""
    phone = f"+37529{rng.randrange(10**7):07d}"
    if rng.random() < 0.7:
        ringing = [*rng.sample(EXTENSIONS, rng.randint(1, 3)), f"37529{rng.randrange(10**7)}"]
        return {"Token": token, "UniqueId": uid, "CallType": 0, "Phone": phone,
                "Extensions": ringing, "Trunk": TRUNK, "ExtPhone": phone}, True
    return {"Token": token, "UniqueId": uid, "CallType": 1, "Phone": "8029" + phone[6:],
            "Extensions": [rng.choice(EXTENSIONS)], "Trunk": TRUNK, "ExtPhone": ""}, False


def hangup_body(dial: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """The hangup of the call ``dial`` started: answered or missed."""
    received = datetime(2025, 9, 13, 9, 0, 0) + timedelta(seconds=rng.randrange(30_000))
    answered = rng.random() < 0.75
    start = received + timedelta(seconds=rng.randint(2, 20))
    end = start + timedelta(seconds=rng.randint(5, 600) if answered else 0)
    fmt = "%Y-%m-%d %H:%M:%S"
    return {"Token": dial["Token"], "UniqueId": dial["UniqueId"], "CallType": dial["CallType"],
            "Phone": dial["Phone"], "Extensions": [""], "Trunk": TRUNK,
            "DateReceived": received.strftime(fmt),
            "StartTime": start.strftime(fmt) if answered else "",
            "EndTime": end.strftime(fmt), "CallStatus": "2" if answered else "0"}


def calls(firms: Sequence[Enterprise], count: int, *, gap: int = 100, seed_: int = 7,
          prefix: str = "1757772742") -> list[tuple[str, str]]:
    """``count`` calls (dial + hangup: ``2 * count`` events) spread over ``firms``, as
    (event_type, JSON body), in arrival order: each hangup comes ``gap`` events after its
    dial, so calls overlap as they do on a busy platform."""
    rng = random.Random(seed_)
    out: list[tuple[str, str]] = []
    open_calls: list[dict[str, Any]] = []
    for n in range(count):
        body, _incoming = dial_body(firms[n % len(firms)].token, f"{prefix}.{n}", rng)
        out.append(("dial", json.dumps(body)))
        open_calls.append(body)
        if len(open_calls) > gap // 2:
            out.append(("hangup", json.dumps(hangup_body(open_calls.pop(0), rng))))
    out.extend(("hangup", json.dumps(hangup_body(b, rng))) for b in open_calls)
    return out


def token_of(body: str) -> str:
    """The ``Token`` of a JSON body built by ``calls``."""
    return str(json.loads(body)["Token"])


# ---------------------------------------------------------------------- the queue


async def insert(url: str, events: Sequence[tuple[str, str]], *, connections: int = 4) -> int:
    """Insert ``events`` with the call-service statement over ``connections`` connections
    (an enterprise's events stay on one connection, in order); rows admitted."""
    lanes: list[list[tuple[str, str]]] = [[] for _ in range(connections)]
    lane_of: dict[str, int] = {}
    for event in events:
        token = token_of(event[1])
        lane = lane_of.setdefault(token, len(lane_of) % connections)
        lanes[lane].append(event)

    async def run(lane: list[tuple[str, str]]) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.executemany(CALL_SERVICE_INSERT, lane)
        finally:
            await conn.close()

    await asyncio.gather(*(run(lane) for lane in lanes if lane))
    conn = await asyncpg.connect(url)
    try:
        admitted: int = await conn.fetchval("SELECT count(*) FROM crm_events")
    finally:
        await conn.close()
    return admitted


FREEZE = """
UPDATE crm_deliveries SET next_attempt_at = now() + interval '1 day' WHERE status = 'pending'
"""
RELEASE = "UPDATE crm_deliveries SET next_attempt_at = now() WHERE status = 'pending'"
PENDING = "SELECT count(*) FROM crm_deliveries WHERE status = 'pending'"
STATUSES = "SELECT status, count(*) AS n FROM crm_deliveries GROUP BY 1"


async def freeze(conn: asyncpg.Connection) -> int:
    """Make the whole backlog due tomorrow, then vacuum; deliveries frozen."""
    status: str = await conn.execute(FREEZE)
    await conn.execute("VACUUM (ANALYZE) crm_deliveries")
    await conn.execute("VACUUM (ANALYZE) crm_events")
    return int(status.split()[-1])


async def release(conn: asyncpg.Connection) -> float:
    """Make the backlog due now and ring the doorbell, in one transaction; returns the
    ``time.monotonic()`` right after its commit."""
    async with conn.transaction():
        await conn.execute(RELEASE)
        await conn.execute("SELECT pg_notify('crm_events', '')")
    return time.monotonic()


async def backlog(url: str, firms: Sequence[Enterprise], integration: str,
                  config: Callable[[Enterprise], Mapping[str, Any]], events: int, *,
                  extensions: bool = False) -> int:
    """Seed ``firms`` for ``integration``, insert ``events`` events (a dial and a hangup
    per call, ``calls``) with no daemon running, and freeze them; deliveries queued."""
    conn = await asyncpg.connect(url)
    try:
        await register(conn, integration)
        await seed(conn, firms, config, extensions=extensions)
    finally:
        await conn.close()
    await insert(url, calls(firms, events // 2))
    conn = await asyncpg.connect(url)
    try:
        return await freeze(conn)
    finally:
        await conn.close()


LOGGED = "SELECT coalesce(max(id), 0) FROM integration_logs"
CONFIRM_EVERY = 25  # polls between full checks when the log rows alone cannot tell


@dataclass(slots=True)
class Drain:
    """How long a drain took: until nothing was pending, and until 99 % of its log rows
    were written (a long last 1 % means the tail waited for something)."""

    seconds: float
    seconds_99: float | None


async def drained(conn: asyncpg.Connection, started: float, expected_logs: int, *,
                  timeout_s: float, logged: str = LOGGED, pending: str = PENDING) -> Drain:
    """Seconds from ``started`` until no delivery is pending, polled every 10 ms (the
    figure errs long by at most that).

    Counting pending deliveries costs the server milliseconds per poll — enough to slow
    what is measured — so each poll only reads the newest ``integration_logs`` id (one
    index probe); the count confirms once that reaches ``expected_logs`` (the log rows the
    drain writes into a fresh database), and every ``CONFIRM_EVERY`` polls regardless
    (a skip writes no log row). ``TimeoutError`` past ``timeout_s``. Another queue is
    watched the same way with its own ``logged`` (the newest log id) and ``pending``
    (how much is left) statements.
    """
    polls = 0
    at_99: float | None = None
    while True:
        polls += 1
        newest = await conn.fetchval(logged)
        if at_99 is None and newest >= 0.99 * expected_logs:
            at_99 = time.monotonic() - started
        if newest >= expected_logs or polls % CONFIRM_EVERY == 0:
            left = await conn.fetchval(pending)
            now = time.monotonic()
            if left == 0:
                return Drain(now - started, at_99)
        now = time.monotonic()
        if now - started > timeout_s:
            left = await conn.fetchval(pending)
            raise TimeoutError(f"{left} still pending after {timeout_s:g} s")
        await asyncio.sleep(DRAIN_POLL_S)


async def statuses(conn: asyncpg.Connection) -> dict[str, int]:
    """Deliveries by status."""
    return {r["status"]: r["n"] for r in await conn.fetch(STATUSES)}


# ---------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
