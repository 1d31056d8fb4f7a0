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
(``bench.procfs``), and nginx says how many requests it answered meanwhile: a side that
sends fewer requests per delivery (uploads sharing a request) does less work, and the
table says so. docs/benchmarks.md says what the rows mean.

With ``--baseline DIR`` (another checkout of crm-bridge, e.g. ``git worktree add DIR
main``) each anchor runs a third side in the same rounds, that checkout's daemon on the same
database, interpreter and workload: before and after a change, measured under the same
load.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any

import asyncpg

from bench import nginx, pgqworker, rounds, sampling, workload
from bench.daemons import process, throughput_environ
from bench.harness import OUT_DIR, ROOT, Harness
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
    if h.rounds:
        return h.rounds
    return QUICK_ROUNDS if h.quick else ROUNDS


Release = Callable[[asyncpg.Connection], Awaitable[float]]


async def _release_jobs(conn: asyncpg.Connection) -> float:
    """Make pgqueuer's frozen jobs due (its statement trigger notifies its worker)."""
    await conn.execute(pgqworker.RELEASE)
    return time.monotonic()


async def _measure(url: str, consumer: int, upstream: nginx.StaticUpstream | None,
                   release: Release, logged: str, pending: str,
                   expected: Callable[[int], int]
                   ) -> tuple[float, dict[str, float | None], int | None]:
    """Release the frozen queue of ``url`` and wait until it is empty: (seconds, CPU
    seconds of each process over that time, requests the upstream answered meanwhile)."""
    conn = await asyncpg.connect(url)
    try:
        server = await postmaster_pid(conn)
        before_logs = await conn.fetchval(logged)
        pids = (consumer, upstream.pid if upstream else None, server)
        served = await nginx.requests_served(upstream.url) if upstream else 0
        before = cpu_of(pids)
        started = await release(conn)
        drain = await workload.drained(conn, started, expected(before_logs),
                                       timeout_s=DRAIN_TIMEOUT_S, logged=logged,
                                       pending=pending)
        after = cpu_of(pids)
        # The second reading is a request too: it is not the consumer's.
        requests = (await nginx.requests_served(upstream.url) - served - 1) if upstream else None
    finally:
        await conn.close()
    spent = [None if a is None or b is None else b - a for a, b in zip(before, after, strict=True)]
    return drain.seconds, dict(zip((CONSUMER, UPSTREAM, POSTGRES), spent, strict=True)), requests


async def crm_round(h: Harness, name: str, adapter: tuple[str, str], firms: list[Enterprise],
                    config: Callable[[Enterprise], Mapping[str, Any]], events: int, *,
                    upstream: nginx.StaticUpstream | None = None, profile: bool = False,
                    root: Path = ROOT, side: str = "crm-bridge") -> Round:
    """One crm-bridge drain of ``events`` events (see the module docstring); ``adapter``
    is (the adapter's name, what ``CRM_BRIDGE_INTEGRATION`` loads); ``root`` the checkout
    whose daemon runs (the baseline's, for that side)."""
    adapter_name, integration = adapter
    async with h.database() as url:
        queued = await workload.backlog(url, firms, adapter_name, config, events,
                                        extensions=adapter_name == "retailcrm")
        env = h.environ(url, CRM_BRIDGE_INTEGRATION=integration, CRM_BRIDGE_PORT="0",
                        CRM_BRIDGE_INSTANCE_ID=f"bench-{name}", **throughput_environ())
        async with process(env, OUT_DIR / f"daemon-{name}.log", root=root) as proc:
            spy: AbstractAsyncContextManager[dict[str, Any]] = (
                sampling.sampled(proc.pid, OUT_DIR / f"{name}.pyspy.txt") if profile
                else nullcontext({}))
            async with spy as found:
                seconds, cpu, requests = await _measure(
                    url, proc.pid, upstream, workload.release, workload.LOGGED,
                    workload.PENDING, lambda before: before + queued)
        conn = await asyncpg.connect(url)
        try:
            counts = await workload.statuses(conn)
            attempts = await conn.fetchval("SELECT count(*) FROM integration_logs")
        finally:
            await conn.close()
    details: dict[str, Any] = {"statuses": counts, "attempts": attempts}
    if requests is not None:
        details["requests"] = requests
    if found:
        details["profile"] = found
        print(f"bench: {name} sampled profile of the daemon:\n{sampling.describe(found)}",
              file=sys.stderr)
    return Round(side, queued, seconds, cpu, details)


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
            seconds, cpu, requests = await _measure(
                url, worker.pid, upstream, _release_jobs, pgqworker.LOGGED, pgqworker.LEFT,
                lambda before: before + 2 * queued)  # a pick and a done per job
    details: dict[str, Any] = {"worker": worker.summary}
    if requests is not None:
        details["requests"] = requests
    return Round("pgqueuer", queued, seconds, cpu, details)


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
    rows += _request_rows(name, ours, theirs)
    if "baseline" in got:
        rows += baseline_rows(name, ours, got["baseline"])
    return rows


