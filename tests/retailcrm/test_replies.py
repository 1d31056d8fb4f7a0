"""RetailCRM's answers are bounded and decoded strictly: a 64 MiB answer or a gzip bomb never
fills the memory (the attempt fails as ``response_too_large`` and is retried), and an answer
that is JSON but cannot be decoded safely (nested thousands deep, a 5,000-digit number, NaN)
is ``malformed`` — a dead letter, never a bug retried."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from daemon import errors
from daemon.crypto import Crypto
from daemon.integrations.retailcrm import RetailCrmAdapter, create_adapter
from daemon.integrations.retailcrm.client import Exchange, RetailCrmClient
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.retailcrm.conftest import KEY, seed, stored
from tests.support.daemon import running
from tests.support.seed import insert_event
from tests.support.waiting import wait_until

MIB = 1024 * 1024
DEEP = "[" * 5000 + "]" * 5000
HUGE_NUMBER = '{"success": true, "n": ' + "7" * 5000 + "}"


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """The peak of Python allocations (bytes) since the test started it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def client(sim: Simulator, http: aiohttp.ClientSession, exchanges: list[Exchange],
           **options: Any) -> RetailCrmClient:
    return RetailCrmClient(http, sim.url, KEY, timeout_s=20.0,
                           on_exchange=exchanges.append, **options)


@pytest.mark.parametrize(("size", "gzip"), [(64 * MIB, False), (256 * MIB, True)])
async def test_a_huge_answer_is_not_read_past_the_cap(
    sim: Simulator, http: aiohttp.ClientSession, traced: Callable[[], int], size: int,
    gzip: bool,
) -> None:
    sim.add_fault(path="/api/credentials", bloat_bytes=size, gzip=gzip)
    exchanges: list[Exchange] = []
    started = time.monotonic()
    with pytest.raises(errors.Retryable) as info:
        await client(sim, http, exchanges).credentials()
    elapsed = time.monotonic() - started
    assert info.value.error_id == "response_too_large"
    assert "larger than 1048576 bytes" in info.value.message
    assert info.value.status == 200
    [exchange] = exchanges
    assert exchange.response == "(an answer larger than 1048576 bytes: not kept)"
    # A 64 MiB body (or 256 MiB once inflated) read whole would peak far above this.
    assert traced() < 8 * MIB, f"peak {traced() / MIB:.1f} MiB"
    assert elapsed < 10


async def test_the_cap_comes_from_the_settings(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
) -> None:
    await seed(pool, crypto, sim.url)
    deps = dataclasses.replace(adapter.deps, settings={
        **adapter.deps.settings, "max_response_bytes": 16_384})
    adapter = create_adapter(deps)
    config = adapter.parse_config(await stored(pool))
    assert (await adapter.check_credentials(config)).ok  # a small answer fits
    sim.add_fault(path="/api/credentials", bloat_bytes=16_385, gzip=True)
    check = await adapter.check_credentials(config)
    assert not check.ok and "larger than 16384 bytes" in check.message


@pytest.mark.parametrize(("body", "says"), [
    (DEEP, "nested deeper than 64 levels"),
    (HUGE_NUMBER, "number with too many digits"),
    ('{"success": true, "x": NaN}', "NaN, which is not a JSON number"),
    ('{"success": true, "x": 1e999}', "out of range"),
])
async def test_an_answer_that_cannot_be_decoded_is_malformed(
    sim: Simulator, http: aiohttp.ClientSession, body: str, says: str,
) -> None:
    exchanges: list[Exchange] = []
    sim.add_fault(path="/api/credentials", status=200, body=body, count=1)
    with pytest.raises(errors.Permanent) as info:
        await client(sim, http, exchanges).credentials()
    assert info.value.error_id == "malformed" and says in info.value.message
    assert isinstance(exchanges[0].response, str) and len(exchanges[0].response) <= 300
    # The same on a server error is the server's trouble: retried.
    sim.add_fault(path="/api/credentials", status=502, body=body, count=1)
    with pytest.raises(errors.Retryable) as retry:
        await client(sim, http, exchanges).credentials()
    assert retry.value.error_id == "http_502"


async def test_a_delivery_is_not_done_on_a_huge_answer_and_dead_on_a_malformed_one(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    sim.add_fault(path="/api/v5/telephony/call/event", bloat_bytes=256 * MIB, gzip=True,
                  count=1)
    settings = make_settings(poll_interval_s=0.1, retry_base_s=30.0)
    async with running(settings) as daemon:
        await insert_event(pool, "dial", {"Token": "tok0367", "UniqueId": "1757772742.70",
                                          "CallType": 0, "Phone": "+375291234567",
                                          "Extensions": ["101"]})
        await wait_until(lambda: sim.faults == [], timeout=15)
        await wait_until_async(pool, "1757772742.70", lambda r: r["last_error"] is not None)
        row = await _delivery(pool, "1757772742.70")
        assert (row["status"], row["attempts"]) == ("pending", 1)
        assert row["last_error"].startswith("response_too_large: ")
        assert not sim.state.call_events  # the answer was refused, not half-read

        sim.add_fault(path="/api/v5/telephony/call/event", status=200, body=DEEP, count=1)
        await insert_event(pool, "dial", {"Token": "tok0367", "UniqueId": "1757772742.71",
                                          "CallType": 0, "Phone": "+375291234567",
                                          "Extensions": ["101"]})
        await wait_until_async(pool, "1757772742.71", lambda r: r["status"] == "failed")
        row = await _delivery(pool, "1757772742.71")
        assert row["attempts"] == 1
        assert row["last_error"].startswith("malformed: ")
        bugs = daemon.rt.metrics.registry.get_sample_value("crm_bridge_adapter_bugs_total")
        assert bugs == 0


async def _delivery(pool: asyncpg.Pool, unique_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT d.status, d.attempts, d.last_error FROM crm_deliveries d "
        "JOIN crm_events e ON e.id = d.event_id WHERE e.unique_id = $1", unique_id)
    assert row is not None
    return row


async def wait_until_async(pool: asyncpg.Pool, unique_id: str,
                           check: Callable[[asyncpg.Record], bool]) -> None:
    deadline = time.monotonic() + 15
    while not check(await _delivery(pool, unique_id)):
        assert time.monotonic() < deadline, await _delivery(pool, unique_id)
        await asyncio.sleep(0.05)
