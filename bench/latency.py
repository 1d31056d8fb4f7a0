"""``anchor.latency``: insert → the first byte at the upstream, through the RetailCRM adapter.

Like ``pipeline.d`` (paced inserts at 500/s and 20/s, one warm-up second not measured, the
daemon a real ``python -m daemon run`` process with default settings), but through the
RetailCRM adapter — its mapping, its client, its rate limits — and timed to the first byte
of the request at the upstream. The upstream is ``Stamper``: a bare ``asyncio.Protocol``
in the bench process (so one ``time.monotonic()`` clock times both ends) that notes when
the first byte of each request arrives, answers ``{"success":true}`` at once, and keeps
the raw requests to parse after the run: which call, which event (``call/event``'s
``callExternalId`` and ``type``; an upload counts for its hangup). The clock starts just
before each INSERT is sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

import asyncpg

from bench import workload
from bench.daemons import REPORTED, process
from bench.harness import OUT_DIR, Harness, describe_settings
from bench.pipeline import latency_rows, paced
from bench.procfs import cpu_seconds
from bench.results import Row
from bench.workload import Enterprise

ENTERPRISES = 50
WARMUP_S = 1.0
SETTLE_TIMEOUT_S = 30.0
_ANSWER = b'{"success":true}'
_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(_ANSWER), _ANSWER))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: split requests, stamp their first byte, answer."""

    def __init__(self, received: list[tuple[float, bytes]]) -> None:
        self.received = received
        self.buffer = bytearray()
        self.first = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.buffer:
            self.first = time.monotonic()
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.received.append((self.first, bytes(self.buffer[:total])))
            del self.buffer[:total]
            assert self.transport is not None
            self.transport.write(_RESPONSE)
            self.first = time.monotonic()  # the next request's bytes, if any, came with these


@asynccontextmanager
async def stamper() -> AsyncIterator[tuple[str, list[tuple[float, bytes]]]]:
    """The stamping upstream on 127.0.0.1; yields (its URL, the (first byte, raw request)
    list it fills)."""
    received: list[tuple[float, bytes]] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.close()
        await server.wait_closed()


def arrivals(received: list[tuple[float, bytes]]) -> dict[str, float]:
    """``unique_id/event_type`` → when the first byte of its first request arrived."""
    first: dict[str, float] = {}
    for at, raw in received:
        _head, _, body = raw.partition(b"\r\n\r\n")
        form = parse_qs(body.decode())
        if "event" in form:
            event = json.loads(form["event"][0])
            kind = "hangup" if event.get("type") == "hangup" else "dial"
            keys = [f"{event.get('callExternalId')}/{kind}"]
        elif "calls" in form:
            keys = [f"{c.get('externalId')}/hangup" for c in json.loads(form["calls"][0])]
        else:
            continue
        for key in keys:
            first[key] = min(at, first.get(key, at))
    return first


async def _latency_at(h: Harness, rate: float, count: int) -> dict[str, Any]:
    firms = workload.enterprises(ENTERPRISES)
    crypto = h.crypto
    warmup = int(rate * WARMUP_S)
    events = workload.calls(firms, (warmup + count) // 2, gap=max(4, int(rate * 0.2)),
                            prefix=f"lat{rate:g}")
    sent: dict[str, float] = {}
    insert_s: dict[str, float] = {}
    async with h.database() as url, stamper() as (upstream, received):
        def config(f: Enterprise) -> dict[str, Any]:
            return workload.retailcrm_config(crypto, upstream, f"rcrm-key-{f.number}-0123",
                                             f"client-{f.number}-abcdef0123456789")

        conn = await asyncpg.connect(url)
        try:
            await workload.register(conn, "retailcrm")
            await workload.seed(conn, firms, config, extensions=True)
            env = h.environ(url, CRM_BRIDGE_INTEGRATION="retailcrm", CRM_BRIDGE_PORT="0",
                            CRM_BRIDGE_INSTANCE_ID=f"bench-lat{rate:g}")
            async with process(env, OUT_DIR / f"daemon-latency{rate:g}.log") as proc:
                cpu, clock = cpu_seconds(proc.pid), time.monotonic()
                await paced(url, events, rate, sent, insert_s)
                deadline = time.monotonic() + SETTLE_TIMEOUT_S
                while await conn.fetchval(workload.PENDING) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                cpu, clock = cpu_seconds(proc.pid) - cpu, time.monotonic() - clock
            counts = await workload.statuses(conn)
        finally:
            await conn.close()
        arrived = arrivals(received)
    measured = list(sent)[warmup:]
    latencies = [arrived[k] - sent[k] for k in measured if k in arrived]
    reached = [arrived[k] for k in measured if k in arrived]
    span_s = max(reached, default=0.0) - min((sent[k] for k in measured), default=0.0)
    return {"rate": rate, "events": len(measured), "warmup_events": warmup,
            "received": len(latencies), "requests": len(received), "statuses": counts,
            # below the paced rate: the daemon fell behind and a queue built up
            "delivered_per_s": round(len(reached) / span_s, 1) if span_s > 0 else None,
            "daemon_cpu_share": round(cpu / clock, 2),
            "daemon_cpu_ms_per_event": round(cpu / len(events) * 1000, 3),
            "latencies_s": latencies,
            "insert_s": [insert_s[k] for k in measured if k in insert_s],
            "settings": describe_settings(h.settings(url), REPORTED)}


async def latency(h: Harness) -> list[Row]:
    """anchor.latency: see the module docstring."""
    rows = []
    fast, slow = (1_000, 100) if h.quick else (2_000, 200)
    for rate, count in ((500.0, fast), (20.0, slow)):
        got = await _latency_at(h, rate, count)
        rows += latency_rows(f"anchor.latency insert→first byte, RetailCRM @{rate:g}/s", got)
    return rows
