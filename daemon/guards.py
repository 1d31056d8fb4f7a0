"""Per-enterprise guards around a CRM: request rate, concurrency, and a circuit breaker.

One enterprise = one CRM API key, so every guard is keyed by enterprise number. The process
that owns an enterprise (``daemon.ownership``) is the only one sending for it, so what is
counted here is what the CRM counts.

* **Rate** — at most N requests per (enterprise, rate class) in any window of one second,
  N from the adapter's ``rate_limits`` (RetailCRM: 10/s, 40/s under ``/telephony``),
  counted as the CRM counts them, at arrival (``daemon.ratewindow``: a request leaves only
  when the one N before it was answered a window ago). A turn further away than
  ``max_wait_s`` is not waited for: the caller gets ``LocalRateLimit`` and the delivery is
  rescheduled without losing an attempt.
* **Adaptive rate** — an answer saying "slow down" (RetailCRM: 503) halves the enterprise's
  rate (at least one request per second per class) and counts a streak the retry policy
  backs off from; every success doubles the rate back, up to the limit, and ends the streak.
  A streak of ``RATE_STORM_THRESHOLD`` opens the breaker, as an outage does.
* **Concurrency** — at most ``per_enterprise`` attempts in flight per enterprise.
* **Breaker** — opens after ``threshold`` consecutive transient failures; while open, the
  dispatcher does not claim the enterprise's deliveries (``blocked``); after a cool-down that
  doubles on every failed probe (up to ``max_cooldown_s``) one probe attempt is let through
  (half-open); a success closes it.

Time comes from an injectable clock, so every rule is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import structlog

from daemon.errors import Retryable
from daemon.integrations.base import Exchange
from daemon.metrics import Metrics
from daemon.ratewindow import Request, SlidingWindow

log = structlog.get_logger(__name__)

MIN_RATE_FACTOR = 1 / 32  # and never below one request per window (SlidingWindow.scale)
RATE_STORM_THRESHOLD = 8
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_S = 2.0
BREAKER_MAX_COOLDOWN_S = 120.0
# A half-open probe that never reported back (cancelled at stop...) stops blocking after this.
PROBE_STALE_S = 30.0

Clock = Callable[[], float]


class LocalRateLimit(Retryable):
    """Our own limiter refused a request (nothing was sent): reschedule, don't count."""


class BreakerState(IntEnum):
    """As exported in ``crm_bridge_breaker_state`` (CLOSED only as the series' absence)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class Breaker:
    """One enterprise's circuit breaker (see the module docstring)."""

    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    cooldown_s: float = BREAKER_COOLDOWN_S
    open_until: float = 0.0
    probing: bool = False
    probe_started: float = 0.0


@dataclass(slots=True)
class _Slots:
    in_flight: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class _Slot:
    """One attempt slot held for the ``async with`` block (a plain class: this runs once per
    delivery, and a generator-based context manager costs several times more)."""

    __slots__ = ("_enterprise", "_guards", "_slots")

    def __init__(self, guards: Guards, enterprise: str) -> None:
        self._guards = guards
        self._enterprise = enterprise
        self._slots: _Slots | None = None

    async def __aenter__(self) -> None:
        self._slots = await self._guards._take(self._enterprise)

    async def __aexit__(self, *_exc: object) -> None:
        assert self._slots is not None
        self._guards._release(self._enterprise, self._slots)


def _blocking(breaker: Breaker, now: float) -> bool:
    if breaker.state is BreakerState.OPEN:
        return now < breaker.open_until
    return (breaker.state is BreakerState.HALF_OPEN and breaker.probing
            and now - breaker.probe_started <= PROBE_STALE_S)


