"""Benchmarks of the paths where a person waits: click-to-call and smart redirect.

The daemon is a real ``python -m daemon run`` process, as deployed; the PBX simulator and
the RetailCRM simulator each run in a child process of their own (``bench.upstream``), so
their request handling is not charged to the daemon; the clients are this process, timing
each request from just before it is sent to its answer (``time.perf_counter``).

* ``telephony.a`` — click-to-call from 100 clients (one RetailCRM account and clientId each,
  100 enterprises): every client clicks every 0.5 s from a random phase (200 clicks/s in
  all, under the per-clientId limit), after a second of the same pace that is not measured.
  The same clients also call the PBX simulator directly at the same pace, in rounds
  alternating with the daemon's (``ROUNDS`` of each): **added latency** is the daemon's
  figure minus that baseline, per percentile. Then 5 bursts of 100
  simultaneous clicks (one per client), 1.5 s apart: what the 100th click in a burst
  waits, reported without a target.
* ``telephony.b`` — smart redirect on a warm cache: 1,000 callers of the 100 enterprises are
  looked up once (RetailCRM simulator), then asked again at 300/s from 100 clients for
  ``DURATION_S``; every answer must come from the cache.
* ``telephony.c`` — smart redirect with RetailCRM stalled (``/api/v5/telephony/manager``
  never answers): 200 callers never seen before, at 40/s, then a burst of 100 at once;
  every answer must be "no match" (``timeout``), and none may take longer than the
  deadline (1.5 s) plus ``SLACK_S`` for the HTTP round trip around it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench import upstream, workload
from bench.daemons import process
from bench.harness import OUT_DIR, Harness
from bench.procfs import cpu_seconds
from bench.results import Row

CLIENTS = 100
CLICK_PERIOD_S = 0.5
REDIRECT_RATE = 300.0
STALLED_RATE = 40.0
WARMUP_S = 1.0
DURATION_S = 10.0
ROUNDS = 4
BURSTS = 5
BURST_GAP_S = 1.5
CALLERS = 1_000
SLACK_S = 0.05
MANAGER_PATH = "/api/v5/telephony/manager"
CRM_DOMAIN = "https://bench.retailcrm.ru"  # click-to-call never calls RetailCRM


@dataclass(frozen=True, slots=True)
class Client:
    """One clicking manager's account: its enterprise and what its requests carry."""

    firm: workload.Enterprise
    client_id: str
    api_key: str


def _clients() -> list[Client]:
    return [Client(f, f"client-{f.number}-abcdef0123456789",
                   f"rcrm-key-{f.number}-0123456789abcdef")
            for f in workload.enterprises(CLIENTS)]


def _phone(rng: random.Random) -> str:
    return f"+37529{rng.randrange(10**7):07d}"


