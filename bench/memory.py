"""``anchor.rss``: the daemon's resident memory with 10,000 enterprises cached and 100,000
events queued.

10,000 enterprises get complete RetailCRM configurations (API key and clientId encrypted,
managers mapped, four internal numbers each) pointing at the static nginx upstream; 100,000
call events (a dial and a hangup per call, ten per enterprise) are inserted with the call
services' statement while no daemon runs, and frozen. Then ``python -m daemon run`` starts
with its default settings (as deployed), loads the 10,000 configurations, and its VmRSS is
read (*idle*); the backlog is released and the daemon delivers for ``DRAIN_WINDOW_S`` while
VmRSS is sampled every 0.25 s; the verdict is on the peak (VmHWM), which covers every moment
of the process's life. Most of the backlog is still queued when the window ends: what is
measured is that a deep queue does not cost memory, not how fast it drains.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench import nginx, workload
from bench.daemons import metric, process
from bench.harness import OUT_DIR, Harness
from bench.procfs import memory_kb
from bench.results import Row
from bench.workload import Enterprise

ENTERPRISES = 10_000
EVENTS = 100_000
QUICK_EVENTS = 20_000
DRAIN_WINDOW_S = 20.0
QUICK_DRAIN_WINDOW_S = 6.0
SAMPLE_S = 0.25
TARGET_MB = 150.0


async def _seed(h: Harness, url: str, upstream: str, events: int) -> int:
    """The enterprises and the frozen backlog; deliveries queued."""
    crypto = h.crypto

    def config(f: Enterprise) -> dict[str, Any]:
        return workload.retailcrm_config(crypto, upstream, f"rcrm-key-{f.number}-0123",
                                         f"client-{f.number}-abcdef0123456789")

    return await workload.backlog(url, workload.enterprises(ENTERPRISES), "retailcrm",
                                  config, events, extensions=True)


async def rss(h: Harness) -> list[Row]:
    """anchor.rss: see the module docstring."""
    events = QUICK_EVENTS if h.quick else EVENTS
    window = QUICK_DRAIN_WINDOW_S if h.quick else DRAIN_WINDOW_S
    log = OUT_DIR / "daemon-rss.log"
    async with h.database() as url, nginx.running("nginx-rss") as upstream:
        started = time.monotonic()
        queued = await _seed(h, url, upstream.url, events)
        seeded_s = time.monotonic() - started
        env = h.environ(url, CRM_BRIDGE_INTEGRATION="retailcrm", CRM_BRIDGE_PORT="0",
                        CRM_BRIDGE_INSTANCE_ID="bench-rss")
        async with process(env, log) as proc:
            cached = await metric(log, "crm_bridge_config_entries")
            idle = memory_kb(proc.pid)
            conn = await asyncpg.connect(url)
            try:
                await workload.release(conn)
                samples = []
                deadline = time.monotonic() + window
                while time.monotonic() < deadline:
                    samples.append(memory_kb(proc.pid).get("VmRSS", 0))
                    await asyncio.sleep(SAMPLE_S)
                peak = memory_kb(proc.pid)
                delivered = await metric(log, 'crm_bridge_deliveries_total{outcome="done"}')
                pending = await conn.fetchval(workload.PENDING)
            finally:
                await conn.close()
    peak_mb = peak.get("VmHWM", max(samples, default=0)) / 1024
    details = {"enterprises": ENTERPRISES, "cached": cached, "queued": queued,
               "seed_s": round(seeded_s, 1), "idle_kb": idle.get("VmRSS"),
               "drain_window_s": window, "rss_samples_kb": samples,
               "peak_kb": peak.get("VmHWM"), "delivered_in_window": delivered,
               "still_pending": pending}
    row = Row(f"anchor.rss daemon with {ENTERPRISES:,} cached, {queued:,} queued",
              f"{peak_mb:.0f} MB peak while delivering "
              f"({idle.get('VmRSS', 0) / 1024:.0f} MB idle)", f"≤ {TARGET_MB:g} MB",
              details=details).check(peak_mb, at_most=TARGET_MB)
    if cached != ENTERPRISES:
        row.verdict = "MISS"
        row.figure += f" (only {cached} cached)"
    return [row]
