"""Config cache benchmarks: change propagation, full refresh, and memory.

* ``cache.a`` — two daemons run in this process (no-op adapter, instances ``bench-ca1`` and
  ``bench-ca2``). One at a time, an enterprise's ``integrations_config->'noop'->'revision'``
  is changed the way the admin UI does it (one ``jsonb_set`` UPDATE, autocommit); the time
  from just before the UPDATE is sent to the moment each instance's ConfigCache builds the
  new entry (the no-op adapter's ``observer``: the cache parses the config and swaps the
  entry in with no await in between) is one sample per instance.
* ``cache.b`` — 10,000 enterprises with complete RetailCRM configurations (API key and
  clientId encrypted with Fernet): ``ConfigCache.refresh_all`` of a running daemon, timed
  (median of several), with its SQL part timed on its own; then a child process
  (``python -m bench.cache rss``) reports its VmRSS after importing the daemon, again
  with the whole daemon running and the 10,000 enterprises cached, and once more after a
  further full refresh (what the periodic refresh leaves: old and new map were both alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
from typing import Any

import aiohttp
import asyncpg

from bench import workload
from bench.harness import PYTHON, ROOT, Harness, child_environ
from bench.noop import NoopAdapter
from bench.results import Row
from daemon import db, store
from daemon.cache import PAGE, ConfigCache
from daemon.crypto import Crypto
from daemon.integrations import load as load_adapter
from daemon.integrations.base import AdapterDeps
from daemon.metrics import Metrics
from tests.support.daemon import running

NOOP = "bench.noop"
UPDATE_REVISION = """
UPDATE enterprises
   SET integrations_config = jsonb_set(integrations_config, '{noop,revision}', to_jsonb($2::int))
 WHERE number = $1
