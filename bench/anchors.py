"""The drain anchors: crm-bridge against a pgqueuer worker, in alternating rounds.

* ``anchor.noop`` — 20,000 events: crm-bridge (``python -m daemon run``, the no-op adapter)
  against a pgqueuer worker with a no-op handler at batch 100.
* ``anchor.retailcrm`` — 10,000 events over 200 enterprises: crm-bridge's RetailCRM adapter
  against the pgqueuer worker that posts the same RetailCRM requests, both to one nginx
  answering ``{"success":true}`` (``bench.nginx``), so the senders' CPU is what differs.

Each round starts from a fresh database and the same call events (``workload.calls``):
crm-bridge's as a frozen backlog of deliveries, pgqueuer's as frozen jobs. The consumer
process starts and settles, then one statement makes everything due and the clock runs
until the queue is empty. CPU is read from ``/proc`` before and after, for the consumer
process, the upstream (nginx, master and worker) and the whole PostgreSQL server
(``bench.procfs``). docs/benchmarks.md says what the rows mean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

import asyncpg

from bench import nginx, pgqworker, rounds, sampling, workload
from bench.daemons import process, throughput_environ
from bench.harness import OUT_DIR, Harness
from bench.procfs import cpu_of, postmaster_pid
from bench.results import Row
from bench.rounds import CONSUMER, POSTGRES, UPSTREAM, Round
from bench.workload import Enterprise

NOOP_EVENTS = 20_000
NOOP_ENTERPRISES = 50
RETAILCRM_EVENTS = 10_000
RETAILCRM_ENTERPRISES = 200
ROUNDS = 3
QUICK_ROUNDS = 1
DRAIN_TIMEOUT_S = 180.0


def _rounds(h: Harness) -> int:
    return QUICK_ROUNDS if h.quick else ROUNDS


Release = Callable[[asyncpg.Connection], Awaitable[float]]


async def _release_jobs(conn: asyncpg.Connection) -> float:
    """Make pgqueuer's frozen jobs due (its statement trigger notifies its worker)."""
    await conn.execute(pgqworker.RELEASE)
    return time.monotonic()


async def _measure(url: str, consumer: int, upstream: int | None, release: Release,
                   logged: str, pending: str, expected: Callable[[int], int]
                   ) -> tuple[float, dict[str, float | None]]:
    """Release the frozen queue of ``url`` and wait until it is empty: (seconds, CPU
    seconds of each process over that time)."""
    conn = await asyncpg.connect(url)
    try:
        server = await postmaster_pid(conn)
        before_logs = await conn.fetchval(logged)
        pids = (consumer, upstream, server)
        before = cpu_of(pids)
        started = await release(conn)
        drain = await workload.drained(conn, started, expected(before_logs),
                                       timeout_s=DRAIN_TIMEOUT_S, logged=logged,
                                       pending=pending)
        after = cpu_of(pids)
    finally:
        await conn.close()
    spent = [None if a is None or b is None else b - a for a, b in zip(before, after, strict=True)]
    return drain.seconds, dict(zip((CONSUMER, UPSTREAM, POSTGRES), spent, strict=True))


async def crm_round(h: Harness, name: str, adapter: tuple[str, str], firms: list[Enterprise],
                    config: Callable[[Enterprise], Mapping[str, Any]], events: int, *,
                    upstream: int | None = None, profile: bool = False) -> Round:
    """One crm-bridge drain of ``events`` events (see the module docstring); ``adapter``
    is (the adapter's name, what ``CRM_BRIDGE_INTEGRATION`` loads)."""
    adapter_name, integration = adapter
    async with h.database() as url:
        queued = await workload.backlog(url, firms, adapter_name, config, events,
                                        extensions=adapter_name == "retailcrm")
        env = h.environ(url, CRM_BRIDGE_INTEGRATION=integration, CRM_BRIDGE_PORT="0",
                        CRM_BRIDGE_INSTANCE_ID=f"bench-{name}", **throughput_environ())
        async with process(env, OUT_DIR / f"daemon-{name}.log") as proc:
            spy: AbstractAsyncContextManager[dict[str, Any]] = (
                sampling.sampled(proc.pid, OUT_DIR / f"{name}.pyspy.txt") if profile
                else nullcontext({}))
            async with spy as found:
                seconds, cpu = await _measure(
                    url, proc.pid, upstream, workload.release, workload.LOGGED,
                    workload.PENDING, lambda before: before + queued)
        conn = await asyncpg.connect(url)
        try:
            counts = await workload.statuses(conn)
            attempts = await conn.fetchval("SELECT count(*) FROM integration_logs")
        finally:
            await conn.close()
    details: dict[str, Any] = {"statuses": counts, "attempts": attempts}
    if found:
        details["profile"] = found
        print(f"bench: {name} sampled profile of the daemon:\n{sampling.describe(found)}",
              file=sys.stderr)
    return Round("crm-bridge", queued, seconds, cpu, details)


