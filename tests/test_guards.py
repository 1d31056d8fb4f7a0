"""Guards with a fake clock: sliding-window rate, slots, circuit breaker."""

from __future__ import annotations

import asyncio

import pytest

from daemon.errors import Retryable
from daemon.guards import Guards, SlidingWindow
from daemon.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_never_lets_n_plus_one_into_a_window() -> None:
    window = SlidingWindow(10, window_s=1.0)
    times = [window.reserve(0.0, max_wait_s=100.0) for _ in range(35)]
    assert all(t is not None for t in times)
    at = [t for t in times if t is not None]
    assert at == sorted(at)
    for i in range(len(at) - 10):
        assert at[i + 10] - at[i] >= 1.0, "11 requests never fit in one second"
    assert at[10] == pytest.approx(1.0)
    assert window.reserve(0.0, max_wait_s=0.5) is None, "too far away: not reserved"


def test_sliding_window_forgets_instants_older_than_the_window() -> None:
    # A limit raised to 100,000/s must not keep 100,000 timestamps per enterprise.
    window = SlidingWindow(100_000, window_s=1.0)
    for n in range(1_000):
        window.reserve(n * 0.001, max_wait_s=0.0)
        window.sent(n * 0.001)
    assert window.wait_to_send(5.0) == 0.0
    assert window.reserve(5.0, max_wait_s=0.0) == 5.0
    assert len(window._times) == 1 and len(window._sent) == 0


async def test_acquire_rejects_when_the_wait_is_too_long() -> None:
    clock = Clock()
    guards = Guards({"default": 2}, 4, Metrics("t"), max_wait_s=0.0, clock=clock)
    await guards.acquire("e1", "default")
    await guards.acquire("e1", "default")
    with pytest.raises(Retryable) as info:
        await guards.acquire("e1", "default")
    assert info.value.rate_limited
    await guards.acquire("e2", "default"), "another enterprise has its own window"
    clock.now += 1.1
    await guards.acquire("e1", "default")


async def test_rate_classes_are_counted_apart() -> None:
    guards = Guards({"default": 1, "telephony": 3}, 4, Metrics("t"), max_wait_s=0.0,
                    clock=Clock())
    for _ in range(3):
        await guards.acquire("e1", "telephony")
    await guards.acquire("e1", "default")
    with pytest.raises(Retryable):
        await guards.acquire("e1", "telephony")


async def test_slots_cap_concurrency_per_enterprise_fifo() -> None:
    guards = Guards({"default": 100}, 2, Metrics("t"))
    running: list[int] = []
    peak = 0
    order: list[int] = []

    async def work(n: int) -> None:
        nonlocal peak
        async with guards.slot("e1"):
            running.append(n)
            order.append(n)
            peak = max(peak, len(running))
            await asyncio.sleep(0.01)
            running.remove(n)

    await asyncio.gather(*(work(n) for n in range(8)))
    assert peak == 2
    assert order == list(range(8))
    assert guards.saturated() == []


async def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    guards = Guards({"default": 100}, 1, Metrics("t"))
    async with guards.slot("e1"):
        waiter = asyncio.create_task(guards.slot("e1").__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    async with guards.slot("e1"):
        pass
    assert guards.saturated() == []


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    guards = Guards({"default": 10}, 4, Metrics("t"), threshold=3, cooldown_s=2.0,
                    max_cooldown_s=8.0, clock=clock)
    for _ in range(2):
        guards.failed("e1")
    assert guards.admit("e1") is None, "below the threshold: closed"
    guards.failed("e1")
    assert guards.blocked() == ["e1"]
    assert guards.admit("e1") == pytest.approx(2.0)
    clock.now += 2.0
    assert guards.admit("e1") is None, "half-open: one probe"
    assert guards.admit("e1") is not None, "...and only one"
    guards.failed("e1")  # the probe failed: open again, longer
    clock.now += 2.0
    assert guards.admit("e1") is not None
    clock.now += 2.0
    assert guards.admit("e1") is None
    guards.succeeded("e1")
    assert guards.blocked() == []
    assert guards.admit("e1") is None
    assert guards.stats()["breakers"] == {}


def test_other_enterprises_are_unaffected_by_an_open_breaker() -> None:
    guards = Guards({"default": 10}, 4, Metrics("t"), threshold=1, clock=Clock())
    guards.failed("e1")
    assert guards.blocked() == ["e1"]
    assert guards.admit("e2") is None
