"""Admin journal benchmarks: the first page of a big journal, and the live view's latency.

* ``journal.a`` — one enterprise with 100,000 deliveries (and nine others with 100,000 more
  between them), written straight into ``crm_events``/``crm_deliveries`` (triggers off for
  the seeding only; 2 % failed, the rest done), then ``ANALYZE``. A daemon (no-op adapter)
  runs in this process; a client signed in through a real admin link asks, one request at
  a time, for the journal page (HTML, the first page: 50 rows) — the figure the issue sets
  (p99 ≤ 50 ms) —, then the same page through the JSON API, a page 1,500 pages deep (keyset
  cursor) and a page filtered on ``status=failed``.
* ``journal.b`` — a journal page's live view (server-sent events) is open; a call event is
  inserted the way a call service inserts it, every 50 ms; one sample is the time from just
  before the INSERT to the moment the delivery arrives on the open event stream (p99 ≤
  100 ms). Client and daemon share this process and its event loop: the figures include
  the client's own work.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg

from bench import workload
from bench.harness import Harness
from bench.results import Row
from daemon import db, links
from tests.support.daemon import running
from tests.support.seed import CALL_SERVICE_INSERT

NOOP = "bench.noop"
PREFIX = "/noop-admin"
DELIVERIES = 100_000
OTHERS = 9
PAGE_P99_TARGET_MS = 50.0
LIVE_P99_TARGET_MS = 100.0

SEED_EVENTS = """
INSERT INTO crm_events (enterprise_number, event_type, unique_id, payload, received_at,
                        dedup_key)
SELECT $1, CASE WHEN g % 3 = 0 THEN 'dial' ELSE 'hangup' END, '1757772742.' || g,
       jsonb_build_object('Token', $2::text, 'UniqueId', '1757772742.' || g, 'CallType', 0,
                          'Phone', '+37529' || lpad((g * 7919 % 10000000)::text, 7, '0'),
                          'Extensions', jsonb_build_array('101')),
       now() - make_interval(secs => ($3 - g) * 3), md5(g::text)
  FROM generate_series(1, $3) g
"""
SEED_DELIVERIES = """
INSERT INTO crm_deliveries (event_id, integration_type, enterprise_number, unique_id, status,
                            attempts, delivered_at, last_error)
SELECT id, 'noop', enterprise_number, unique_id,
       CASE WHEN id % 50 = 0 THEN 'failed' ELSE 'done' END, 1, received_at,
       CASE WHEN id % 50 = 0 THEN 'http_400: refused' END
  FROM crm_events