def _stats(latencies: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {"count": len(ms), "p50_ms": round(workload.percentile(ms, 0.5), 2),
            "p90_ms": round(workload.percentile(ms, 0.9), 2),
            "p99_ms": round(workload.percentile(ms, 0.99), 2),
            "max_ms": round(max(ms, default=float("nan")), 2)}


@dataclass(frozen=True, slots=True)
class _Daemon:
    base: str
    pid: int

    def cpu_s(self) -> float:
        """CPU seconds the daemon process has used so far."""
        return cpu_seconds(self.pid)


@asynccontextmanager
async def _daemon(h: Harness, url: str, name: str, **env: str) -> AsyncIterator[_Daemon]:
    """The daemon process on database ``url``."""
    log = OUT_DIR / f"daemon-{name}.log"
    OUT_DIR.mkdir(exist_ok=True)
    environ = h.environ(url, CRM_BRIDGE_PORT="0", CRM_BRIDGE_INSTANCE_ID=f"bench-{name}", **env)
    async with process(environ, log) as proc:
        yield _Daemon(_listening_url(log), proc.pid)


def _listening_url(log: Path) -> str:
    for line in log.read_bytes().splitlines():
        if b'"listening"' in line:
            return str(json.loads(line)["url"])
    raise RuntimeError(f"no listening line in {log}")


async def _seed(url: str, clients: list[Client], domain: str, h: Harness) -> None:
    conn = await asyncpg.connect(url)
    try:
        await workload.seed(conn, [c.firm for c in clients], lambda f: workload.retailcrm_config(
            h.crypto, domain, f"rcrm-key-{f.number}-0123456789abcdef",
            f"client-{f.number}-abcdef0123456789"), extensions=True)
    finally:
        await conn.close()


async def _paced(period_s: float, duration_s: float, one: Callable[[int], Awaitable[float]],
                 count: int) -> list[float]:
    """``count`` clients, each calling ``one(k)`` every ``period_s`` from a random phase, for
    ``WARMUP_S + duration_s``; the latencies after the warm-up."""
    rng = random.Random(7)
    start = time.monotonic() + 0.1
    measured_from = start + WARMUP_S
    end = measured_from + duration_s
    results: list[float] = []

    async def client(k: int) -> None:
        at = start + rng.random() * period_s
        while at < end:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            latency = await one(k)
            if at >= measured_from:
                results.append(latency)
            at += period_s

    await asyncio.gather(*(client(k) for k in range(count)))
    return results


async def _timed(http: aiohttp.ClientSession, url: str, params: dict[str, str],
                 check: Callable[[int, Any], None], headers: dict[str, str] | None = None
                 ) -> float:
    started = time.perf_counter()
    async with http.get(url, params=params, headers=headers) as response:
        body = await response.json()
        elapsed = time.perf_counter() - started
    check(response.status, body)
    return elapsed


# ---------------------------------------------------------------------- (a) click-to-call


async def make_call(h: Harness) -> list[Row]:
    """telephony.a: see the module docstring."""
    duration = 4.0 if h.quick else DURATION_S
    clients = _clients()
    rng = random.Random(11)
    failures: list[str] = []

    def expect_ok(status: int, body: Any) -> None:
        if status != 200 or body.get("success") is not True:
            failures.append(f"{status} {body}")

    async with h.database() as url, upstream.running("pbx") as pbx:
        await _seed(url, clients, CRM_DOMAIN, h)
        async with _daemon(h, url, "ta", CRM_BRIDGE_PBX_URL=pbx.url) as daemon, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as http:
            base = daemon.base

            def click(k: int) -> Awaitable[float]:
                c = clients[k]
                return _timed(http, f"{base}/retailcrm/make-call", {
                    "clientId": c.client_id, "code": "", "userId": "1",
                    "phone": _phone(rng)}, expect_ok)

            def direct(k: int) -> Awaitable[float]:
                c = clients[k]
                return _timed(http, f"{pbx.url}/api/makecallexternal", {
                    "code": "150", "phone": _phone(rng), "clientId": f"secret-{c.firm.number}"},
                    expect_ok)

            # Alternating rounds: a drift of the machine's load hits both sides alike.
            baseline: list[float] = []
            bridged: list[float] = []
            cpu = 0.0
            for _ in range(ROUNDS):
                baseline += await _paced(CLICK_PERIOD_S, duration / ROUNDS, direct, CLIENTS)
                cpu_before = daemon.cpu_s()
                bridged += await _paced(CLICK_PERIOD_S, duration / ROUNDS, click, CLIENTS)
                cpu += daemon.cpu_s() - cpu_before
            clicks = int(ROUNDS * (WARMUP_S + duration / ROUNDS) / CLICK_PERIOD_S * CLIENTS)
            bursts_direct, bursts = [], []
            for _ in range(BURSTS):
                await asyncio.sleep(BURST_GAP_S)
                bursts_direct += await asyncio.gather(*(direct(k) for k in range(CLIENTS)))
                await asyncio.sleep(BURST_GAP_S)
                bursts += await asyncio.gather(*(click(k) for k in range(CLIENTS)))
    base_s, via_s = _stats(baseline), _stats(bridged)
    added_p50 = via_s["p50_ms"] - base_s["p50_ms"]
    added_p99 = via_s["p99_ms"] - base_s["p99_ms"]
    burst_s, burst_base = _stats(bursts), _stats(bursts_direct)
    details = {"clients": CLIENTS, "clicks_per_s": CLIENTS / CLICK_PERIOD_S,
               "duration_s": duration, "rounds": ROUNDS, "via_daemon": via_s, "pbx_direct": base_s,
               "burst_via_daemon": burst_s, "burst_pbx_direct": burst_base,
               "failures": len(failures), "failure_sample": failures[:3],
               "daemon_cpu_ms_per_click": round(cpu / clicks * 1000, 3),
               "daemon_cpu_share": round(cpu / (ROUNDS * WARMUP_S + duration), 2),
               "pbx_summary": pbx.summary}
    row = Row("telephony.a make-call added latency p99 (100 clients, 200/s)",
              f"{added_p99:.1f} ms (p50 {added_p50:.1f}; {via_s['p99_ms']:.1f} vs "
              f"{base_s['p99_ms']:.1f} direct)", "≤ 20 ms", details=details).check(
                  added_p99, at_most=20)
    if failures:
        row.verdict = "MISS"
        row.figure += f" ({len(failures)} failed)"
    burst = Row("telephony.a make-call, bursts of 100 at once, p99 (direct)",
                f"{burst_s['p99_ms']:.1f} ms ({burst_base['p99_ms']:.1f} ms)")
    return [row, burst]


# ---------------------------------------------------------------------- (b, c) smart redirect


async def _manager_map(http: aiohttp.ClientSession, crm: str, callers: list[str]) -> None:
    async with http.post(f"{crm}/_managers", json={p: 1 for p in callers}) as response:
        response.raise_for_status()


@dataclass(slots=True)
class _Stand:
    """The daemon with 100 enterprises on the RetailCRM simulator, and a client for it."""

    daemon: _Daemon
    base: str
    crm: str
    http: aiohttp.ClientSession
    auth: dict[str, str]
    clients: list[Client]
    deadline_ms: float
    wrong: list[str]

    def expect(self, source: str | None, extension: str | None,
               reason: str | None) -> Callable[[int, Any], None]:
        """A check that every answer is this one (the others are kept in ``wrong``)."""
        def check(status: int, body: Any) -> None:
            if status != 200 or (body.get("source"), body.get("extension"),
                                 body.get("reason")) != (source, extension, reason):
                self.wrong.append(f"{status} {body}")
        return check

    def ask(self, caller: tuple[Client, str], check: Callable[[int, Any], None]
            ) -> Awaitable[float]:
        """One smart-redirect request, timed."""
        client, phone = caller
        return _timed(self.http, f"{self.base}/api/smart-redirect",
                      {"enterprise": client.firm.number, "phone": phone}, check, self.auth)


@asynccontextmanager
async def _redirect_stand(h: Harness, name: str) -> AsyncIterator[_Stand]:
    clients = _clients()
    async with h.database() as url, \
            upstream.running("retailcrm", api_keys=[c.api_key for c in clients]) as crm, \
            upstream.running("pbx") as pbx:
        await _seed(url, clients, crm.url, h)
        async with _daemon(h, url, name, CRM_BRIDGE_PBX_URL=pbx.url) as daemon, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=300)) as http:
            auth = {"Authorization": f"Bearer {h.service_token}"}
            yield _Stand(daemon, daemon.base, crm.url, http, auth, clients,
                         h.settings(url).smart_redirect_deadline_s * 1000, [])


