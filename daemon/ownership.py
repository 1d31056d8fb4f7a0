"""Enterprise ownership: one live instance at a time serves an enterprise's deliveries.

A CRM limits requests per API key — per enterprise — whatever sends them. Each instance
counts only its own requests (``daemon.guards``), so the count is exact for the whole
deployment only when one instance at a time sends for an enterprise. That instance is its
**owner**: a lease in ``crm_owners`` (sql/005), in the database's time.

* **Taking.** The claim statement (``store.CLAIM``) takes a free enterprise — no live lease
  — in the same statement as its first deliveries. Free enterprises go to the live instance
  they hash to (rendezvous hashing over ``crm_instances``), so enterprises spread over the
  instances alive; when that one has not come for them within ``takeover_s``, any instance
  may.
* **Keeping.** ``run`` beats every third of ``ownership_s``: the instance is alive, and
  every enterprise it owns is its for ``ownership_s`` more. Locally, an enterprise is
  usable until the moment the statement that last renewed or took it was *sent* plus the
  lease: never later than the database's expiry. An instance that cannot renew (the
  database is down) stops sending for an enterprise as soon as its lease may have lapsed
  (``remaining``): the dispatcher starts an attempt only with an attempt's time plus a rate
  window of lease left, and checks again before each request.
* **Handing over.** When an enterprise now hashes to another live instance (one joined),
  the owner stops claiming and starting attempts for it, waits for its attempts in flight
  to end, and sets the lease to nobody for one rate window plus a margin (``QUIET_S``): the
  next owner's first requests cannot share a CRM window with this one's last. A graceful
  stop hands everything over at once (``retire``).
* **Dying.** A dead instance's leases run out after at most ``ownership_s``; the instances
  alive take its enterprises at their next claim. An instance restarted under the same
  ``CRM_BRIDGE_INSTANCE_ID`` (a systemd unit with a fixed id) finds its enterprises still
  its own and serves them at once — after one quiet window, since its previous process
  may have sent for them a moment before it died. Two live processes must never share an
  id (the default, host-pid, never does).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import asyncpg
import structlog

from daemon import db, store
from daemon.db import DatabaseHealth
from daemon.errors import Retryable
from daemon.metrics import Metrics
from daemon.ratewindow import WINDOW_S

log = structlog.get_logger(__name__)

# A handed-over enterprise stays free of any owner this long: one CRM rate window, and a
# margin for the last answers' way back.
QUIET_S = WINDOW_S + 0.5
# Before starting an attempt or a request, the lease must outlive it by this much (the
# request's own time is added by the caller): a lapse leaves a rate window of silence.
LAPSE_MARGIN_S = WINDOW_S + 0.25
BEATS_PER_LEASE = 3
RETRY_BEAT_S = 1.0  # after a failed heartbeat, or while a hand-over waits for attempts
DB_ERRORS = (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES)

Clock = Callable[[], float]


class OwnershipLapsed(Retryable):
    """This instance's lease on the enterprise may have lapsed (or is being handed over):
    the request was not sent. Reschedule without counting an attempt."""


class Ownership:
    """This instance's enterprises and their leases (see the module docstring).

    ``busy(enterprise)`` says whether the dispatcher still has deliveries of it in hand
    (claimed and not settled): a hand-over waits until it has none.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        integration: str,
        instance_id: str,
        metrics: Metrics,
        *,
        ownership_s: float,
        busy: Callable[[str], bool] = lambda _enterprise: False,
        health: DatabaseHealth | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._pool = pool
        self._integration = integration
        self.instance_id = instance_id
        self._metrics = metrics
        self.ownership_s = ownership_s
        self.busy = busy
        self._health = health or DatabaseHealth()
        self._clock = clock
        self._until: dict[str, float] = {}  # enterprise -> local deadline (monotonic)
        # A previous process of this instance id may have sent for these a moment ago.
        self._quiet_until: dict[str, float] = {}
        self._handing_over: set[str] = set()
        self._beats = 0
        self._renewal_failing = False

    # ------------------------------------------------------------------ asked per attempt

    def remaining(self, enterprise: str) -> float:
        """Seconds this instance may still send for ``enterprise`` (0: none)."""
        until = self._until.get(enterprise)
        return 0.0 if until is None else max(0.0, until - self._clock())

    def may_send(self, enterprise: str, duration_s: float) -> bool:
        """Whether something lasting ``duration_s`` fits in the lease with the lapse margin
        (and, for an enterprise inherited from this instance id's previous process, once a
        rate window has passed since start-up)."""
        quiet = self._quiet_until.get(enterprise)
        if quiet is not None:
            if self._clock() < quiet:
                return False
            del self._quiet_until[enterprise]
        return self.remaining(enterprise) >= duration_s + LAPSE_MARGIN_S

    def took(self, enterprise: str, lease_s: float, since: float) -> None:
        """A claim sent at ``since`` (monotonic) found ``enterprise`` ours for ``lease_s``
        more (taken or held). Ignored while it is being handed over."""
        if enterprise in self._handing_over:
            return
        until = since + lease_s
        if enterprise not in self._until:
            self._metrics.ownership_changes.labels("taken").inc()
        if until > self._until.get(enterprise, 0.0):
            self._until[enterprise] = until
        self._metrics.owned_enterprises.set(len(self._until))

    def excluded(self) -> list[str]:
        """Enterprises the claim must leave alone: those being handed over."""
        return sorted(self._handing_over)

    # ------------------------------------------------------------------ the heartbeat

    async def beat(self) -> None:
        """Renew (raises on a database failure), then hand over what hashes elsewhere and
        is idle."""
        sent = self._clock()
        renewed = await store.heartbeat(self._pool, self._integration, self.instance_id,
                                        self.ownership_s)
        self._beats += 1
        mine = {enterprise for enterprise, _preferred in renewed}
        if self._beats == 1:
            # Start-up, and this instance id already owns these: its previous process (a
            # restart under a fixed CRM_BRIDGE_INSTANCE_ID) may have sent for them within
            # the CRM's rate window. Ours begin a quiet window later.
            self._quiet_until = {e: sent + QUIET_S for e in mine}
        for enterprise in [e for e in self._until if e not in mine]:
            self._lost(enterprise)
        self._handing_over &= mine
        for enterprise, preferred in renewed:
            if enterprise in self._handing_over:
                continue
            if preferred not in (None, self.instance_id):
                self._handing_over.add(enterprise)  # stop sending at once
                self._until.pop(enterprise, None)
                continue
            self._until[enterprise] = sent + self.ownership_s
        idle = [e for e in self._handing_over if not self.busy(e)]
        if idle:
            await store.release_ownership(self._pool, self._integration, self.instance_id,
                                          idle, QUIET_S)
            self._handing_over.difference_update(idle)
            self._metrics.ownership_changes.labels("handed_over").inc(len(idle))
            log.info("enterprises_handed_over", count=len(idle))
        self._metrics.owned_enterprises.set(len(self._until))

    def _lost(self, enterprise: str) -> None:
        self._until.pop(enterprise, None)
        self._metrics.ownership_changes.labels("lost").inc()
        log.warning("ownership_lost", enterprise=enterprise)

    async def run(self, stopping: asyncio.Event) -> None:
        """Beat every ``ownership_s / BEATS_PER_LEASE`` until ``stopping`` (the first beat
        is start-up's); a failed beat is logged once and retried every ``RETRY_BEAT_S``
        (the leases lapse meanwhile, and sending stops with them)."""
        interval = self.ownership_s / BEATS_PER_LEASE  # the start-up beat has just run
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
            if stopping.is_set():
                return
            interval = self.ownership_s / BEATS_PER_LEASE
            try:
                await self.beat()
                self._health.succeeded()
                if self._renewal_failing:
                    self._renewal_failing = False
                    log.info("ownership_renewal_recovered")
                if self._handing_over:
                    interval = min(interval, RETRY_BEAT_S)
            except DB_ERRORS as exc:
                self._metrics.ownership_renewals_failed.inc()
                # The database being away is logged once, by the process's health.
                if not self._health.failed(exc, "ownership") and not self._renewal_failing:
                    log.warning("ownership_renewal_failed", error=type(exc).__name__)
                self._renewal_failing = True
                interval = min(interval, RETRY_BEAT_S)

    async def retire(self) -> None:
        """Hand every enterprise over and leave the live instances (a graceful stop, once
        nothing is in flight any more). A database failure only means the leases run out
        on their own."""
        self._until.clear()
        self._handing_over.clear()
        self._metrics.owned_enterprises.set(0)
        try:
            await store.retire_instance(self._pool, self._integration, self.instance_id,
                                        QUIET_S)
        except DB_ERRORS as exc:
            log.warning("ownership_retire_failed", error=type(exc).__name__)

    def stats(self) -> dict[str, object]:
        """Ownership state for ``/stats``."""
        return {
            "instance": self.instance_id,
            "lease_s": self.ownership_s,
            "owned": {e: round(self.remaining(e), 1) for e in sorted(self._until)},
            "handing_over": sorted(self._handing_over),
        }