"""


async def _seed(url: str, firms: list[workload.Enterprise]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await workload.register(conn, "noop")
        await workload.seed(conn, firms, lambda f: workload.noop_config())
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(SEED_EVENTS, firms[0].number, firms[0].token, DELIVERIES)
            for firm in firms[1:]:
                await conn.execute(SEED_EVENTS, firm.number, firm.token, DELIVERIES // OTHERS)
            await conn.execute(SEED_DELIVERIES)
        await conn.execute("ANALYZE crm_events")
        await conn.execute("ANALYZE crm_deliveries")
    finally:
        await conn.close()


async def _signed_in(http: aiohttp.ClientSession, h: Harness, url: str, base: str,
                     enterprise: str) -> None:
    conn = await db.connect(url)
    try:
        token = await links.issue(conn, h.secret_key, enterprise, "noop")
    finally:
        await conn.close()
    async with http.get(f"{base}{PREFIX}/?token={token}", allow_redirects=False) as answer:
        assert answer.status == 303, answer.status


async def _timed(samples: int, request: Callable[[], Awaitable[int]]) -> list[float]:
    for _ in range(10):  # warm-up: prepared statements, template cache
        await request()
    out = []
    for _ in range(samples):
        started = time.perf_counter()
        status = await request()
        out.append((time.perf_counter() - started) * 1000)
        assert status == 200, status
    return out


def _rows(name: str, samples: list[float], target: float | None,
          details: dict[str, Any]) -> list[Row]:
    p50, p99 = workload.percentile(samples, 0.5), workload.percentile(samples, 0.99)
    details = {**details, "samples": len(samples), "p50_ms": round(p50, 2),
               "p90_ms": round(workload.percentile(samples, 0.9), 2), "p99_ms": round(p99, 2),
               "max_ms": round(max(samples), 2)}
    if target is None:
        return [Row(f"{name} p99", f"{p99:.1f} ms (p50 {p50:.1f})", details=details,
                    value=p99)]
    return [Row(f"{name} p50", f"{p50:.1f} ms", details=details, value=p50),
            Row(f"{name} p99", f"{p99:.1f} ms", f"≤ {target:g} ms").check(p99, at_most=target)]


async def first_page(h: Harness) -> list[Row]:
    """journal.a: see the module docstring."""
    samples = 200 if h.quick else 1_000
    firms = workload.enterprises(1 + OTHERS)
    firm = firms[0].number
    async with h.database() as url:
        await _seed(url, firms)
        jar = aiohttp.CookieJar(unsafe=True)
        async with running(h.settings(url, integration=NOOP)) as daemon, \
                aiohttp.ClientSession(cookie_jar=jar) as http:
            await _signed_in(http, h, url, daemon.url, firm)
            deep = await daemon.rt.pool.fetchval(
                "SELECT event_id FROM crm_deliveries WHERE enterprise_number = $1 "
                "ORDER BY event_id LIMIT 1 OFFSET 25000", firm)

            def getter(path: str) -> Callable[[], Awaitable[int]]:
                async def get() -> int:
                    async with http.get(daemon.url + path) as answer:
                        await answer.read()
                        return answer.status
                return get

            details = {"deliveries_of_the_enterprise": DELIVERIES,
                       "deliveries_in_the_table": DELIVERIES + DELIVERIES // OTHERS * OTHERS,
                       "rows_per_page": 50}
            rows = _rows("journal.a page 1 of 100,000 (HTML)",
                         await _timed(samples, getter(f"{PREFIX}/{firm}/journal")),
                         PAGE_P99_TARGET_MS, details)
            rows += _rows("journal.a page 1 (JSON API)",
                          await _timed(samples, getter(f"{PREFIX}/api/journal/{firm}")),
                          PAGE_P99_TARGET_MS, details)
            rows += _rows("journal.a page 1,500 deep (keyset, HTML)", await _timed(
                samples // 2, getter(f"{PREFIX}/{firm}/journal?before={deep}")), None, details)
            rows += _rows("journal.a status=failed page (HTML)", await _timed(
                samples // 2, getter(f"{PREFIX}/{firm}/journal?status=failed")), None, details)
    return rows


async def live_view(h: Harness) -> list[Row]:
    """journal.b: see the module docstring."""
    count = 60 if h.quick else 200
    firms = workload.enterprises(1)
    async with h.database() as url:
        conn = await asyncpg.connect(url)
        try:
            await workload.register(conn, "noop")
            await workload.seed(conn, firms, lambda f: workload.noop_config())
        finally:
            await conn.close()
        jar = aiohttp.CookieJar(unsafe=True)
        async with running(h.settings(url, integration=NOOP)) as daemon, \
                aiohttp.ClientSession(cookie_jar=jar) as http:
            await _signed_in(http, h, url, daemon.url, firms[0].number)
            samples = await _live_samples(http, daemon.url, url, firms[0], count)
    details = {"events": count, "interval_ms": 50, "received": len(samples)}
    rows = _rows("journal.b INSERT → open page (SSE)", samples, LIVE_P99_TARGET_MS, details)
    if len(samples) < count:
        rows[-1].verdict = "MISS"
    return rows


async def _live_samples(http: aiohttp.ClientSession, base: str, url: str,
                        firm: workload.Enterprise, count: int) -> list[float]:
    arrived: dict[str, float] = {}
    opened = asyncio.Event()
    stream = await http.get(f"{base}{PREFIX}/{firm.number}/journal/live",
                            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))

    async def read() -> None:
        async for raw in stream.content:
            line = raw.decode()
            if line.startswith(": watching"):
                opened.set()
            elif line.startswith("data: "):
                item = json.loads(line[6:])
                arrived.setdefault(item["call_id"], time.perf_counter())

    reader = asyncio.create_task(read())
    writer = await asyncpg.connect(url)
    sent: dict[str, float] = {}
    try:
        await asyncio.wait_for(opened.wait(), 5)
        for k in range(count):
            uid = f"1757841115.{k}"
            body = json.dumps({"Token": firm.token, "UniqueId": uid, "CallType": 0,
                               "Phone": "+375291234567", "Extensions": ["101"]})
            sent[uid] = time.perf_counter()
            await writer.execute(CALL_SERVICE_INSERT, "dial", body, None, None)
            await asyncio.sleep(0.05)
        deadline = time.perf_counter() + 2.0
        while len(arrived) < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await writer.close()
        reader.cancel()
        stream.close()
    return [(arrived[uid] - at) * 1000 for uid, at in sent.items() if uid in arrived]
