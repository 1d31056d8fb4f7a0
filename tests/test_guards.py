"""Guards with a fake clock: the exact rate window, the adaptive rate, slots, circuit breaker."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from daemon.errors import Retryable
from daemon.guards import RATE_STORM_THRESHOLD, Guards, LocalRateLimit
from daemon.integrations.base import Exchange
from daemon.metrics import Metrics
from daemon.ratewindow import Request, SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _arrivals_respect(arrivals: list[float], limit: int, window_s: float) -> int:
    """The most arrivals in any half-open window of ``window_s`` (the CRM's count)."""
    times = sorted(arrivals)
    peak = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        peak = max(peak, end - start + 1)
    return peak


@pytest.mark.parametrize("seed", range(40))
def test_no_n_plus_one_arrivals_share_a_window_whatever_the_network_does(seed: int) -> None:
    # Requests leave as soon as the window allows, overlap (4 in flight), take from 1 ms
    # to 0.9 s, some get no answer; each arrives at the CRM at any instant between leaving
    # and its answer (or a little after we gave up). The CRM never counts more than N.
    rng = random.Random(seed)
    limit = rng.choice([1, 3, 10, 40])
    window = SlidingWindow(limit, window_s=1.0)
    now, arrivals = 0.0, []
    in_flight: list[tuple[float, bool, Request]] = []  # (end, answered, request)
    for _ in range(400):
        while len(in_flight) >= 4 or (blocker := window.blocked_by(now)) is not None:
            if len(in_flight) < 4 and isinstance(blocker, float):
                now += blocker
            else:  # wait for the next answer
                in_flight.sort(key=lambda x: x[0])
                end, answered, request = in_flight.pop(0)
                now = max(now, end)
                window.ended(request, now, answered=answered)
        request = window.started(now, timeout_s=1.0)
        took = rng.choice([0.001, 0.02, 0.3, 0.9, rng.uniform(0, 1.0)])
        lost = rng.random() < 0.1
        if lost:  # cut at the timeout; the server still read it, a little late
            end = now + 1.0
            arrival = now + rng.uniform(0, 1.0 + 0.49)
        else:
            end = now + took
            arrival = rng.uniform(now, end)
        arrivals.append(arrival)
        in_flight.append((end, not lost, request))
        now += rng.choice([0.0, 0.0, 0.001, 0.05])
    assert _arrivals_respect(arrivals, limit, 1.0) <= limit


def test_the_window_is_used_when_answers_are_fast() -> None:
    window = SlidingWindow(10, window_s=1.0)
    now, starts = 0.0, []
    while len(starts) < 30:
        wait = window.blocked_by(now)
        if wait is not None:
            assert isinstance(wait, float)
            now += wait
            continue
        request = window.started(now, timeout_s=3.0)
        window.ended(request, now + 0.002, answered=True)
        starts.append(now)
    assert starts[10] == pytest.approx(1.002), "the 11th goes a window after the 1st's answer"
    assert starts[29] < 2.1, "about 10 per second: the limit is used, not wasted"


def test_planning_spaces_reservations_by_the_window_and_the_measured_jitter() -> None:
    window = SlidingWindow(10, window_s=1.0)
    for n in range(10):
        request = window.started(0.0, timeout_s=3.0)
        window.ended(request, 0.08 if n == 0 else 0.01, answered=True)
    assert window.jitter_s == pytest.approx(0.08 * 0.9 ** 9, rel=0.01) or window.jitter_s >= 0.01
    times = [window.reserve(0.0, max_wait_s=100.0) for _ in range(25)]
    at = [t for t in times if t is not None]
    assert at == sorted(at)
    for i in range(len(at) - 10):
        assert at[i + 10] - at[i] >= 1.0 + window.jitter_s - 1e-9
    assert window.reserve(0.0, max_wait_s=0.5) is None, "too far away: not reserved"


def test_the_window_forgets_what_can_no_longer_hold_anyone_back() -> None:
    # A limit raised to 100,000/s must not keep 100,000 requests per enterprise.
    window = SlidingWindow(100_000, window_s=1.0)
    for n in range(1_000):
        request = window.started(n * 0.001, timeout_s=3.0)
        window.ended(request, n * 0.001 + 0.0005, answered=True)
    assert window.blocked_by(5.0) is None
    assert len(window._requests) == 0
    window.reserve(5.0, max_wait_s=0.0)
    assert window.next_free(7.0) == 7.0 and len(window._planned) == 0


async def test_acquire_rejects_when_the_wait_is_too_long() -> None:
    clock = Clock()
    guards = Guards({"default": 2}, 4, Metrics("t"), max_wait_s=0.0, clock=clock)
    for _ in range(2):
        guards.ended("e1", "default", await guards.acquire("e1", "default", 3.0), True)
    with pytest.raises(LocalRateLimit) as info:
        await guards.acquire("e1", "default", 3.0)
    assert info.value.rate_limited
    await guards.acquire("e2", "default", 3.0), "another enterprise has its own window"
    clock.now += 1.1
    await guards.acquire("e1", "default", 3.0)


async def test_rate_classes_are_counted_apart() -> None:
    guards = Guards({"default": 1, "telephony": 3}, 4, Metrics("t"), max_wait_s=0.0,
                    clock=Clock())
    for _ in range(3):
        await guards.acquire("e1", "telephony", 3.0)
    await guards.acquire("e1", "default", 3.0)
    with pytest.raises(Retryable):
        await guards.acquire("e1", "telephony", 3.0)


async def test_a_request_waits_for_the_answer_of_the_one_n_before_it() -> None:
    guards = Guards({"default": 1}, 4, Metrics("t"), max_wait_s=5.0)
    gate = guards.gate("e1", lambda _path: "default", 3.0)
    await gate("/a")
    second = asyncio.create_task(gate("/b"))
    await asyncio.sleep(1.2)  # past the planned instant: only the missing answer holds it
    assert not second.done(), "the first request's answer has not come: it may arrive late"
    gate.ended(Exchange("POST", "/a", {}, 200, {}, 1.2))
    started = time.monotonic()
    await asyncio.wait_for(second, 3)
    assert time.monotonic() - started >= 0.95, "a whole window after that answer"
    gate.close()


def test_slow_down_answers_lower_the_rate_until_answers_succeed_again() -> None:
    clock = Clock()
    metrics = Metrics("t")
    guards = Guards({"default": 10, "telephony": 40}, 4, metrics, clock=clock)
    guards._window("e1", "telephony")
    assert [guards.rate_limited("e1") for _ in range(3)] == [1, 2, 3]
    assert guards.rate_factor("e1") == pytest.approx(1 / 8)
    assert guards._window("e1", "telephony").limit == 5
    assert guards._window("e1", "default").limit == 1, "never below one per window"
    assert guards.rate_factor("e2") == 1.0, "other enterprises keep their rate"
    for _ in range(20):
        guards.rate_limited("e1")
    assert guards.rate_factor("e1") >= 1 / 32
    guards.succeeded("e1")
    assert guards.rate_limited("e1") == 1, "a success ends the streak"
    for _ in range(6):
        guards.succeeded("e1")
    assert guards.rate_factor("e1") == 1.0
    assert guards._window("e1", "telephony").limit == 40
    assert guards.stats()["lowered_rates"] == {}


def test_a_long_storm_of_slow_down_answers_opens_the_breaker() -> None:
    clock = Clock()
    guards = Guards({"default": 10}, 4, Metrics("t"), threshold=5, cooldown_s=2.0, clock=clock)
    for _ in range(RATE_STORM_THRESHOLD - 1):
        guards.rate_limited("e1")
    assert guards.blocked() == [], "a burst is not an outage"
    guards.rate_limited("e1")
    assert guards.blocked() == ["e1"]
    clock.now += 2.0
    assert guards.admit("e1") is None, "half-open: one probe"
    guards.rate_limited("e1")  # the probe was told to slow down as well
    assert guards.blocked() == ["e1"]
    assert guards.stats()["breakers"]["e1"]["retry_in_s"] == pytest.approx(4.0)
    clock.now += 4.0
    assert guards.admit("e1") is None
    guards.succeeded("e1")
    assert guards.blocked() == []


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
