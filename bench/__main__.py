"""``python -m bench``: run the benchmarks, print one table, write ``.bench/results.json``.

Options: ``--only NAME`` (repeatable or comma-separated; ``pipeline`` selects every
``pipeline.*``), ``--quick`` (smaller workloads, about a third of the time), ``--list``,
``--log-level`` of the daemons' own lines (default ``info``, as in production), and
``--profile`` (cProfile each benchmark's process side into ``.bench/<name>.pstats`` and print
its top functions on stderr), ``--baseline DIR`` (another checkout of crm-bridge: the
drain anchors run its daemon too, in the same rounds, and compare). Progress goes to
stderr; the table alone to stdout. ``--rounds N`` runs the anchors' sides N times each.

Exit status: 0 when every selected benchmark ran (a ``MISS`` is a result, not a failure),
1 when one could not run (its row says ``ERROR``), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bench import anchors, cache, ingest, journal, latency, memory, pipeline, telephony
from bench.daemons import settings_line
from bench.harness import OUT_DIR, Harness, configure_logging
from bench.results import (
    Row,
    cpu_times,
    error_row,
    facts_line,
    machine,
    steal_share,
    table,
    write_json,
)
from tests.support import pg

Benchmark = Callable[[Harness], Coroutine[Any, Any, list[Row]]]

BENCHMARKS: dict[str, tuple[Benchmark, str]] = {
    "pipeline.a": (pipeline.insert_rate, "8 call-service writers: triggers vs plain table"),
    "pipeline.b": (pipeline.drain_noop, "drain 20,000 events, no-op adapter"),
    "pipeline.c": (pipeline.drain_http, "drain 20,000 events over HTTP to a fake CRM"),
    "pipeline.d": (pipeline.latency, "insert → CRM latency at 500/s and 20/s"),
    "pipeline.e": (pipeline.two_instances, "two daemon processes drain 20,000 together"),
    "pipeline.f": (pipeline.drain_retailcrm, "RetailCRM adapter → simulator drain"),
    "anchor.noop": (anchors.noop, "no-op drain: crm-bridge vs a pgqueuer worker, rounds"),
    "anchor.retailcrm": (anchors.retailcrm,
                         "RetailCRM drain to nginx: crm-bridge vs a pgqueuer HTTP worker"),
    "anchor.latency": (latency.latency,
                       "insert → first byte at the upstream via RetailCRM, 500/s and 20/s"),
    "anchor.ingest": (ingest.ingest, "POST /api/events vs a bare aiohttp + asyncpg handler"),
    "anchor.rss": (memory.rss, "RSS with 10,000 enterprises cached, 100,000 events queued"),
    "cache.a": (cache.propagation, "config change → both instances' caches"),
    "cache.b": (cache.refresh_and_rss, "refresh_all of 10,000 enterprises; RSS"),
    "journal.a": (journal.first_page, "admin journal of 100,000 deliveries: first page"),
    "journal.b": (journal.live_view, "call event → open journal page (SSE)"),
    "telephony.a": (telephony.make_call, "click-to-call from 100 clients via the PBX simulator"),
    "telephony.b": (telephony.smart_redirect_warm, "smart redirect on a warm cache, 300/s"),
    "telephony.c": (telephony.smart_redirect_stalled,
                    "smart redirect with RetailCRM stalled: the deadline holds"),
}


def select(only: Sequence[str]) -> list[str]:
    """The benchmark names ``--only`` picks (all when empty); ``ValueError`` if unknown."""
    if not only:
        return list(BENCHMARKS)
    wanted = [w.strip() for item in only for w in item.split(",") if w.strip()]
    chosen: list[str] = []
    for want in wanted:
        hits = [n for n in BENCHMARKS if n == want or n.startswith(want.rstrip(".") + ".")]
        if not hits:
            raise ValueError(f"no benchmark {want!r} (known: {', '.join(BENCHMARKS)})")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in BENCHMARKS if n in chosen]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these (repeatable, comma-separated; prefix matches)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="the daemons' log level (lines go to .bench/daemon*.log)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each benchmark into .bench/<name>.pstats")
    parser.add_argument("--rounds", type=int, default=0, metavar="N",
                        help="rounds of each side of anchor.noop, anchor.retailcrm and "
                        "anchor.ingest (default 3, 1 with --quick)")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another checkout of crm-bridge (git worktree add DIR main): "
                        "anchor.noop, anchor.retailcrm and anchor.ingest also run its daemon")
    return parser


def _run_one(name: str, harness: Harness, profile: bool) -> list[Row]:
    benchmark, _about = BENCHMARKS[name]
    profiler = cProfile.Profile() if profile else None
    load = os.getloadavg()[0]
    try:
        if profiler is not None:
            profiler.enable()
        rows = asyncio.run(benchmark(harness))
        if rows:
            rows[0].details["load_average_1m"] = [round(load, 2),
                                                  round(os.getloadavg()[0], 2)]
        return rows
    except Exception as exc:  # one broken benchmark must not hide the others' results
        traceback.print_exc(file=sys.stderr)
        return [error_row(name, exc)]
    finally:
        if profiler is not None:
            profiler.disable()
            path = OUT_DIR / f"{name}.pstats"
            profiler.dump_stats(path)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
            print(f"--- {name} profile ({path}), by own time:\n{out.getvalue()}",
                  file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks (see the module docstring)."""
    args = _parser().parse_args(argv)
    if args.list:
        for name, (_fn, about) in BENCHMARKS.items():
            print(f"{name:18} {about}")
        return 0
    try:
        names = select(args.only)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    baseline = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "daemon" / "__main__.py").exists():
        print(f"bench: --baseline {args.baseline}: not a checkout of crm-bridge",
              file=sys.stderr)
        return 2
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in (
        sys.argv[1:] if argv is None else argv))
    started = time.monotonic()
    ticks = cpu_times()
    rows: list[Row] = []
    configure_logging(OUT_DIR / "daemon.log", args.log_level)
    with pg.server() as server_url:
        print(f"bench: PostgreSQL ready ({time.monotonic() - started:.1f} s), migrating the "
              "template", file=sys.stderr)
        pg.create_template(server_url)
        try:
            facts = asyncio.run(machine(server_url))
            harness = Harness(server_url, quick=args.quick, log_level=args.log_level,
                              profile=args.profile, baseline=baseline,
                              rounds=max(0, args.rounds))
            for name in names:
                began = time.monotonic()
                print(f"bench: {name} …", file=sys.stderr, flush=True)
                rows += _run_one(name, harness, args.profile)
                print(f"bench: {name} done in {time.monotonic() - began:.1f} s",
                      file=sys.stderr, flush=True)
        finally:
            pg.drop_template(server_url)
    elapsed = time.monotonic() - started
    steal = steal_share(ticks, cpu_times())
    facts["cpu_steal_during_run"] = None if steal is None else round(steal, 3)
    write_json(OUT_DIR / "results.json", rows, facts, command, elapsed)
    print(table(rows))
    print()
    print(f"machine: {facts_line(facts)}")
    print(f"drains:  {settings_line()}")
    print(f"command: {command}  ({elapsed:.0f} s; details in .bench/results.json)")
    return 1 if any(r.verdict == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
