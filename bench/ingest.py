"""``anchor.ingest``: crm-bridge's ``POST /api/events`` against a bare aiohttp + asyncpg handler.

Both servers are processes of their own on one database and take the same requests from
``wrk`` (a C load generator: 2 threads, 50 connections, keep-alive), in alternating rounds:
the platform's envelope of a real dial body, a new ``uniqueId`` per request, Tokens spread
over 50 enterprises, the service token as a bearer header.

* crm-bridge: ``python -m daemon run`` (no-op adapter) with its dispatcher kept idle —
  poll-only (``CRM_BRIDGE_NOTIFY=0``) and an hourly poll — so that only the ingest path is
  measured; the deliveries the inserts create stay pending.
* with ``--baseline DIR``, that checkout's daemon as a third side, set up the same way;
* the bare handler (``python -m bench.ingest URL``): one aiohttp route that checks the
  bearer token, parses the JSON, finds the enterprise by Token in a dict loaded at start
  and runs crm-bridge's own ``INSERT_EVENT`` on a pool set up like the daemon's
  (``daemon.db.create_pool``: JSON codecs, its default size of 10) — the same row, the
  same triggers — answering 202 with the new id.

The figure is requests per second; CPU per 1,000 requests is read from ``/proc`` for the
server and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import random
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg

from bench import rounds, sampling, workload
from bench.daemons import listening_url, process
from bench.harness import OUT_DIR, PYTHON, ROOT, Harness, child_environ
from bench.procfs import cpu_of, postmaster_pid
from bench.results import Row
from bench.rounds import CONSUMER, POSTGRES, Round
from daemon import db, store

CONNECTIONS = 50
THREADS = 2
ROUND_S = 5.0
QUICK_ROUND_S = 2.0
WARMUP_S = 1.0
ENTERPRISES = 50
POOL_SIZE = 10  # the daemon's default CRM_BRIDGE_DB_POOL_MAX
START_TIMEOUT_S = 30.0

SCRIPT = """\
local tokens = {%(tokens)s}
local headers = {["Content-Type"] = "application/json",
                 ["Authorization"] = "Bearer %(token)s"}
