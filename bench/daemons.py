"""How the benchmarks run crm-bridge: in this process or as real processes, with which settings.

``daemon(settings)`` is the whole daemon in the bench's event loop (``tests.support.daemon
.running``: pool, cache, listener, dispatcher, outcome writer, web app); ``process(env,
log)`` is ``python -m daemon run`` with its log lines in a file. ``THROUGHPUT`` is what the
drain benchmarks set, ``REPORTED`` the settings each of them reports.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import PYTHON, ROOT, child_environ
from daemon.runtime import Runtime
from daemon.settings import Settings
from tests.support.daemon import running

# What a throughput-minded operator would set for a backlog (reported with each figure).
# The daemon is CPU-bound well before 150 attempts are in flight; more only queues attempts
# inside its one event loop, where HTTP ones then outlive the 3 s attempt timeout (seen at
# 400: RetailCRM attempts timed out and were retried, popups sent twice).
THROUGHPUT: dict[str, Any] = {
    "concurrency": 150, "enterprise_concurrency": 32, "db_pool_max": 20,
    "rate_limits": (("default", 100_000.0), ("telephony", 100_000.0)),
    # A drained backlog is older than a hangup's settle window (it piled up while the
    # daemon was away): its uploads go at once, as before the window existed.
    "upload_settle_s": 0.0,
}


def settings_line() -> str:
    """The drain settings in one line, for under the table."""
    limits = ",".join(f"{k}={v:g}" for k, v in THROUGHPUT["rate_limits"])
    return (f"concurrency={THROUGHPUT['concurrency']} "
            f"enterprise_concurrency={THROUGHPUT['enterprise_concurrency']} "
            f"db_pool_max={THROUGHPUT['db_pool_max']} rate_limits={limits} "
            f"upload_settle_s={THROUGHPUT['upload_settle_s']:g}, other settings "
            "default (poll_interval_s=1, notify on); pipeline.d uses the defaults throughout")


def throughput_environ() -> dict[str, str]:
    """``THROUGHPUT`` as the environment of a ``python -m daemon run`` process."""
    return {
        "CRM_BRIDGE_CONCURRENCY": str(THROUGHPUT["concurrency"]),
        "CRM_BRIDGE_ENTERPRISE_CONCURRENCY": str(THROUGHPUT["enterprise_concurrency"]),
        "CRM_BRIDGE_DB_POOL_MAX": str(THROUGHPUT["db_pool_max"]),
        "CRM_BRIDGE_RATE_LIMITS": ",".join(f"{k}={v:g}" for k, v in THROUGHPUT["rate_limits"]),
        "CRM_BRIDGE_UPLOAD_SETTLE_S": f"{THROUGHPUT['upload_settle_s']:g}",
    }


REPORTED = ("concurrency", "enterprise_concurrency", "db_pool_max", "rate_limits",
            "upload_settle_s", "poll_interval_s", "notify", "log_level")


@asynccontextmanager
async def daemon(settings: Settings) -> AsyncIterator[Runtime]:
    """The whole daemon in this process (pool, cache, listener, dispatcher, writer, web app),
    with its catch-up done; everything written when the block ends."""
    async with running(settings) as d:
        yield d.rt
        await asyncio.wait_for(d.rt.writer.flushed(), 30)


@asynccontextmanager
async def process(env: Mapping[str, str], log: Path, *, root: Path = ROOT
                  ) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m daemon run`` of the checkout at ``root`` (this one by default) with
    stdout to ``log``; yields once it is listening and its listener has caught up; SIGTERM
    and wait on exit."""
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "daemon", "run", cwd=root, env=child_environ(env, root=root),
            stdout=out, stderr=asyncio.subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b'"listening"' not in log.read_bytes():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {log.read_text()[-500:]}")
            await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def listening_url(log: Path) -> str:
    """The URL of the daemon that logs to ``log`` (from its ``listening`` line)."""
    for line in log.read_bytes().splitlines():
        if b'"listening"' in line:
            return str(json.loads(line)["url"])
    raise RuntimeError(f"no listening line in {log}")


async def metric(log: Path, sample: str) -> float | None:
    """The value of one ``/metrics`` sample (its name with labels, exactly as exposed) of
    the daemon that logs to ``log``; None when it is not exposed."""
    url = listening_url(log)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


async def delivered_count(log: Path) -> int:
    """``crm_bridge_deliveries_total{outcome="done"}`` of the daemon that logs to ``log``."""
    done = await metric(log, 'crm_bridge_deliveries_total{outcome="done"}')
    return int(done or 0)
