"""The retry policy, pure: no clock, no database."""

from __future__ import annotations

import random

import pytest

from daemon.errors import AuthFailed, Permanent, Retryable
from daemon.retry import (
    BUG_MAX_ATTEMPTS,
    RATE_LIMITED_MAX_DELAY_S,
    Policy,
    backoff,
    decide,
    rate_limited_backoff,
)

POLICY = Policy(max_attempts=12, max_age_s=86_400, base_delay_s=1.0, max_delay_s=300.0)


def rng() -> random.Random:
    return random.Random(7)


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 9, 12, 30])
def test_backoff_is_full_jitter_under_a_capped_exponential(attempt: int) -> None:
    r = rng()
    ceiling = min(300.0, 2 ** (attempt - 1))
    samples = [backoff(attempt, POLICY, r) for _ in range(500)]
    assert all(0 <= s <= ceiling for s in samples)
    assert max(samples) > ceiling * 0.9, "the whole range is used"
    assert min(samples) < ceiling * 0.1


def test_retryable_retries_until_the_attempt_cap() -> None:
    error = Retryable("HTTP 500", error_id="http_500")
    for attempt in range(1, 12):
        decision = decide(error, attempt, 10.0, POLICY, rng())
        assert decision.action == "retry"
        assert decision.counted
    final = decide(error, 12, 10.0, POLICY, rng())
    assert final.action == "fail"
    assert "gave up after 12 attempts" in final.reason


def test_retry_after_is_honoured() -> None:
    decision = decide(Retryable("503", retry_after=42.0), 1, 0.0, POLICY, rng())
    assert decision.delay_s >= 42.0


def test_rate_limited_reschedules_without_counting() -> None:
    decision = decide(Retryable("slow down", rate_limited=True, retry_after=5.0), 12, 0.0,
                      POLICY, rng())
    assert (decision.action, decision.counted, decision.delay_s) == ("retry", False, 5.0)
    no_header = decide(Retryable("slow down", rate_limited=True), 1, 0.0, POLICY, rng())
    assert no_header.delay_s >= 1.0


def test_the_age_cap_fails_a_delivery() -> None:
    decision = decide(Retryable("timeout"), 2, 86_399.5, POLICY, rng())
    assert decision.action == "fail"
    assert "gave up after" in decision.reason
    limited = decide(Retryable("x", rate_limited=True, retry_after=10), 1, 86_395, POLICY, rng())
    assert limited.action == "fail"


def test_permanent_fails_at_once_and_auth_failed_holds() -> None:
    assert decide(Permanent("bad field", error_id="http_400"), 1, 0, POLICY, rng()).action == "fail"
    auth = decide(AuthFailed("wrong key", error_id="auth_failed"), 1, 0, POLICY, rng())
    assert (auth.action, auth.hold) == ("fail", True)
    assert auth.reason == "auth_failed: wrong key"


def test_a_bug_is_retried_a_few_times_and_never_shows_its_message() -> None:
    bug = KeyError("api_key=SECRET")
    for attempt in range(1, BUG_MAX_ATTEMPTS):
        assert decide(bug, attempt, 0, POLICY, rng()).action == "retry"
    final = decide(bug, BUG_MAX_ATTEMPTS, 0, POLICY, rng())
    assert final.action == "fail"
    assert "SECRET" not in final.reason
    assert final.reason.startswith("bug: KeyError")


@pytest.mark.parametrize("streak", [1, 2, 3, 4, 5, 6, 7, 20])
def test_slow_down_answers_back_off_growing_and_jittered(streak: int) -> None:
    r = rng()
    ceiling = min(RATE_LIMITED_MAX_DELAY_S, 2.0 ** streak)
    samples = [rate_limited_backoff(streak, r) for _ in range(300)]
    assert all(ceiling / 2 <= s <= ceiling for s in samples), "grows: never below half"
    assert max(samples) - min(samples) > ceiling * 0.4, "jittered over the upper half"


def test_a_streak_of_slow_down_answers_waits_longer_each_time_without_counting() -> None:
    error = Retryable("HTTP 503", rate_limited=True, error_id="rate_limited")
    decisions = [decide(error, 1, 0.0, POLICY, rng(), rate_limited_streak=n) for n in range(1, 7)]
    delays = [d.delay_s for d in decisions]
    assert delays == sorted(delays) and delays[-1] > 8 * delays[0]
    assert {(d.action, d.counted) for d in decisions} == {("retry", False)}
    header = decide(Retryable("503", rate_limited=True, retry_after=90.0), 1, 0.0, POLICY,
                    rng(), rate_limited_streak=6)
    assert header.delay_s == 90.0, "Retry-After honoured when it asks for longer"
