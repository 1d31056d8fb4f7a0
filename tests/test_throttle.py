"""The click-to-call throttle: a sliding window per key, refusing at once, keys apart."""

from __future__ import annotations

import pytest

from daemon.throttle import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_at_most_the_rate_in_any_window_then_the_wait_is_told() -> None:
    clock = Clock()
    throttle = Throttle(5, clock=clock)
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("a") == pytest.approx(1.0)
    clock.now += 0.4
    assert throttle.admit("a") == pytest.approx(0.6)  # refusals are not counted
    assert throttle.admit("b") is None  # another key has its own window
    clock.now += 0.6  # a second after the first five: a whole new window
    assert [throttle.admit("a") for _ in range(5)] == [None] * 5
    assert throttle.admit("a") == pytest.approx(1.0)


def test_fractional_and_slow_rates() -> None:
    clock = Clock()
    slow = Throttle(0.5, clock=clock)
    assert (slow.limit, slow.window_s) == (1, 2.0)
    assert slow.admit("a") is None
    assert slow.admit("a") == pytest.approx(2.0)
    odd = Throttle(2.5, clock=clock)
    assert (odd.limit, odd.window_s) == (3, pytest.approx(1.2))
    with pytest.raises(ValueError, match="positive"):
        Throttle(0)


def test_idle_keys_are_forgotten_past_the_cap() -> None:
    clock = Clock()
    throttle = Throttle(5, clock=clock, max_keys=3)
    for key in "abc":
        throttle.admit(key)
    clock.now += 5
    throttle.admit("d")
    assert len(throttle) == 1


def test_a_run_of_refusals_is_reported_once() -> None:
    clock = Clock()
    throttle = Throttle(1, clock=clock)
    assert throttle.admit("a") is None
    refusals = []
    for _ in range(3):
        assert throttle.admit("a") is not None
        refusals.append(throttle.first_refusal("a"))
    assert refusals == [True, False, False]
    clock.now += 1
    assert throttle.admit("a") is None
    assert throttle.admit("a") is not None and throttle.first_refusal("a")