"""
PROPAGATION_TIMEOUT_S = 1.0
ENTERPRISES = 10_000
RSS_MARK = "BENCH-RSS "


# ---------------------------------------------------------------------- (a) propagation


class _Seen:
    """Revision → when each instance built it; wakes the waiter when all have."""

    def __init__(self, instances: int) -> None:
        self.at: list[dict[int, float]] = [{} for _ in range(instances)]
        self.want: int | None = None
        self.event = asyncio.Event()

    def observer(self, k: int) -> Any:
        def seen(revision: int | None, at: float) -> None:
            if revision is None:
                return
            self.at[k].setdefault(revision, at)
            if revision == self.want and all(revision in a for a in self.at):
                self.event.set()
        return seen


async def propagation(h: Harness) -> list[Row]:
    """cache.a: see the module docstring."""
    updates = 300 if h.quick else 1_000
    firms = workload.enterprises(100)
    async with h.database() as url:
        conn = await asyncpg.connect(url)
        try:
            await workload.register(conn, "noop")
            await workload.seed(conn, firms, lambda f: workload.noop_config(revision=0))
        finally:
            await conn.close()
        seen = _Seen(2)
        settings = [h.settings(url, integration=NOOP, instance_id=f"bench-ca{k}")
                    for k in (1, 2)]
        sent: dict[int, float] = {}
        last: dict[str, int] = {}
        async with running(settings[0]) as one, running(settings[1]) as two:
            runtimes = [one.rt, two.rt]
            for k, rt in enumerate(runtimes):
                assert isinstance(rt.adapter, NoopAdapter)
                rt.adapter.observer = seen.observer(k)
            writer = await asyncpg.connect(url)
            try:
                for revision in range(1, updates + 1):
                    firm = firms[revision % len(firms)]
                    seen.want, last[firm.number] = revision, revision
                    seen.event.clear()
                    sent[revision] = time.monotonic()
                    await writer.execute(UPDATE_REVISION, firm.number, revision)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(seen.event.wait(), PROPAGATION_TIMEOUT_S)
            finally:
                await writer.close()
            stale = [
                (k, number) for k, rt in enumerate(runtimes) for number, rev in last.items()
                if getattr(getattr(rt.cache.get(number), "config", None), "revision", None) != rev
            ]
    rows = []
    for k in range(2):
        samples = [(seen.at[k][r] - t) * 1000 for r, t in sent.items() if r in seen.at[k]]
        lost = updates - len(samples)
        p50, p99 = workload.percentile(samples, 0.5), workload.percentile(samples, 0.99)
        details = {"updates": updates, "seen": len(samples), "p50_ms": round(p50, 2),
                   "p90_ms": round(workload.percentile(samples, 0.9), 2),
                   "p99_ms": round(p99, 2), "max_ms": round(max(samples), 2),
                   "stale_entries_at_end": len([s for s in stale if s[0] == k])}
        name = f"cache.a UPDATE→ConfigCache, instance {k + 1} (in-process)"
        rows.append(Row(f"{name} p50", f"{p50:.1f} ms", details=details, value=p50))
        row = Row(f"{name} p99", f"{p99:.1f} ms", "≤ 50 ms").check(p99, at_most=50)
        if lost or details["stale_entries_at_end"]:
            row.verdict = "MISS"
            row.figure += f" ({lost} not seen within {PROPAGATION_TIMEOUT_S:g} s)"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- (b) refresh, RSS


async def _seed_retailcrm(h: Harness, url: str) -> None:
    crypto = h.crypto
    firms = workload.enterprises(ENTERPRISES)
    conn = await asyncpg.connect(url)
    try:
        await workload.register(conn, "retailcrm")
        await workload.seed(conn, firms, lambda f: workload.retailcrm_config(
            crypto, f"https://shop{f.number}.retailcrm.ru",
            f"rcrm-key-{f.number}-0123456789abcdefgh", f"client-{f.number}-0123456789abcdef"))
        await conn.execute("VACUUM (ANALYZE) enterprises")
    finally:
        await conn.close()


async def _refresh_times(h: Harness, url: str, rounds: int) -> dict[str, Any]:
    """A ConfigCache built as ``runtime.build`` builds it, with a Crypto of its own: the
    first ``refresh_all`` decrypts every stored secret (what a daemon does at start), the
    next ones find them remembered (the periodic refresh); the SQL fetch timed alone."""
    settings = h.settings(url, integration="retailcrm", instance_id="bench-cb")
    crypto = Crypto(settings.encryption_keys, settings.secret_key)
    metrics = Metrics(settings.integration)
    pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
        async with aiohttp.ClientSession() as http:
            adapter = load_adapter(settings.integration, AdapterDeps(
                crypto=crypto, http=http, pool=pool, public_url=settings.public_url,
                secret_key=settings.secret_key))
            cache = ConfigCache(pool, adapter, crypto, metrics, ttl_s=settings.config_ttl_s,
                                refresh_s=settings.config_refresh_s)
            times, sql_times = [], []
            for _ in range(rounds):
                gc.collect()
                started = time.perf_counter()
                entries = await cache.refresh_all("bench")
                times.append(time.perf_counter() - started)
                started = time.perf_counter()
                await _fetch_all(pool, adapter.name)
                sql_times.append(time.perf_counter() - started)
            serving = sum(1 for e in cache.entries() if e.serves)
            await cache.close()
    finally:
        await pool.close()
    return {"cold_s": round(times[0], 3), "warm_s": [round(t, 3) for t in times[1:]],
            "warm_median_s": round(statistics.median(times[1:]), 3),
            "sql_fetch_median_s": round(statistics.median(sql_times), 3),
            "entries": entries, "serving": serving}


async def _fetch_all(pool: asyncpg.Pool, integration: str) -> None:
    """The SQL part of ``refresh_all`` alone: every page of its query, rows decoded."""
    after = ""
    while rows := await store.load_entries_after(pool, integration, after, PAGE):
        after = rows[-1]["number"]


async def refresh_and_rss(h: Harness) -> list[Row]:
    """cache.b: see the module docstring."""
    rounds = 3 if h.quick else 5
    async with h.database() as url:
        await _seed_retailcrm(h, url)
        got = await _refresh_times(h, url, rounds)
        rss = await _rss_child(h, url)
    cold = got["cold_s"]
    refresh = Row(f"cache.b refresh_all, {got['entries']:,} RetailCRM enterprises",
                  f"{cold:.2f} s cold, {got['warm_median_s']:.2f} s warm", "≤ 1 s",
                  details=got).check(cold, at_most=1.0)
    if got["serving"] != ENTERPRISES:
        refresh.verdict = "MISS"
        refresh.figure += f" (only {got['serving']} serving)"
    after_mb = rss["after_kb"] / 1024
    refreshed_mb = rss["after_refresh_kb"] / 1024
    memory = Row(f"cache.b RSS, daemon process with {rss['entries']:,} cached",
                 f"{after_mb:.0f} MB, {refreshed_mb:.0f} MB after a refresh "
                 f"({rss['before_kb'] / 1024:.0f} MB before loading)",
                 "≤ 100 MB", details=rss).check(max(after_mb, refreshed_mb), at_most=100)
    return [refresh, memory]


async def _rss_child(h: Harness, url: str) -> dict[str, Any]:
    env = h.environ(url, CRM_BRIDGE_INSTANCE_ID="bench-rss", CRM_BRIDGE_LOG_LEVEL="warning")
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "bench.cache", "rss", cwd=ROOT, env=child_environ(env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith(RSS_MARK):
            result: dict[str, Any] = json.loads(line[len(RSS_MARK):])
            return result
    raise RuntimeError(f"the RSS child reported nothing: {out.decode(errors='replace')[-500:]}")


# ---------------------------------------------------------------------- the RSS child


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


async def _rss_main() -> dict[str, Any]:
    from daemon import logconfig
    from daemon.settings import load

    settings = load()
    logconfig.configure("json", settings.log_level)
    gc.collect()
    before = _status()
    async with running(settings) as d:
        gc.collect()
        after = _status()
        entries = len(d.rt.cache.entries())
        await d.rt.cache.refresh_all("bench")  # what the periodic refresh does to it
        gc.collect()
        refreshed = _status()
    return {"before_kb": before["VmRSS"], "after_kb": after["VmRSS"],
            "peak_kb": after["VmHWM"], "after_refresh_kb": refreshed["VmRSS"],
            "entries": entries, "python": sys.version.split()[0]}


def main(argv: list[str]) -> int:
    """``python -m bench.cache rss``: the child of ``cache.b``'s memory part."""
    if argv != ["rss"]:
        print("usage: python -m bench.cache rss", file=sys.stderr)
        return 2
    # Everything the daemon process imports is imported before the first reading.
    import web.app  # noqa: F401
    from daemon import runtime  # noqa: F401

    print(RSS_MARK + json.dumps(asyncio.run(_rss_main())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