async def pgq_round(h: Harness, firms: list[Enterprise], events: int, mode: str, *,
                    upstream: nginx.StaticUpstream | None = None) -> Round:
    """One pgqueuer drain of the same events (see the module docstring)."""
    async with h.database() as url:
        conn = await asyncpg.connect(url)
        try:
            await pgqworker.install(conn)
            queued = await pgqworker.enqueue_frozen(conn, workload.calls(firms, events // 2))
        finally:
            await conn.close()
        async with pgqworker.running(url, mode, upstream=upstream.url if upstream else ""
                                     ) as worker:
            seconds, cpu = await _measure(
                url, worker.pid, upstream.pid if upstream else None, _release_jobs,
                pgqworker.LOGGED, pgqworker.LEFT,
                lambda before: before + 2 * queued)  # a pick and a done per job
    return Round("pgqueuer", queued, seconds, cpu, {"worker": worker.summary})


# ---------------------------------------------------------------------- the rows


def _settled(got: list[Round]) -> str:
    """'' when every crm-bridge delivery ended done, else what did not."""
    bad = [r.details["statuses"] for r in got
           if "statuses" in r.details and r.details["statuses"] != {"done": r.deliveries}]
    failed = [r.details["worker"].get("failed") for r in got
              if r.details.get("worker", {}).get("failed")]
    if bad:
        return f" (settled: {bad[0]})"
    return f" ({failed[0]} failed jobs)" if failed else ""


def comparison_rows(name: str, what: str, yardstick: str, got: dict[str, list[Round]], *,
                    rate_at_least: float, cpu_at_most: float | None,
                    cpu_ms_at_most: float | None = None) -> list[Row]:
    """The rows of one anchor: each side's rate, the rate ratio, CPU per 1,000 by process."""
    ours, theirs = got["crm-bridge"], got["pgqueuer"]
    details = {"rounds": {side: [r.summary() for r in rs] for side, rs in got.items()}}
    rows = []
    for side, label, rs in (("crm-bridge", what, ours), ("pgqueuer", yardstick, theirs)):
        s = rounds.series([r.rate for r in rs])
        assert s is not None
        unsettled = _settled(rs)
        rows.append(Row(f"{name} {label} ({len(rs)} rounds)",
                        f"{s.text(unit='/s')}{unsettled}", value=s.median,
                        # a drain that lost or failed work measured something else
                        verdict="MISS" if unsettled else "-",
                        details=details if side == "crm-bridge" else {}))
    rate = rounds.ratio([r.rate for r in ours], [r.rate for r in theirs])
    if rate is not None:
        rows.append(Row(f"{name} rate crm-bridge / pgqueuer", rate.text(),
                        f"≥ ×{rate_at_least:g}").check(rate.value, at_least=rate_at_least))
    for proc, label in ((CONSUMER, "daemon / worker"), (UPSTREAM, "nginx"),
                        (POSTGRES, "PostgreSQL")):
        a, b = rounds.cpu_values(ours, proc), rounds.cpu_values(theirs, proc)
        sa, sb = rounds.series(a), rounds.series(b)
        if sa is None or sb is None:
            continue
        cpu = rounds.ratio(a, b)
        row = Row(f"{name} CPU s per 1,000, {label}",
                  f"{sa.text('.3f')} vs {sb.text('.3f')}"
                  + (f" = ×{cpu.value:.2f}" if cpu else ""))
        if proc == CONSUMER and cpu is not None and cpu_at_most is not None:
            row.target = f"≤ ×{cpu_at_most:g}"
            row.check(cpu.value, at_most=cpu_at_most)
        rows.append(row)
        if proc == CONSUMER and cpu_ms_at_most is not None:
            rows.append(Row(f"{name} daemon CPU per delivery", sa.text(".2f", " ms"),
                            f"≤ {cpu_ms_at_most:g} ms").check(sa.median,
                                                              at_most=cpu_ms_at_most))
    return rows


# ---------------------------------------------------------------------- the anchors


async def noop(h: Harness) -> list[Row]:
    """anchor.noop: see the module docstring."""
    firms = workload.enterprises(NOOP_ENTERPRISES)
    events = 6_000 if h.quick else NOOP_EVENTS

    def ours(k: int) -> Awaitable[Round]:
        return crm_round(h, "anchor-noop", ("noop", "bench.noop"), firms,
                         lambda f: workload.noop_config(), events, profile=k < 0)

    def theirs(k: int) -> Awaitable[Round]:
        return pgq_round(h, firms, events, "noop")

    got = await rounds.interleave(_rounds(h), [("crm-bridge", ours), ("pgqueuer", theirs)])
    rows = comparison_rows("anchor.noop", "crm-bridge drain, no-op adapter",
                           f"pgqueuer worker, no-op, batch {pgqworker.BATCH_SIZE}", got,
                           rate_at_least=1.2, cpu_at_most=1.0)
    if h.profile:
        rows[0].details["profiled_round"] = (await ours(-1)).summary()
    return rows


async def retailcrm(h: Harness) -> list[Row]:
    """anchor.retailcrm: see the module docstring."""
    firms = workload.enterprises(RETAILCRM_ENTERPRISES)
    events = 3_000 if h.quick else RETAILCRM_EVENTS
    crypto = h.crypto
    async with nginx.running() as upstream:
        def config(f: Enterprise) -> Mapping[str, Any]:
            return workload.retailcrm_config(crypto, upstream.url, f"rcrm-key-{f.number}-0123",
                                             f"client-{f.number}-abcdef0123456789")

        def ours(k: int) -> Awaitable[Round]:
            return crm_round(h, "anchor-retailcrm", ("retailcrm", "retailcrm"), firms, config,
                             events,
                             upstream=upstream.pid, profile=k < 0)

        def theirs(k: int) -> Awaitable[Round]:
            return pgq_round(h, firms, events, "http", upstream=upstream)

        got = await rounds.interleave(_rounds(h), [("crm-bridge", ours),
                                                   ("pgqueuer", theirs)])
        profiled = (await ours(-1)).summary() if h.profile else None
    rows = comparison_rows("anchor.retailcrm", "crm-bridge RetailCRM drain to nginx",
                           "pgqueuer worker posting the same requests", got,
                           rate_at_least=1.0, cpu_at_most=None, cpu_ms_at_most=0.5)
    if profiled:
        rows[0].details["profiled_round"] = profiled
    return rows
