"""Per-enterprise guards around a CRM: request rate, concurrency, and a circuit breaker.

One enterprise = one CRM API key, so every guard is keyed by enterprise number.

* **Rate** — a sliding-window limiter per (enterprise, rate class): at most N requests in
  any window of one second, N from the adapter's ``rate_limits`` (RetailCRM: 10/s, 40/s
  under ``/telephony``). A token bucket with a burst of N would let 2N through in one
  window, and RetailCRM counts windows; so each request reserves the earliest instant that
  keeps the window at N and sleeps until then. A reservation further away than
  ``max_wait_s`` is not made: the caller gets ``Retryable(rate_limited=True)`` and the
  delivery is rescheduled without losing an attempt.
* **Concurrency** — at most ``per_enterprise`` attempts in flight per enterprise.
* **Breaker** — opens after ``threshold`` consecutive transient failures; while open, the
  dispatcher does not claim the enterprise's deliveries (``blocked``); after a cool-down that
  doubles on every failed probe (up to ``max_cooldown_s``) one probe attempt is let through
  (half-open); a success closes it.

Time comes from an injectable clock, so every rule is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

import structlog

from daemon.errors import Retryable
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

WINDOW_S = 1.0
# A late wake-up or network jitter can bring two requests closer together at the CRM than
# they were planned here: plan windows this much longer.
WINDOW_MARGIN_S = 0.05
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_S = 2.0
BREAKER_MAX_COOLDOWN_S = 120.0
# A half-open probe that never reported back (cancelled at stop...) stops blocking after this.
PROBE_STALE_S = 30.0

Clock = Callable[[], float]


class LocalRateLimit(Retryable):
    """Our own limiter refused a request (nothing was sent): reschedule, don't count."""


class SlidingWindow:
    """At most ``limit`` reservations in any ``window_s``; reservations are never reordered."""

    def __init__(self, limit: int, window_s: float = WINDOW_S + WINDOW_MARGIN_S) -> None:
        self.limit = max(1, limit)
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._sent: deque[float] = deque(maxlen=self.limit)

    def wait_to_send(self, now: float) -> float:
        """Seconds still to wait so that the request about to leave keeps the window of the
        *actual* send times (a reservation woken late must not crowd the next ones)."""
        _forget(self._sent, now - self.window_s)
        if len(self._sent) < self.limit:
            return 0.0
        return max(0.0, self._sent[0] + self.window_s - now)

    def sent(self, now: float) -> None:
        """Record that a request left at ``now``."""
        self._sent.append(now)

    def next_free(self, now: float) -> float:
        """The earliest instant (>= now) a new request could go."""
        times = self._times
        _forget(times, now - self.window_s)
        # Fewer than ``limit`` reservations in the window ending now: now is free.
        return now if len(times) < self.limit else max(now, times[0] + self.window_s)

    def reserve(self, now: float, max_wait_s: float) -> float | None:
        """The instant this request may go (>= now), reserved; None if later than allowed."""
        at = self.next_free(now)
        if at - now > max_wait_s:
            return None
        if len(self._times) >= self.limit:
            self._times.popleft()
        self._times.append(at)
        return at


def _forget(times: deque[float], before: float) -> None:
    """Drop the instants at or before ``before`` (sorted deque): they no longer count, and a
    high limit must not keep that many timestamps per enterprise."""
    while times and times[0] <= before:
        times.popleft()


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

    # ------------------------------------------------------------------ rate

    async def acquire(self, enterprise: str, rate_class: str) -> None:
        """Wait for this request's turn; ``Retryable(rate_limited)`` if it is too far away."""
        key = (enterprise, rate_class)
        window = self._windows.get(key)
        if window is None:
            limit = self.rate_limits.get(rate_class, self.rate_limits.get("default", 10.0))
            window = self._windows[key] = SlidingWindow(int(limit))
        now = self._clock()
        at = window.reserve(now, self.max_wait_s)
        if at is None:
            self._metrics.rate_limited_rejects.inc()
            raise LocalRateLimit(
                f"rate limit of {window.limit} requests/s reached", rate_limited=True,
                retry_after=window.next_free(now) - now,
                error_id="rate_limited_locally",
            )
        if at > now:
            self._metrics.rate_limited_waits.inc()
            await asyncio.sleep(at - now)
        for _ in range(window.limit):  # others may leave while we sleep: look again
            late = window.wait_to_send(self._clock())
            if late <= 0:
                break
            await asyncio.sleep(late)
        window.sent(self._clock())

    def gate(
        self, enterprise: str, classify: Callable[[str], str]
    ) -> Callable[[str], Awaitable[None]]:
        """The per-request hook an adapter's client calls with each request path."""

        async def before_request(path: str) -> None:
            await self.acquire(enterprise, classify(path))

        return before_request

    def throttle(self, enterprise: str, seconds: float) -> None:
        """Leave ``enterprise`` out of claims for ``seconds`` (its rate window is full)."""
        self._throttled[enterprise] = self._clock() + seconds

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
        """The CRM answered (any definite answer, even a refusal): close the breaker."""
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
            "per_enterprise": self.per_enterprise,
        }