class Guards:
    """Every enterprise's guards for one integration."""

    def __init__(
        self,
        rate_limits: Mapping[str, float],
        per_enterprise: int,
        metrics: Metrics,
        *,
        max_wait_s: float = 1.0,
        threshold: int = BREAKER_THRESHOLD,
        cooldown_s: float = BREAKER_COOLDOWN_S,
        max_cooldown_s: float = BREAKER_MAX_COOLDOWN_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self.rate_limits = dict(rate_limits)
        self.per_enterprise = per_enterprise
        self.max_wait_s = max_wait_s
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._metrics = metrics
        self._windows: dict[tuple[str, str], SlidingWindow] = {}
        self._slots: dict[str, _Slots] = {}
        self._breakers: dict[str, Breaker] = {}
        self._throttled: dict[str, float] = {}  # enterprise -> until (its rate window is full)
        self._factors: dict[str, float] = {}  # enterprise -> share of its rate (absent: 1)
        self._streaks: dict[str, int] = {}  # enterprise -> consecutive "slow down" answers

    # ------------------------------------------------------------------ rate

    def _window(self, enterprise: str, rate_class: str) -> SlidingWindow:
        key = (enterprise, rate_class)
        window = self._windows.get(key)
        if window is None:
            limit = self.rate_limits.get(rate_class, self.rate_limits.get("default", 10.0))
            window = self._windows[key] = SlidingWindow(int(limit))
            window.scale(self._factors.get(enterprise, 1.0))
        return window

    async def acquire(self, enterprise: str, rate_class: str, timeout_s: float,
                      latest_start: float | None = None) -> Request:
        """Wait for this request's turn and count it as leaving; ``LocalRateLimit`` if the
        turn is too far away (more than ``max_wait_s``, or past ``latest_start``: a request
        begun too late in its attempt would be cut, and maybe delivered twice). The caller
        reports the end with ``ended`` (``RequestGate`` does both)."""
        window = self._window(enterprise, rate_class)
        now = self._clock()
        max_wait_s = self.max_wait_s if latest_start is None else min(
            self.max_wait_s, latest_start - now)
        at = window.reserve(now, max_wait_s)
        if at is None:
            self._metrics.rate_limited_rejects.inc()
            raise LocalRateLimit(
                f"rate limit of {window.limit} requests/s reached", rate_limited=True,
                retry_after=max(0.1, window.next_free(now) - now),
                error_id="rate_limited_locally",
            )
        waited = False
        if at > now:
            waited = True
            await asyncio.sleep(at - now)
        while (blocker := window.blocked_by(self._clock())) is not None:
            waited = True
            if isinstance(blocker, Request):
                blocker.ended = blocker.ended or asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, blocker.latest - self._clock())):
                        await blocker.ended.wait()
            else:
                await asyncio.sleep(blocker)
        if waited:
            self._metrics.rate_limited_waits.inc()
            if latest_start is not None and self._clock() > latest_start:
                self._metrics.rate_limited_rejects.inc()
                raise LocalRateLimit("the rate limit left no time for the request in this "
                                     "attempt", rate_limited=True, retry_after=0.1,
                                     error_id="rate_limited_locally")
        return window.started(self._clock(), timeout_s)

    def ended(self, enterprise: str, rate_class: str, request: Request, answered: bool) -> None:
        """``request`` (from ``acquire``) is over, answered or not."""
        self._window(enterprise, rate_class).ended(request, self._clock(), answered)

    def gate(
        self, enterprise: str, classify: Callable[[str], str], timeout_s: float,
        latest_start: float | None = None,
    ) -> RequestGate:
        """The per-attempt hook an adapter's client calls with each request path; no
        request leaves after ``latest_start`` (monotonic)."""
        return RequestGate(self, enterprise, classify, timeout_s, latest_start)

    def throttle(self, enterprise: str, seconds: float) -> None:
        """Leave ``enterprise`` out of claims for ``seconds`` (its rate window is full, or
        the CRM asked to slow down)."""
        until = self._clock() + seconds
        self._throttled[enterprise] = max(until, self._throttled.get(enterprise, 0.0))

    def rate_limited(self, enterprise: str) -> int:
        """The CRM answered "slow down": halve the enterprise's rate, count the streak (a
        long one opens the breaker) and return it (1 for the first such answer)."""
        streak = self._streaks.get(enterprise, 0) + 1
        self._streaks[enterprise] = streak
        if streak == 1:
            log.warning("crm_rate_limited", enterprise=enterprise)
        self._set_factor(enterprise, self._factors.get(enterprise, 1.0) / 2)
        breaker = self._breakers.get(enterprise)
        if breaker is not None and breaker.state is BreakerState.HALF_OPEN:
            self.failed(enterprise)  # the probe was told to slow down: still not well
        elif streak >= RATE_STORM_THRESHOLD and (
                breaker is None or breaker.state is BreakerState.CLOSED):
            breaker = self._breaker(enterprise)
            breaker.failures = streak
            self._open(enterprise, breaker, self._clock())
        return streak

    def _set_factor(self, enterprise: str, factor: float) -> None:
        factor = min(1.0, max(factor, MIN_RATE_FACTOR))
        if factor >= 1.0:
            if self._factors.pop(enterprise, None) is None:
                return
            log.info("crm_rate_restored", enterprise=enterprise)
        else:
            self._factors[enterprise] = factor
        self._metrics.rate_factor.labels(enterprise).set(factor)
        for (owner, _class), window in self._windows.items():
            if owner == enterprise:
                window.scale(factor)

    def rate_factor(self, enterprise: str) -> float:
        """The share of its full rate the enterprise runs at now (1: all of it)."""
        return self._factors.get(enterprise, 1.0)

    # ------------------------------------------------------------------ concurrency

    def slot(self, enterprise: str) -> _Slot:
        """``async with``: hold one of the enterprise's ``per_enterprise`` attempt slots
        (FIFO wait)."""
        return _Slot(self, enterprise)

    async def _take(self, enterprise: str) -> _Slots:
        slots = self._slots.setdefault(enterprise, _Slots())
        if slots.in_flight >= self.per_enterprise:
            waiter = asyncio.get_running_loop().create_future()
            slots.waiters.append(waiter)
            try:
                await waiter  # the releaser counted us in already
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release(enterprise, slots)
                elif waiter in slots.waiters:
                    slots.waiters.remove(waiter)
                raise
        else:
            slots.in_flight += 1
        return slots

    def _release(self, enterprise: str, slots: _Slots) -> None:
        while slots.waiters:
            waiter = slots.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand our slot over: in_flight stays the same
                return
        slots.in_flight -= 1
        if slots.in_flight == 0:
            del self._slots[enterprise]

    def saturated(self) -> list[str]:
        """Enterprises with every slot taken (claiming more of theirs would only queue)."""
        return [e for e, s in self._slots.items() if s.in_flight >= self.per_enterprise]

    # ------------------------------------------------------------------ breaker

    def _breaker(self, enterprise: str) -> Breaker:
        breaker = self._breakers.get(enterprise)
        if breaker is None:
            breaker = self._breakers[enterprise] = Breaker(cooldown_s=self.cooldown_s)
        return breaker

    def admit(self, enterprise: str) -> float | None:
        """None: go ahead. Else seconds until the breaker lets an attempt through."""
        breaker = self._breakers.get(enterprise)
        if breaker is None or breaker.state is BreakerState.CLOSED:
            return None
        now = self._clock()
        if breaker.state is BreakerState.OPEN and now >= breaker.open_until:
            breaker.state = BreakerState.HALF_OPEN
            breaker.probing = False
            self._export(enterprise, breaker)
        if breaker.state is BreakerState.HALF_OPEN and (
            not breaker.probing or now - breaker.probe_started > PROBE_STALE_S
        ):
            breaker.probing = True
            breaker.probe_started = now
            return None
        return max(breaker.open_until - now, 0.5)

    def succeeded(self, enterprise: str) -> None:
        """The CRM answered (any definite answer, even a refusal): close the breaker, end a
        "slow down" streak and double the rate back towards the full one."""
        self._streaks.pop(enterprise, None)
        factor = self._factors.get(enterprise)
        if factor is not None:
            self._set_factor(enterprise, factor * 2)
        breaker = self._breakers.pop(enterprise, None)
        if breaker is not None and breaker.state is not BreakerState.CLOSED:
            log.info("breaker_closed", enterprise=enterprise)
            # A closed breaker has no series: thousands of enterprises, a handful not closed.
            self._metrics.breaker_state.remove(enterprise)

    def failed(self, enterprise: str) -> None:
        """A transient failure (timeout, connection, 5xx): count it, maybe open the breaker."""
        breaker = self._breaker(enterprise)
        now = self._clock()
        if breaker.state is BreakerState.HALF_OPEN:
            breaker.cooldown_s = min(breaker.cooldown_s * 2, self.max_cooldown_s)
            self._open(enterprise, breaker, now)
            return
        breaker.failures += 1
        if breaker.state is BreakerState.CLOSED and breaker.failures >= self.threshold:
            self._open(enterprise, breaker, now)

    def _open(self, enterprise: str, breaker: Breaker, now: float) -> None:
        breaker.state = BreakerState.OPEN
        breaker.open_until = now + breaker.cooldown_s
        breaker.probing = False
        log.warning("breaker_opened", enterprise=enterprise, cooldown_s=breaker.cooldown_s,
                    failures=breaker.failures)
        self._export(enterprise, breaker)

    def _export(self, enterprise: str, breaker: Breaker) -> None:
        self._metrics.breaker_state.labels(enterprise).set(breaker.state)

    def blocked(self) -> list[str]:
        """Enterprises whose deliveries must not be claimed now: breaker open or probing,
        every slot taken, or the rate window full."""
        now = self._clock()
        for enterprise, until in list(self._throttled.items()):
            if until <= now:
                del self._throttled[enterprise]
        out = {e for e, b in self._breakers.items() if _blocking(b, now)}
        out.update(self._throttled)
        out.update(self.saturated())
        return sorted(out)

    def stats(self) -> dict[str, object]:
        """Guard states for ``/stats``."""
        now = self._clock()
        return {
            "breakers": {
                e: {"state": b.state.name.lower(), "failures": b.failures,
                    "retry_in_s": round(max(0.0, b.open_until - now), 1)}
                for e, b in self._breakers.items() if b.state is not BreakerState.CLOSED
            },
            "busy_enterprises": {e: s.in_flight for e, s in self._slots.items()},
            "rate_limits": self.rate_limits,
            "lowered_rates": {e: round(f, 3) for e, f in self._factors.items()},
            "per_enterprise": self.per_enterprise,
        }


