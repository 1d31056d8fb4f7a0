"""Pipeline benchmarks: call-service inserts, drains, latency, two instances, RetailCRM.

* ``pipeline.a`` — 8 call-service writers: rows/s into ``crm_events`` (triggers fan out and
  ring) against the same writers into a trigger-less table of the same shape.
* ``pipeline.b`` — a 20,000-event backlog drained by the real daemon with the no-op adapter.
* ``pipeline.c`` — the same through HTTP to a fake CRM answering at once (own process).
* ``pipeline.d`` — insert → the fake CRM's receipt, at a steady 500/s and 20/s: the daemon
  in its own process as deployed, the writer and the fake CRM in this one, so one monotonic
  clock times both ends.
* ``pipeline.e`` — two daemon processes draining one backlog together: rate, and every
  delivery attempted exactly once.
* ``pipeline.f`` — a backlog of real call sequences through the RetailCRM adapter to the
  RetailCRM simulator (own process), one API key per enterprise.

See docs/benchmarks.md for the method behind each figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import statistics
import time
from typing import Any

import asyncpg

from bench import upstream, workload, writers
from bench.daemons import (
    REPORTED,
    THROUGHPUT,
    daemon,
    delivered_count,
    process,
    throughput_environ,
)
from bench.harness import OUT_DIR, Harness, describe_settings
from bench.procfs import cpu_seconds
from bench.results import Row
from bench.rounds import Series, ratio
from bench.workload import CALL_SERVICE_INSERT
from daemon.settings import Settings
from tests.support.fakecrm import running_upstream

FAKE = "tests.support.fakecrm"
NOOP = "bench.noop"
DRAIN_EVENTS = 20_000
DRAIN_ENTERPRISES = 50
DRAIN_TIMEOUT_S = 120.0
RETAILCRM_EVENTS = 10_000
RETAILCRM_ENTERPRISES = 200
WARMUP_S = 1.0  # pipeline.d: paced events before the measured ones

# ---------------------------------------------------------------------- (a) insert rate

async def insert_rate(h: Harness) -> list[Row]:
    """pipeline.a: see the module docstring. Rounds alternate plain and fanned-out
    inserts, asyncpg writers then pgbench, three rounds (one with --quick)."""
    firms = workload.enterprises(DRAIN_ENTERPRISES)
    warmup_s, duration_s, count = (0.5, 2.0, 1) if h.quick else (1.0, 3.0, 3)
    rng = random.Random(1)
    templates = [json.dumps(workload.dial_body(firms[n % len(firms)].token, "__UID__", rng)[0])
                 for n in range(500)]
    c_template = json.dumps(workload.dial_body("__TOKEN__", "__UID__", rng)[0])
    got: dict[str, list[float]] = {"plain": [], "fanned": [], "c_plain": [], "c_fanned": []}
    cpu: dict[str, list[float]] = {"plain": [], "fanned": []}
    ring_rates = []
    async with h.database() as url:
        conn = await asyncpg.connect(url)
        rings = 0

        def on_ring(*_args: object) -> None:
            nonlocal rings
            rings += 1

        try:
            await workload.register(conn, "noop")
            await workload.seed(conn, firms, lambda f: workload.noop_config())
            await conn.execute(writers.PLAIN_TABLE)
            await conn.add_listener("crm_events", on_ring)  # a daemon would be listening
            for r in range(count):
                for key, statement in (("plain", writers.PLAIN_INSERT),
                                       ("fanned", CALL_SERVICE_INSERT)):
                    rings = 0
                    rate, share = await writers.run_writers(
                        url, statement, templates, f"{key}{r}-", warmup_s, duration_s)
                    got[key].append(rate)
                    cpu[key].append(share)
                ring_rates.append(rings / (warmup_s + duration_s))
                for key, table in (("c_plain", "bench_plain_events"),
                                   ("c_fanned", "crm_events")):
                    rate_c = await writers.pgbench(url, table, c_template, duration_s)
                    if rate_c is not None:
                        got[key].append(rate_c)
            deliveries = await conn.fetchval("SELECT count(*) FROM crm_deliveries")
            events = await conn.fetchval("SELECT count(*) FROM crm_events")
        finally:
            await conn.close()
    details = {
        "writers": writers.WRITERS, "seconds_per_round": duration_s, "rounds": count,
        "rows_per_s": {k: [round(x) for x in v] for k, v in got.items()},
        "bench_process_cpu_share": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
        "doorbell_rings_per_s": [round(x, 1) for x in ring_rates],
        "events": events, "deliveries": deliveries,
    }
    plain, fanned = Series(tuple(got["plain"])), Series(tuple(got["fanned"]))
    rows = [
        Row("pipeline.a plain INSERT, 8 asyncpg writers (baseline)",
            plain.text(unit=" rows/s"), value=plain.median, details=details),
        Row("pipeline.a crm_events INSERT, 8 asyncpg writers",
            fanned.text(unit=" rows/s"), value=fanned.median),
    ]
    for key, label in (("", "asyncpg writers"), ("c_", "pgbench (C client)")):
        ratio_ = ratio(got[f"{key}fanned"], got[f"{key}plain"])
        if ratio_ is None:
            continue
        figure = ratio_.text()
        if key:
            figure += (f", {statistics.median(got['c_fanned']):,.0f} / "
                       f"{statistics.median(got['c_plain']):,.0f} rows/s")
        rows.append(Row(f"pipeline.a ratio triggers/plain, {label}", figure, "≥ ×0.55")
                    .check(ratio_.value, at_least=0.55))
    return rows


# ---------------------------------------------------------------------- drains


async def _drain(url: str, total: int) -> tuple[workload.Drain, float]:
    """Release the frozen backlog of ``total`` deliveries; (how long it took to settle,
    this process's CPU seconds meanwhile — an in-process daemon's, give or take the poll)."""
    conn = await asyncpg.connect(url)
    try:
        cpu = time.process_time()
        started = await workload.release(conn)
        drain = await workload.drained(conn, started, total, timeout_s=DRAIN_TIMEOUT_S)
        return drain, time.process_time() - cpu
    finally:
        await conn.close()


async def _verify(url: str) -> tuple[dict[str, int], int, int, dict[str, int]]:
    """(deliveries by status, integration_logs rows, distinct events in those rows, failed
    attempts by error message)."""
    conn = await asyncpg.connect(url)
    try:
        counts = await workload.statuses(conn)
        logs = await conn.fetchval("SELECT count(*) FROM integration_logs")
        distinct = await conn.fetchval(
            "SELECT count(DISTINCT request_data->>'event_id') FROM integration_logs")
        errors = {r["error_message"]: r["n"] for r in await conn.fetch(
            "SELECT error_message, count(*) AS n FROM integration_logs "
            "WHERE status = 'error' GROUP BY 1 ORDER BY 2 DESC")}
        return counts, logs, distinct, errors
    finally:
        await conn.close()


def _drain_rows(name: str, label: str, total: int, drain: workload.Drain, cpu_s: float,
                target: float | None, counts: dict[str, int], logs: int,
                errors: dict[str, int], details: dict[str, Any]) -> list[Row]:
    seconds = drain.seconds
    rate = total / seconds
    details = {"events": total, "seconds": round(seconds, 3),
               "seconds_to_99pct": drain.seconds_99 and round(drain.seconds_99, 3),
               "statuses": counts, "log_rows": logs, "failed_attempts": errors,
               "daemon_cpu_share": round(cpu_s / seconds, 2),
               "daemon_cpu_us_per_event": round(cpu_s / total * 1e6), **details}
    row = Row(f"{name} {label}", f"{rate:,.0f} events/s", details=details)
    if target is not None:
        row.target = f"≥ {target:,.0f}/s"
        row.check(rate, at_least=target)
    else:
        row.value = rate
    if counts != {"done": total}:
        row.verdict = "MISS"
        row.figure += f" (settled: {counts})"
    if logs > total:
        row.figure += f" (+{logs - total} retried attempts)"
    return [row]


async def _drain_noop_once(h: Harness, total: int, instance: str
                           ) -> tuple[int, workload.Drain, float, dict[str, int], int,
                                      dict[str, int], Settings]:
    firms = workload.enterprises(DRAIN_ENTERPRISES)
    async with h.database() as url:
        queued = await workload.backlog(url, firms, "noop", lambda f: workload.noop_config(), total)
        settings = h.settings(url, integration=NOOP, instance_id=instance, **THROUGHPUT)
        async with daemon(settings):
            drain, cpu = await _drain(url, queued)
        counts, logs, _distinct, errors = await _verify(url)
    return queued, drain, cpu, counts, logs, errors, settings


async def drain_noop(h: Harness) -> list[Row]:
    """pipeline.b: see the module docstring. A full run drains a second backlog at log level
    debug, where every success is a log line: what that line costs (why it is debug)."""
    total = 6_000 if h.quick else DRAIN_EVENTS
    queued, drain, cpu, counts, logs, errors, settings = await _drain_noop_once(
        h, total, "bench-b")
    rows = _drain_rows("pipeline.b", "drain, no-op adapter, logs on", queued, drain,
                       cpu, 15_000, counts, logs, errors,
                       {"enterprises": DRAIN_ENTERPRISES,
                        "settings": describe_settings(settings, REPORTED)})
    if not h.quick:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.DEBUG)
        try:
            queued, drain, cpu, counts, logs, errors, _s = await _drain_noop_once(
                h, total, "bench-b2")
        finally:
            root.setLevel(level)
        rows += _drain_rows("pipeline.b", "same, a log line per delivery (debug)", queued,
                            drain, cpu, None, counts, logs, errors,
                            {"log_level": "debug"})
    return rows


async def drain_http(h: Harness) -> list[Row]:
    """pipeline.c: see the module docstring."""
    total = 6_000 if h.quick else DRAIN_EVENTS
    firms = workload.enterprises(DRAIN_ENTERPRISES)
    crypto = h.crypto
    async with h.database() as url, upstream.running("fakecrm") as up:
        queued = await workload.backlog(
            url, firms, "fakecrm",
            lambda f: workload.fakecrm_config(crypto, up.url, f"key-{f.number}"), total)
        settings = h.settings(url, integration=FAKE, instance_id="bench-c", **THROUGHPUT)
        drain, cpu, up_cpu = await _drain_to_crm(url, queued, settings, up.pid)
        counts, logs, _distinct, errors = await _verify(url)
    rows = _drain_rows("pipeline.c", "drain, HTTP to a loopback fake CRM", queued, drain,
                       cpu, 3_000, counts, logs, errors,
                       {"enterprises": len(firms), "upstream": up.summary,
                        "upstream_cpu_share": round(up_cpu, 2),
                        "settings": describe_settings(settings, REPORTED)})
    if up.summary.get("duplicates"):
        rows[0].verdict = "MISS"
    return rows


async def _drain_to_crm(url: str, queued: int, settings: Settings,
                        crm_pid: int) -> tuple[workload.Drain, float, float]:
    """A drain through the in-process daemon to a CRM in process ``crm_pid``: the drain, the
    daemon's CPU seconds, and the CRM's CPU share over the drain."""
    async with daemon(settings):
        crm_cpu = cpu_seconds(crm_pid)
        drain, cpu = await _drain(url, queued)
        crm_share = (cpu_seconds(crm_pid) - crm_cpu) / drain.seconds
    return drain, cpu, crm_share


# ---------------------------------------------------------------------- (d) latency


async def paced(url: str, events: list[tuple[str, str]], rate: float,
                sent: dict[str, float], insert_s: dict[str, float]) -> None:
    """Insert ``events`` at ``rate``/s on a fixed schedule (8 connections), recording when
    each was sent (by ``unique_id/event_type``) and how long each insert took."""
    pool = await asyncpg.create_pool(url, min_size=writers.WRITERS,
                                     max_size=writers.WRITERS)
    assert pool is not None

    keyed = [(t, body, f"{json.loads(body)['UniqueId']}/{t}") for t, body in events]

    async def one(event_type: str, body: str, key: str) -> None:
        t = time.monotonic()
        sent[key] = t
        await pool.execute(CALL_SERVICE_INSERT, event_type, body)
        insert_s[key] = time.monotonic() - t

    tasks = []
    try:
        start = time.monotonic() + 0.05
        for n, (event_type, body, key) in enumerate(keyed):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(event_type, body, key)))
        await asyncio.gather(*tasks)
    finally:
        await pool.close()


async def _latency_at(h: Harness, rate: float, count: int) -> dict[str, Any]:
    """``count`` events measured at ``rate``/s, after ``WARMUP_S`` of the same pace whose
    events are not: the daemon's first requests open its pool's and its HTTP client's
    connections (seen: p50 37 ms, max 101 ms over the first 400 events at 500/s, against
    p50 9 ms, max 20–35 ms from then on)."""
    firms = workload.enterprises(DRAIN_ENTERPRISES)
    crypto = h.crypto
    warmup = int(rate * WARMUP_S)
    events = workload.calls(firms, (warmup + count) // 2, gap=max(4, int(rate * 0.2)))
    sent: dict[str, float] = {}
    insert_s: dict[str, float] = {}
    OUT_DIR.mkdir(exist_ok=True)
    async with h.database() as url, running_upstream() as up:
        conn = await asyncpg.connect(url)
        try:
            await workload.register(conn, "fakecrm")
            await workload.seed(conn, firms, lambda f: workload.fakecrm_config(
                crypto, up.url, f"key-{f.number}"))
            env = h.environ(url, CRM_BRIDGE_INTEGRATION=FAKE, CRM_BRIDGE_PORT="0",
                            CRM_BRIDGE_INSTANCE_ID=f"bench-d{rate:g}")
            async with process(env, OUT_DIR / f"daemon-d{rate:g}.log"):
                await paced(url, events, rate, sent, insert_s)
                deadline = time.monotonic() + 30
                # Every delivery settled means every request has arrived.
                while (await conn.fetchval(workload.PENDING) or len(sent) < len(events)):
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()
        arrived = {f"{r.unique_id}/{r.event_type}": r.arrived for r in up.received}
    measured = list(sent)[warmup:]
    latencies = [arrived[k] - sent[k] for k in measured if k in arrived]
    return {"rate": rate, "events": len(measured), "warmup_events": warmup,
            "received": len(latencies), "latencies_s": latencies,
            "insert_s": [insert_s[k] for k in measured if k in insert_s],
            "settings": describe_settings(h.settings(url), REPORTED)}


def latency_rows(name: str, got: dict[str, Any]) -> list[Row]:
    """p50 and p99 rows (targets 5 and 25 ms) of one rate's latencies (``got`` holds
    ``latencies_s`` and ``insert_s``, moved into the details as percentiles)."""
    lat = got.pop("latencies_s")
    ins = got.pop("insert_s")
    p50 = workload.percentile(lat, 0.5) * 1000
    p90 = workload.percentile(lat, 0.9) * 1000
    p99 = workload.percentile(lat, 0.99) * 1000
    got.update({"p50_ms": round(p50, 2), "p90_ms": round(p90, 2),
                "p99_ms": round(p99, 2), "max_ms": round(max(lat, default=0) * 1000, 2),
                "insert_p50_ms": round(workload.percentile(ins, 0.5) * 1000, 2),
                "insert_p99_ms": round(workload.percentile(ins, 0.99) * 1000, 2)})
    lost = got["events"] - got["received"]
    p50_row = Row(f"{name} p50", f"{p50:,.1f} ms", "≤ 5 ms", details=got).check(p50, at_most=5)
    p99_row = Row(f"{name} p99", f"{p99:,.1f} ms", "≤ 25 ms").check(p99, at_most=25)
    if lost:
        p99_row.verdict = "MISS"
        p99_row.figure += f" ({lost} never arrived)"
    return [p50_row, p99_row]


async def latency(h: Harness) -> list[Row]:
    """pipeline.d: see the module docstring."""
    rows = []
    fast, slow = (1_000, 100) if h.quick else (2_000, 200)
    for rate, count in ((500.0, fast), (20.0, slow)):
        got = await _latency_at(h, rate, count)
        rows += latency_rows(f"pipeline.d insert→CRM @{rate:g}/s", got)
    return rows


# ---------------------------------------------------------------------- (e) two instances


async def two_instances(h: Harness) -> list[Row]:
    """pipeline.e: see the module docstring."""
    total = 6_000 if h.quick else DRAIN_EVENTS
    firms = workload.enterprises(DRAIN_ENTERPRISES)
    OUT_DIR.mkdir(exist_ok=True)
    logs_paths = [OUT_DIR / f"daemon-e{k}.log" for k in (1, 2)]
    async with h.database() as url:
        queued = await workload.backlog(url, firms, "noop", lambda f: workload.noop_config(), total)
        settings = h.settings(url, integration=NOOP, **THROUGHPUT)
        env = h.environ(url, CRM_BRIDGE_INTEGRATION=NOOP, CRM_BRIDGE_PORT="0",
                        **throughput_environ())
        async with contextlib.AsyncExitStack() as stack:
            codes = []
            procs = [await stack.enter_async_context(
                process({**env, "CRM_BRIDGE_INSTANCE_ID": f"bench-e{k}"}, path))
                for k, path in enumerate(logs_paths, start=1)]
            cpu = [cpu_seconds(p.pid) for p in procs]
            drain, _ = await _drain(url, queued)
            seconds = drain.seconds
            cpu = [cpu_seconds(p.pid) - c for p, c in zip(procs, cpu, strict=True)]
            # Who delivered what: each process's own counter, read before it stops.
            split = [await delivered_count(path) for path in logs_paths]
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                codes.append(await asyncio.wait_for(proc.wait(), 30))
        counts, logs, distinct, errors = await _verify(url)
        conn = await asyncpg.connect(url)
        try:
            retried = await conn.fetchval(
                "SELECT count(*) FROM integration_logs WHERE request_data->>'attempt' <> '1'")
        finally:
            await conn.close()
    shown = f"{split[0]:,}+{split[1]:,}"
    exactly_once = (counts == {"done": queued} and logs == queued and distinct == queued
                    and retried == 0 and codes == [0, 0])
    details = {"events": queued, "seconds": round(seconds, 3),
               "seconds_to_99pct": drain.seconds_99 and round(drain.seconds_99, 3),
               "statuses": counts,
               "log_rows": logs, "distinct_events_logged": distinct,
               "attempts_beyond_first": retried, "failed_attempts": errors,
               "per_instance_deliveries": split,
               "exit_codes": codes,
               "daemon_cpu_share": [round(c / seconds, 2) for c in cpu],
               "settings": describe_settings(settings, REPORTED)}
    rate = queued / seconds
    return [
        Row("pipeline.e drain, 2 daemon processes, no-op (compare b)",
            f"{rate:,.0f} events/s", value=rate, details=details),
        Row("pipeline.e exactly once (logs = deliveries, no dup/loss)",
            f"{logs:,} logs / {queued:,} deliveries, split {shown}",
            "exactly once", "ok" if exactly_once else "MISS"),
    ]


# ---------------------------------------------------------------------- (f) RetailCRM


async def drain_retailcrm(h: Harness) -> list[Row]:
    """pipeline.f: see the module docstring."""
    total = 4_000 if h.quick else RETAILCRM_EVENTS
    firms = workload.enterprises(RETAILCRM_ENTERPRISES)
    keys = {f.number: f"rcrm-key-{f.number}-0123456789abcdef" for f in firms}
    crypto = h.crypto
    async with h.database() as url, upstream.running("retailcrm",
                                                     api_keys=list(keys.values())) as sim:
        queued = await workload.backlog(
            url, firms, "retailcrm",
            lambda f: workload.retailcrm_config(crypto, sim.url, keys[f.number],
                                                f"client-{f.number}-abcdef0123456789"),
            total, extensions=True)
        settings = h.settings(url, integration="retailcrm", instance_id="bench-f",
                              **THROUGHPUT)
        drain, cpu, sim_cpu = await _drain_to_crm(url, queued, settings, sim.pid)
        counts, logs, _distinct, errors = await _verify(url)
    rows = _drain_rows("pipeline.f", "RetailCRM drain (simulator), logs on", queued, drain,
                       cpu, 3_000, counts, logs, errors,
                       {"enterprises": len(firms), "simulator": sim.summary,
                        "simulator_cpu_share": round(sim_cpu, 2),
                        "settings": describe_settings(settings, REPORTED)})
    if twice := sim.summary.get("duplicate_call_events"):
        rows[0].figure += f" ({twice} popups sent twice)"
    return rows