async def smart_redirect_warm(h: Harness) -> list[Row]:
    """telephony.b: see the module docstring."""
    duration = 4.0 if h.quick else DURATION_S
    rng = random.Random(13)
    async with _redirect_stand(h, "tb") as stand:
        callers = [(stand.clients[i % CLIENTS], _phone(rng)) for i in range(CALLERS)]
        await _manager_map(stand.http, stand.crm, [phone for _c, phone in callers])
        first = stand.expect("retailcrm", "150", None)
        for chunk in range(0, CALLERS, 50):
            await asyncio.gather(*(stand.ask(c, first) for c in callers[chunk:chunk + 50]))
        warm = stand.expect("cache", "150", None)
        cpu_before = stand.daemon.cpu_s()
        cached = await _paced(CLIENTS / REDIRECT_RATE, duration,
                              lambda _k: stand.ask(rng.choice(callers), warm), CLIENTS)
        cpu = stand.daemon.cpu_s() - cpu_before
        asked = int((WARMUP_S + duration) * REDIRECT_RATE)
    got = _stats(cached)
    details = {"callers": CALLERS, "rate_per_s": REDIRECT_RATE, "duration_s": duration,
               "latency": got, "wrong_answers": len(stand.wrong), "sample": stand.wrong[:3],
               "daemon_cpu_ms_per_request": round(cpu / asked * 1000, 3),
               "daemon_cpu_share": round(cpu / (WARMUP_S + duration), 2)}
    row = Row("telephony.b smart redirect, warm cache, p99 (300/s)",
              f"{got['p99_ms']:.2f} ms (p50 {got['p50_ms']:.2f})", "≤ 5 ms",
              details=details).check(got["p99_ms"], at_most=5)
    if stand.wrong:
        row.verdict, row.figure = "MISS", row.figure + f" ({len(stand.wrong)} wrong)"
    return [row]


async def smart_redirect_stalled(h: Harness) -> list[Row]:
    """telephony.c: see the module docstring."""
    duration = 2.0 if h.quick else 5.0
    rng = random.Random(17)
    async with _redirect_stand(h, "tc") as stand:
        async with stand.http.post(f"{stand.crm}/_fault", json={"path": MANAGER_PATH,
                                                                 "stall": True}) as response:
            response.raise_for_status()
        timeout = stand.expect(None, None, "timeout")
        fresh = iter([(stand.clients[i % CLIENTS], _phone(rng)) for i in range(600)])
        paced = await _paced(CLIENTS / STALLED_RATE, duration,
                             lambda _k: stand.ask(next(fresh), timeout), CLIENTS)
        burst = await asyncio.gather(*(stand.ask(next(fresh), timeout) for _ in range(CLIENTS)))
        async with stand.http.delete(f"{stand.crm}/_fault") as response:
            response.raise_for_status()
    paced_s, burst_s = _stats(paced), _stats(list(burst))
    worst = max(paced_s["max_ms"], burst_s["max_ms"])
    limit = stand.deadline_ms + SLACK_S * 1000
    details = {"rate_per_s": STALLED_RATE, "duration_s": duration, "paced": paced_s,
               "burst_of_100": burst_s, "deadline_ms": stand.deadline_ms,
               "wrong_answers": len(stand.wrong), "sample": stand.wrong[:3]}
    row = Row("telephony.c smart redirect, RetailCRM stalled, slowest answer",
              f"{worst:.0f} ms (p50 {paced_s['p50_ms']:.0f}; burst of 100: max "
              f"{burst_s['max_ms']:.0f})", f"≤ {limit:.0f} ms", details=details,
              ).check(worst, at_most=limit)
    if stand.wrong:
        row.verdict = "MISS"
        row.figure += f" ({len(stand.wrong)} not 'timeout')"
    return [row]