def _requests_per_delivery(rs: list[Round]) -> rounds.Series | None:
    counts = [r.details.get("requests") for r in rs]
    return rounds.series([None if n is None else n / r.deliveries
                          for n, r in zip(counts, rs, strict=True)])


def _request_rows(name: str, ours: list[Round], theirs: list[Round]) -> list[Row]:
    """How many requests the upstream answered per delivery on each side: CPU per delivery
    compares like with like only when they are equal."""
    sa, sb = _requests_per_delivery(ours), _requests_per_delivery(theirs)
    if sa is None or sb is None:
        return []
    return [Row(f"{name} upstream requests per delivery, crm-bridge / pgqueuer",
                f"{sa.text('.2f')} vs {sb.text('.2f')}")]


def baseline_rows(name: str, ours: list[Round], base: list[Round]) -> list[Row]:
    """This checkout against ``--baseline``'s daemon, measured in the same rounds: the
    rate, and CPU per 1,000 deliveries of the daemon and of PostgreSQL, as ratios (below 1:
    this checkout spends less)."""
    drained = rounds.series([r.rate for r in base])
    assert drained is not None
    rows = [Row(f"{name} baseline drain ({len(base)} rounds)",
                f"{drained.text(unit='/s')}{_settled(base)}",
                details={"rounds": [r.summary() for r in base]})]
    rate = rounds.ratio([r.rate for r in ours], [r.rate for r in base])
    if rate is not None:
        rows.append(Row(f"{name} rate crm-bridge / baseline", rate.text()))
    for proc, label in ((CONSUMER, "daemon"), (POSTGRES, "PostgreSQL")):
        a, b = rounds.cpu_values(ours, proc), rounds.cpu_values(base, proc)
        sa, sb, cpu = rounds.series(a), rounds.series(b), rounds.ratio(a, b)
        if sa is None or sb is None or cpu is None:
            continue
        rows.append(Row(f"{name} CPU s per 1,000, {label}, crm-bridge / baseline",
                        f"{sa.text('.3f')} vs {sb.text('.3f')} = {cpu.text()}"))
    requests = _requests_per_delivery(base)
    if requests is not None:
        rows.append(Row(f"{name} baseline upstream requests per delivery",
                        requests.text(".2f")))
    return rows


def _sides(h: Harness, ours: Callable[[int], Awaitable[Round]],
           theirs: Callable[[int], Awaitable[Round]],
           baseline: Callable[[int], Awaitable[Round]]
           ) -> list[tuple[str, Callable[[int], Awaitable[Round]]]]:
    sides = [("crm-bridge", ours), ("pgqueuer", theirs)]
    return [*sides, ("baseline", baseline)] if h.baseline is not None else sides


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

    def baseline(k: int) -> Awaitable[Round]:
        assert h.baseline is not None
        return crm_round(h, "anchor-noop-baseline", ("noop", "bench.noop"), firms,
                         lambda f: workload.noop_config(), events, root=h.baseline,
                         side="baseline")

    got = await rounds.interleave(_rounds(h), _sides(h, ours, theirs, baseline))
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
                             events, upstream=upstream, profile=k < 0)

        def theirs(k: int) -> Awaitable[Round]:
            return pgq_round(h, firms, events, "http", upstream=upstream)

        def baseline(k: int) -> Awaitable[Round]:
            assert h.baseline is not None
            return crm_round(h, "anchor-retailcrm-baseline", ("retailcrm", "retailcrm"),
                             firms, config, events, upstream=upstream, root=h.baseline,
                             side="baseline")

        got = await rounds.interleave(_rounds(h), _sides(h, ours, theirs, baseline))
        profiled = (await ours(-1)).summary() if h.profile else None
    rows = comparison_rows("anchor.retailcrm", "crm-bridge RetailCRM drain to nginx",
                           "pgqueuer worker posting the same requests", got,
                           rate_at_least=1.0, cpu_at_most=None, cpu_ms_at_most=0.5)
    if profiled:
        rows[0].details["profiled_round"] = profiled
    return rows
