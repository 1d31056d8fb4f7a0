"""Request rates per key for the routes people and machines call: answer "too many" at once.

Click-to-call is limited per RetailCRM ``clientId`` (``CRM_BRIDGE_MAKE_CALL_RATE``): a
script or a stuck button must not ring a manager's phone dozens of times, and one
enterprise's flood must not slow the others. Unlike the delivery guards
(:mod:`daemon.guards`), which make a CRM request wait for its turn, a throttle never waits:
a person is on the other end, so a request over the limit is refused with the seconds until
one would be admitted (HTTP 429 with ``Retry-After``).

The rule is a sliding window: at most ``limit`` admissions in any ``window_s``, where a rate
of *r* per second gives ``limit = ceil(r)`` and ``window_s = limit / r`` (5/s: 5 in any
second; 2.5/s: 3 in any 1.2 s; 0.5/s: 1 in any 2 s). Time comes from an injectable clock.
Keys are expected to be bounded (enterprises); idle ones are forgotten past ``max_keys``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


class Throttle:
    """Sliding-window admission per key (see the module docstring)."""

    def __init__(self, rate_per_s: float, *, clock: Clock = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        self.limit = math.ceil(rate_per_s)
        self.window_s = self.limit / rate_per_s
        self._clock = clock
        self._max_keys = max_keys
        self._admitted: dict[str, deque[float]] = {}
        self._refusing: set[str] = set()

    def admit(self, key: str) -> float | None:
        """None: go ahead (counted). Else the seconds until a request for ``key`` would be
        admitted (nothing counted)."""
        now = self._clock()
        times = self._admitted.get(key)
        if times is None:
            if len(self._admitted) >= self._max_keys:
                self._forget_idle(now)
            times = self._admitted[key] = deque(maxlen=self.limit)
        if len(times) == self.limit:
            wait = times[0] + self.window_s - now
            if wait > 0:
                return wait
        times.append(now)
        self._refusing.discard(key)
        return None

    def first_refusal(self, key: str) -> bool:
        """After ``admit`` refused ``key``: True for the first refusal since it was last
        admitted (a flood is worth one log line, not one per request)."""
        if key in self._refusing:
            return False
        self._refusing.add(key)
        return True

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, t in self._admitted.items() if not t or t[-1] + self.window_s <= now]
        for key in idle:
            del self._admitted[key]
            self._refusing.discard(key)

    def __len__(self) -> int:
        return len(self._admitted)
