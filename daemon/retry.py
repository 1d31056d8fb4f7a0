"""The retry policy: a pure function from (attempt, error, age) to the delivery's next state.

No clock and no database here: the caller passes the attempt number, the error, how old the
delivery is and a random source, and gets a ``Decision`` (docs/architecture.md, "Retries").
Backoff is capped exponential with full jitter (uniform in
``[0, min(cap, base * 2**(n-1))]``), never sooner than a ``retry_after`` the CRM asked for.

A "slow down" answer (429/503) is not an attempt used up, but it is not free either: the
caller passes the enterprise's streak of such answers, and the delay grows with it — doubling
from ``RATE_LIMITED_DELAY_S`` up to ``RATE_LIMITED_MAX_DELAY_S``, jittered within its upper
half so that it really grows — and is never sooner than ``Retry-After``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from daemon.errors import AuthFailed, DeliveryError, Permanent, Retryable

BASE_DELAY_S = 1.0
MAX_DELAY_S = 300.0
# An exception that is none of ours is a bug: retried, but only this many times.
BUG_MAX_ATTEMPTS = 3
# "Slow down" answers: the first waits 1–2 s, each one more of the enterprise's streak twice
# that, up to 30–60 s (or Retry-After, if longer).
RATE_LIMITED_DELAY_S = 1.0
RATE_LIMITED_MAX_DELAY_S = 60.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs (from settings)."""

    max_attempts: int = 12
    max_age_s: float = 86_400.0
    base_delay_s: float = BASE_DELAY_S
    max_delay_s: float = MAX_DELAY_S


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a delivery after a failed attempt.

    ``action``: ``retry`` (pending again after ``delay_s``) or ``fail`` (dead letter).
    ``counted``: False when the attempt must not use up one of the delivery's attempts
    (the CRM said "slow down"). ``hold``: the enterprise needs its admin's attention.
    """

    action: Literal["retry", "fail"]
    delay_s: float = 0.0
    counted: bool = True
    hold: bool = False
    reason: str = ""


def backoff(attempt: int, policy: Policy, rng: random.Random) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th failure (1-based)."""
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2 ** max(0, attempt - 1))
    return rng.uniform(0, ceiling)


def rate_limited_backoff(streak: int, rng: random.Random) -> float:
    """The wait after the ``streak``-th consecutive "slow down" answer (1-based): uniform in
    the upper half of ``min(max, base * 2**streak)``."""
    ceiling = min(RATE_LIMITED_MAX_DELAY_S, RATE_LIMITED_DELAY_S * 2 ** min(max(1, streak), 30))
    return rng.uniform(ceiling / 2, ceiling)


def decide(
    error: BaseException, attempt: int, age_s: float, policy: Policy, rng: random.Random,
    *, rate_limited_streak: int = 1,
) -> Decision:
    """The outcome of attempt number ``attempt`` (1-based) that raised ``error``;
    ``rate_limited_streak`` is the enterprise's count of consecutive "slow down" answers,
    this one included (only read when ``error`` is one)."""
    reason = describe(error)
    if isinstance(error, AuthFailed):
        return Decision("fail", hold=True, reason=reason)
    if isinstance(error, Permanent):
        return Decision("fail", reason=reason)
    if isinstance(error, Retryable) and error.rate_limited:
        delay = max(error.retry_after or 0.0, rate_limited_backoff(rate_limited_streak, rng))
        if age_s + delay > policy.max_age_s:
            return Decision("fail", reason=f"{reason} (gave up after {age_s:.0f} s)")
        return Decision("retry", delay_s=min(delay, policy.max_delay_s), counted=False,
                        reason=reason)
    limit = policy.max_attempts if isinstance(error, Retryable) else min(
        policy.max_attempts, BUG_MAX_ATTEMPTS
    )
    if attempt >= limit:
        return Decision("fail", reason=f"{reason} (gave up after {attempt} attempts)")
    delay = backoff(attempt, policy, rng)
    if isinstance(error, Retryable) and error.retry_after:
        delay = max(delay, error.retry_after)
    if age_s + delay > policy.max_age_s:
        return Decision("fail", reason=f"{reason} (gave up after {age_s:.0f} s)")
    return Decision("retry", delay_s=delay, reason=reason)


def describe(error: BaseException) -> str:
    """A one-line reason for ``last_error`` and the logs (messages of ours carry no secret)."""
    if isinstance(error, DeliveryError):
        return f"{error.error_id}: {error.message}"
    return f"bug: {type(error).__name__}"
