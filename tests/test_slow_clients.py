"""Slow clients cannot hold the server: a request head must arrive within
CRM_BRIDGE_HTTP_HEADER_TIMEOUT_S, a body within CRM_BRIDGE_HTTP_BODY_TIMEOUT_S, and past
CRM_BRIDGE_HTTP_MAX_CONNECTIONS the oldest waiting connection makes room. Meanwhile /health
answers at once."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import aiohttp
import pytest

from daemon.settings import Settings
from tests.conftest import TEST_SERVICE_TOKEN
from tests.support.daemon import InProcess, running

TRICKLE_EVERY_S = 0.2


async def trickle(url: str, head: bytes) -> float:
    """Open a connection, send ``head``, then one more byte every ``TRICKLE_EVERY_S``
    until the server closes it; how long after the connection opened that happened."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    closed = asyncio.ensure_future(reader.read())  # b"" (or an error) once the server closes
    try:
        writer.write(head)
        while not closed.done():
            await asyncio.wait([closed], timeout=TRICKLE_EVERY_S)
            if not closed.done():
                writer.write(b"x")
        return time.monotonic() - started
    finally:
        closed.cancel()
        writer.close()


async def health_times(daemon: InProcess, rounds: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as http:
        for _ in range(rounds):
            started = time.monotonic()
            async with http.get(daemon.url + "/health") as answer:
                assert answer.status == 200
            times.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
    return times


def cut(daemon: InProcess, reason: str) -> float:
    value = daemon.rt.metrics.registry.get_sample_value(
        "crm_bridge_http_connections_cut_total", {"reason": reason})
    return value or 0.0


async def test_trickling_heads_and_bodies_are_cut_and_health_stays_fast(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(http_header_timeout_s=1.0, http_body_timeout_s=1.5)
    head_only = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    body_too = (b"POST /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: 100000\r\nAuthorization: Bearer "
                + TEST_SERVICE_TOKEN.encode() + b"\r\n\r\n{")
    async with running(settings) as daemon:
        slow = [asyncio.ensure_future(trickle(daemon.url, head))
                for head in [head_only] * 150 + [body_too] * 150]
        await asyncio.sleep(0.3)  # every slow connection is open and trickling
        during = await health_times(daemon, 10)
        closed_after = await asyncio.wait_for(asyncio.gather(*slow), 15)
        assert cut(daemon, "header") == 150 and cut(daemon, "body") == 150
    # Each was cut at its deadline (+ scheduling slack on a shared, loaded machine), never
    # minutes later as before.
    heads, bodies = closed_after[:150], closed_after[150:]
    assert min(heads) >= 1.0 - 0.05 and max(heads) < 1.0 + 1.0, (min(heads), max(heads))
    assert min(bodies) >= 1.5 - 0.05 and max(bodies) < 1.5 + 1.0, (min(bodies), max(bodies))
    assert statistics.median(during) < 0.2, during
    assert max(during) < 1.0, during


async def test_past_the_cap_the_oldest_waiting_connection_makes_room(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(http_header_timeout_s=30.0, http_max_connections=50)
    async with running(settings) as daemon:
        host, port = daemon.url.removeprefix("http://").split(":")
        opened = [await asyncio.open_connection(host, int(port)) for _ in range(80)]
        # The 30 oldest idle ones were closed as the newer ones came in...
        await asyncio.sleep(0.2)
        closed = [i for i, (reader, _w) in enumerate(opened) if reader.at_eof()]
        assert closed == list(range(30)), closed
        # ...and a real request still gets in, in turn displacing the oldest idle one.
        assert max(await health_times(daemon, 3)) < 1.0
        assert cut(daemon, "capacity") == 31  # one more, for the health check's connection
        for _reader, writer in opened:
            writer.close()


async def test_an_idle_kept_alive_connection_is_not_a_slow_one(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(http_header_timeout_s=0.5)
    async with running(settings) as daemon, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1)
    ) as http:
        async with http.get(daemon.url + "/health") as first:
            assert first.status == 200
        await asyncio.sleep(1.2)  # idle past the head deadline: not cut
        async with http.get(daemon.url + "/health") as second:
            assert second.status == 200
        assert cut(daemon, "header") == 0


@pytest.mark.parametrize("pause_s", [0.1, 0.3])
async def test_a_client_within_the_deadlines_is_served(
    make_settings: Callable[..., Settings], pause_s: float,
) -> None:
    settings = make_settings(http_header_timeout_s=1.0, http_body_timeout_s=1.0)
    async with running(settings) as daemon:
        host, port = daemon.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        await asyncio.sleep(pause_s)
        writer.write(b"Content-Length: 4\r\nAuthorization: Bearer "
                     + TEST_SERVICE_TOKEN.encode() + b"\r\n\r\n[")
        await asyncio.sleep(pause_s)
        writer.write(b"1]\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400")  # served: a list is no envelope
        assert cut(daemon, "header") == cut(daemon, "body") == 0
