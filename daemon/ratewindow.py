"""The rate window: at most N requests in any one-second window, counted at the CRM.

A CRM counts a request when it *arrives*. We never know that instant, only that it lies
between the moment the request left (:meth:`SlidingWindow.started`) and the moment its
answer came back (:meth:`SlidingWindow.ended`). So the rule is: a request may leave only
when every request N or more before it (in the order they left) was answered at least a
window ago. Then N + 1 arrivals never share a window, however the network, the server or a
busy event loop spread them: for any N + 1 requests, the last left after the first was
answered plus a window, and arrived later still. A request that got no answer (timed out,
cut) counts until ``UNANSWERED_SLACK_S`` after we gave up.

:meth:`SlidingWindow.reserve` plans ahead on top of that: each caller reserves an instant,
the window plus the spread of recent requests' durations (the measured jitter) after the
N-th reservation before it, so waiting callers sleep about the right time, in order, and a
caller too far back in the queue can be told so at once. Planning is approximate; the rule
above is exact. No clock is read here: every method takes ``now``.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque

WINDOW_S = 1.0
# A request that got no answer may still reach the CRM a little after we gave up (a server
# reading its backlog): it counts this much longer.
UNANSWERED_SLACK_S = 0.5
# The planning margin follows the slowest recent request, within these bounds.
JITTER_FLOOR_S = 0.005
JITTER_CAP_S = 0.5
JITTER_DECAY = 0.9  # per request: a slow one is forgotten over a few dozen fast ones


class Request:
    """One request counted in a window: when it left, and when its answer was back."""

    __slots__ = ("end", "ended", "latest", "start")

    def __init__(self, start: float, latest: float) -> None:
        self.start = start
        self.latest = latest  # no answer by then: it counts as ending here
        self.end: float | None = None
        self.ended: asyncio.Event | None = None  # made when someone waits for the answer

    def finish(self, at: float) -> None:
        """The round trip is over."""
        self.end = at
        if self.ended is not None:
            self.ended.set()


class SlidingWindow:
    """At most ``limit`` arrivals in any ``window_s`` (see the module docstring)."""

    def __init__(self, limit: int, window_s: float = WINDOW_S) -> None:
        self.base_limit = max(1, limit)
        self.limit = self.base_limit
        self.window_s = window_s
        self.jitter_s = JITTER_FLOOR_S
        self._planned: deque[float] = deque()
        self._requests: deque[Request] = deque()  # in the order they left

    def scale(self, factor: float) -> None:
        """Run at ``factor`` of the full limit (at least one request per window)."""
        self.limit = max(1, math.floor(self.base_limit * factor))

    # -- planning: approximate, so callers sleep about the right time, in order

    def next_free(self, now: float) -> float:
        """The earliest planned instant (>= now) a new request could go."""
        span = self.window_s + self.jitter_s
        _forget(self._planned, now - span)
        if len(self._planned) < self.limit:
            return now
        return max(now, self._planned[-self.limit] + span)

    def reserve(self, now: float, max_wait_s: float) -> float | None:
        """Plan this request's instant (>= now) and keep it; None if later than allowed."""
        at = self.next_free(now)
        if at - now > max_wait_s:
            return None
        self._planned.append(at)
        while len(self._planned) > self.limit:
            self._planned.popleft()
        return at

    # -- the rule itself: exact

    def blocked_by(self, now: float) -> float | Request | None:
        """None: a request may leave now. Else the seconds still to wait, or an unanswered
        request whose answer decides it."""
        self._prune(now)
        older = len(self._requests) - (self.limit - 1)  # those N or more before a new one
        if older <= 0:
            return None
        last_end = 0.0
        for request in itertools.islice(self._requests, older):
            if request.end is None:
                if now < request.latest:
                    return request
                request.finish(request.latest)
            last_end = max(last_end, request.end or request.latest)
        wait = last_end + self.window_s - now
        return wait if wait > 0 else None

    def started(self, now: float, timeout_s: float) -> Request:
        """A request leaves now; it is answered within ``timeout_s`` or counted as if."""
        request = Request(now, now + timeout_s + UNANSWERED_SLACK_S)
        self._requests.append(request)
        return request

    def ended(self, request: Request, now: float, answered: bool) -> None:
        """``request`` is over: answered, or given up on (it may still arrive a bit later)."""
        if request.end is not None:
            return
        request.finish(now if answered else min(request.latest, now + UNANSWERED_SLACK_S))
        if answered:
            took = max(0.0, now - request.start)
            self.jitter_s = min(JITTER_CAP_S, max(JITTER_FLOOR_S, took,
                                                  self.jitter_s * JITTER_DECAY))

    def _prune(self, now: float) -> None:
        """Forget the oldest requests once answered more than a window ago: they can no
        longer hold anyone back (the newest ``limit - 1`` never do)."""
        requests = self._requests
        while requests:
            first = requests[0]
            if first.end is None and now >= first.latest:
                first.finish(first.latest)
            if first.end is None or first.end + self.window_s > now:
                return
            requests.popleft()


def _forget(times: deque[float], before: float) -> None:
    """Drop the instants at or before ``before`` (sorted deque): they no longer count, and a
    high limit must not keep that many timestamps per enterprise."""
    while times and times[0] <= before:
        times.popleft()