class RequestGate:
    """One attempt's gate (``DeliveryContext.gate``): awaited before each request, told by
    ``ended`` (``DeliveryContext.on_exchange``) when each is over; ``close`` ends whatever
    the attempt left unanswered (a cancelled request). Requests end in the order they left:
    an adapter's client sends one at a time."""

    __slots__ = ("_classify", "_enterprise", "_guards", "_latest_start", "_open", "_timeout_s")

    def __init__(self, guards: Guards, enterprise: str, classify: Callable[[str], str],
                 timeout_s: float, latest_start: float | None = None) -> None:
        self._guards = guards
        self._enterprise = enterprise
        self._classify = classify
        self._timeout_s = timeout_s
        self._latest_start = latest_start
        self._open: deque[tuple[str, Request]] = deque()

    async def __call__(self, path: str) -> None:
        rate_class = self._classify(path)
        request = await self._guards.acquire(self._enterprise, rate_class, self._timeout_s,
                                             self._latest_start)
        self._open.append((rate_class, request))

    def ended(self, exchange: Exchange | None = None) -> None:
        """The oldest request still open is over (answered when ``exchange`` has a status)."""
        if self._open:
            rate_class, request = self._open.popleft()
            answered = exchange is not None and exchange.status is not None
            self._guards.ended(self._enterprise, rate_class, request, answered)

    def close(self) -> None:
        """End every request still open, as unanswered."""
        while self._open:
            self.ended()