local template = '%(template)s'
local threads = 0
local n = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
request = function()
  n = n + 1
  local token = tokens[(n %% #tokens) + 1]
  local uid = "%(prefix)s." .. tid .. "." .. n
  return wrk.format("POST", "/api/events", headers,
                    string.format(template, token, uid, token, uid))
end
"""


def script(service_token: str, tokens: Sequence[str], prefix: str) -> str:
    """The wrk Lua script posting envelopes with unique ids (``prefix`` per round)."""
    body, _incoming = workload.dial_body("__TOKEN__", "__UID__", random.Random(3))
    envelope = {"token": "__TOKEN__", "uniqueId": "__UID__", "event_type": "dial",
                "raw": body}
    template = json.dumps(envelope, separators=(",", ":")).replace("%", "%%")
    template = template.replace("__TOKEN__", "%s").replace("__UID__", "%s")
    return SCRIPT % {"tokens": ", ".join(f'"{t}"' for t in tokens), "token": service_token,
                     "template": template, "prefix": prefix}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests, requests/s, non-2xx answers and latency percentiles from wrk's output."""
    found: dict[str, Any] = {}
    if m := re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out):
        found["requests"] = int(m.group(1))
        found["seconds"] = float(m.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0,
                                                 "m": 60.0}[m.group(3)]
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        found["per_s"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    found["non_2xx"] = int(m.group(1)) if m else 0
    for pct in ("50", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
            found[f"p{pct}_ms"] = round(float(m.group(1)) * _UNITS[m.group(2)], 3)
    if "per_s" not in found:
        raise RuntimeError(f"wrk said nothing usable: {out[-400:]}")
    return found


async def wrk(url: str, lua: str, seconds: float) -> dict[str, Any]:
    """Run wrk against ``url`` for ``seconds``; its parsed figures."""
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed: run `make bench` (it installs it) or "
                           "apt-get install wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", dir=OUT_DIR) as fh:
        fh.write(lua)
        fh.flush()
        proc = await asyncio.create_subprocess_exec(
            binary, "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds:g}s",
            "--timeout", "5s", "--latency", "-s", fh.name, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    return parse_wrk(out.decode(errors="replace"))


# ---------------------------------------------------------------------- the bare handler


async def _serve_bare(url: str, service_token: str) -> None:
    from aiohttp import web

    pool = await db.create_pool(url, min_size=2, max_size=POOL_SIZE,
                                application_name="bench-bare")
    by_token = {r["name2"]: r["number"] for r in await pool.fetch(
        "SELECT name2, number FROM enterprises")}
    expected = service_token.encode()

    async def post_event(request: web.Request) -> web.Response:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), expected):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            body = json.loads(await request.read())
            enterprise = by_token[body["token"]]
            event_id = await pool.fetchval(
                store.INSERT_EVENT, enterprise, body["event_type"], body["uniqueId"],
                body["raw"], None, "live")
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "bad_request"}, status=400)
        return web.json_response({"accepted": True, "stored": event_id is not None,
                                  "event_id": event_id}, status=202)

    app = web.Application()
    app.router.add_post("/api/events", post_event)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(json.dumps({"url": f"http://127.0.0.1:{port}"}), flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    finally:
        await runner.cleanup()
        await pool.close()


@asynccontextmanager
async def bare(url: str, service_token: str) -> AsyncIterator[tuple[str, int]]:
    """The bare handler as a child process; yields (its URL, its pid)."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.ingest", url, cwd=ROOT,
        env=child_environ({"BENCH_SERVICE_TOKEN": service_token}),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        if not line:
            raise RuntimeError("the bare ingest handler exited before serving")
        yield json.loads(line)["url"], proc.pid
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), START_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------- the anchor


async def _round(url: str, target: str, pid: int, lua: str, seconds: float,
                 side: str) -> Round:
    conn = await asyncpg.connect(url)
    try:
        server = await postmaster_pid(conn)
    finally:
        await conn.close()
    before = cpu_of((pid, server))
    got = await wrk(target + "/api/events", lua, seconds)
    after = cpu_of((pid, server))
    spent = [None if a is None or b is None else b - a for a, b in zip(before, after, strict=True)]
    return Round(side, got.get("requests", 0), got.get("seconds", seconds),
                 {CONSUMER: spent[0], POSTGRES: spent[1]}, {"wrk": got})


async def ingest(h: Harness) -> list[Row]:
    """anchor.ingest: see the module docstring."""
    seconds = QUICK_ROUND_S if h.quick else ROUND_S
    count = h.rounds or (1 if h.quick else 3)
    firms = workload.enterprises(ENTERPRISES)
    tokens = [f.token for f in firms]
    async with h.database() as url:
        conn = await asyncpg.connect(url)
        try:
            await workload.register(conn, "noop")
            await workload.seed(conn, firms, lambda f: workload.noop_config())
        finally:
            await conn.close()
        env = h.environ(url, CRM_BRIDGE_INTEGRATION="bench.noop", CRM_BRIDGE_PORT="0",
                        CRM_BRIDGE_INSTANCE_ID="bench-ingest", CRM_BRIDGE_NOTIFY="0",
                        CRM_BRIDGE_POLL_INTERVAL_S="3600")
        log = OUT_DIR / "daemon-ingest.log"
        async with AsyncExitStack() as stack:
            daemon_proc = await stack.enter_async_context(process(env, log))
            bare_url, bare_pid = await stack.enter_async_context(bare(url, h.service_token))
            targets = {"crm-bridge": (listening_url(log), daemon_proc.pid),
                       "bare": (bare_url, bare_pid)}
            if h.baseline is not None:  # --baseline: that checkout's daemon, a third side
                base_log = OUT_DIR / "daemon-ingest-baseline.log"
                base_env = {**env, "CRM_BRIDGE_INSTANCE_ID": "bench-ingest-baseline"}
                base = await stack.enter_async_context(
                    process(base_env, base_log, root=h.baseline))
                targets["baseline"] = (listening_url(base_log), base.pid)
            for side, (target, _pid) in targets.items():  # open connections, fill caches
                await wrk(target + "/api/events",
                          script(h.service_token, tokens, f"warm-{side}"), WARMUP_S)

            def side_run(side: str) -> Callable[[int], Awaitable[Round]]:
                target, pid = targets[side]
                return lambda k: _round(url, target, pid,
                                        script(h.service_token, tokens, f"{side}-{k}"),
                                        seconds, side)

            got = await rounds.interleave(count, [(s, side_run(s)) for s in targets])
            profiled = None
            if h.profile:  # one more crm-bridge round, sampled, not counted
                async with sampling.sampled(daemon_proc.pid,
                                            OUT_DIR / "anchor-ingest.pyspy.txt") as profiled:
                    await side_run("crm-bridge")(-1)
                print(f"bench: anchor-ingest sampled profile of the daemon:\n"
                      f"{sampling.describe(profiled)}", file=sys.stderr)
        conn = await asyncpg.connect(url)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM crm_events")
        finally:
            await conn.close()
    rows = _rows(got)
    rows[0].details["events_stored"] = stored  # warm-ups included; every 202 stored one
    if profiled:
        rows[0].details["profile"] = profiled
    return rows


def _rows(got: dict[str, list[Round]]) -> list[Row]:
    rows = _anchor_rows(got)
    if "baseline" in got:
        rows += _baseline_rows(got["crm-bridge"], got["baseline"])
    return rows


def _baseline_rows(ours: list[Round], base: list[Round]) -> list[Row]:
    """This checkout's ingest against ``--baseline``'s, measured in the same rounds."""
    rows = []
    rate = rounds.ratio([r.rate for r in ours], [r.rate for r in base])
    if rate is not None:
        rows.append(Row("anchor.ingest rate crm-bridge / baseline", rate.text()))
    a, b = rounds.cpu_values(ours, CONSUMER), rounds.cpu_values(base, CONSUMER)
    sa, sb, cpu = rounds.series(a), rounds.series(b), rounds.ratio(a, b)
    if sa and sb and cpu:
        rows.append(Row("anchor.ingest CPU s per 1,000 requests, server, crm-bridge / baseline",
                        f"{sa.text('.3f')} vs {sb.text('.3f')} = {cpu.text()}"))
    return rows


def _anchor_rows(got: dict[str, list[Round]]) -> list[Row]:
    ours, theirs = got["crm-bridge"], got["bare"]
    details = {"rounds": {side: [r.summary() for r in rs] for side, rs in got.items()},
               "connections": CONNECTIONS, "wrk_threads": THREADS}
    rows = []
    for label, rs in (("crm-bridge POST /api/events", ours),
                      ("bare aiohttp + asyncpg handler, same INSERT", theirs)):
        s = rounds.series([r.rate for r in rs])
        assert s is not None
        p50 = rounds.series([r.details["wrk"].get("p50_ms") for r in rs])
        bad = sum(r.details["wrk"].get("non_2xx", 0) for r in rs)
        rows.append(Row(f"anchor.ingest {label}, {CONNECTIONS} clients ({len(rs)} rounds)",
                        s.text(unit=" req/s") + (f", p50 {p50.text('.1f', ' ms')}" if p50 else "")
                        + (f" ({bad} non-2xx)" if bad else ""), value=s.median,
                        details=details if rs is ours else {}))
    rate = rounds.ratio([r.rate for r in ours], [r.rate for r in theirs])
    if rate is not None:
        rows.append(Row("anchor.ingest rate crm-bridge / bare", rate.text(), "≥ ×0.7")
                    .check(rate.value, at_least=0.7))
    for proc, label in ((CONSUMER, "server"), (POSTGRES, "PostgreSQL")):
        a, b = rounds.cpu_values(ours, proc), rounds.cpu_values(theirs, proc)
        sa, sb, cpu = rounds.series(a), rounds.series(b), rounds.ratio(a, b)
        if sa and sb:
            rows.append(Row(f"anchor.ingest CPU s per 1,000 requests, {label}",
                            f"{sa.text('.3f')} vs {sb.text('.3f')}"
                            + (f" = ×{cpu.value:.2f}" if cpu else "")))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.ingest URL``: the bare handler (token in ``BENCH_SERVICE_TOKEN``)."""
    import os

    parser = argparse.ArgumentParser(prog="python -m bench.ingest")
    parser.add_argument("url")
    args = parser.parse_args(argv)
    asyncio.run(_serve_bare(args.url, os.environ["BENCH_SERVICE_TOKEN"]))


if __name__ == "__main__":
    main()
