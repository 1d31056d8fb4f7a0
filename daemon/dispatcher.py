"""The dispatcher: claims due deliveries of this process's integration and runs them.

The loop (one per process):

1. **Wake** on the doorbell (``NOTIFY crm_events``), once more a doorbell window after
   each doorbell (the trigger rings at most once per ``crm_doorbell.window_ms``, so an event
   committed inside the window rang no bell), on the poll interval, at the earliest retry
   this process scheduled, when a slot frees up at full capacity, when the outcome writer
   has finished deliveries (the next event of their calls may be due now), or on stop.
   With ``notify`` off it simply polls (PgBouncer in transaction pooling cannot LISTEN).
2. **Claim** up to ``min(free capacity, CLAIM_BATCH)`` due deliveries in one statement
   (``store.CLAIM``: ``FOR UPDATE SKIP LOCKED``, per-call order, held enterprises skipped,
   only enterprises this instance owns or takes — ``daemon.ownership``), under a lease of
   ``lease_s``. An instance that dies loses its leases when they expire.
   The claim itself dead-letters a delivery whose lease expired without an outcome
   ``max_lease_expiries`` times (``poison``) or whose attempts are used up. A delivery
   whose lease has expired twice or more (a *suspect*: it may be what kills its holders)
   comes alone, and nothing else is claimed while it is in flight: if it crashes this
   process too, it takes nothing else down with it. Each claimed row's payload is decoded
   on its own: a row that cannot be read is dead-lettered at once as ``malformed``, and the
   rest of the batch goes on. The claim returns each delivery's call too (``daemon.claims``):
   an attempt reads it from the database again only when it starts long after its claim.
3. **Attempt** each one in its own task: guards first (breaker, per-enterprise slot, a
   lease and an ownership long enough to finish), then the adapter under a hard
   ``attempt_timeout_s``, with the steps earlier attempts did (``DeliveryContext``).
4. **Settle** by outcome or error class through ``retry.decide``; the ``OutcomeWriter``
   writes the outcomes, the steps done and log rows in batches, fenced by lease. A
   ``Deferred`` outcome puts the delivery back to pending for later without using up an
   attempt (a call's later deliveries stay behind it).

The database going away stops nothing for good: a failed claim is reported to the
process's ``DatabaseHealth`` and retried after a jittered pause; no claim is made while the
outcome writer cannot write (the leases it holds would expire and count against their
deliveries); a call's events that cannot be read again make the attempt ``Retryable``.

Graceful stop: no new claims; in-flight attempts get ``grace_s`` to finish; whatever is
left is cancelled and released (lease dropped, attempt not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from daemon import claims, db, logconfig, store
from daemon.cache import ConfigCache, Entry
from daemon.calls import StoredEvent
from daemon.claims import Claimed
from daemon.db import DatabaseHealth, UnreadableJson
from daemon.errors import DeliveryError, Retryable
from daemon.guards import Guards, LocalRateLimit, RequestGate
from daemon.integrations.base import (
    Adapter,
    Deferred,
    Delivered,
    DeliveryContext,
    Exchange,
    Outcome,
)
from daemon.logs import LogRow, OutcomeWriter, Settlement, attempt_row, mask, masked_exchange
from daemon.metrics import Metrics
from daemon.ownership import Ownership, OwnershipLapsed
from daemon.retry import Decision, Policy, decide

log = structlog.get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)

CLAIM_BATCH = 100
# The second look after a doorbell comes this long after the window: time for a writer
# that stayed silent inside the window to commit.
RECHECK_MARGIN_S = 0.005
# An attempt starts only if its lease outlives the attempt by this much.
LEASE_MARGIN_S = 1.0
# Within an attempt, a request waiting for the rate window may leave only this early.
REQUEST_START_SHARE = 0.5
STATS_INTERVAL_S = 5.0
# Wake-ups remembered for scheduled retries (beyond that, the poll finds them).
MAX_RETRY_WAKES = 10_000
# Deliveries given back because the database could not be read come due again after this.
UNAVAILABLE_RETRY_S = 1.0
# The error id of an attempt that failed because the database (not the CRM) was away.
DATABASE_UNAVAILABLE = "database_unavailable"


class Dispatcher:
    """See the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        adapter: Adapter,
        cache: ConfigCache,
        guards: Guards,
        writer: OutcomeWriter,
        metrics: Metrics,
        ownership: Ownership,
        *,
        instance_id: str,
        http: Any,
        policy: Policy,
        concurrency: int = 200,
        poll_interval_s: float = 1.0,
        attempt_timeout_s: float = 3.0,
        lease_s: float = 30.0,
        grace_s: float = 10.0,
        notify: bool = True,
        doorbell_window_s: float = 0.005,
        takeover_s: float = 5.0,
        max_lease_expiries: int = 3,
        health: DatabaseHealth | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._adapter = adapter
        self._cache = cache
        self._guards = guards
        self._writer = writer
        self._metrics = metrics
        self._ownership = ownership
        self._instance_id = instance_id
        self._http = http
        self._policy = policy
        self._concurrency = concurrency
        self._poll_interval_s = poll_interval_s
        self._attempt_timeout_s = attempt_timeout_s
        self._lease_s = lease_s
        self._grace_s = grace_s
        self._notify = notify
        self._recheck_after_s = doorbell_window_s + RECHECK_MARGIN_S
        self._takeover_s = takeover_s
        self._max_lease_expiries = max_lease_expiries
        self._health = health or DatabaseHealth()
        self._claim_failures = 0
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # run()'s
        self._recheck_at: float | None = None
        self._retries_at: list[float] = []  # a heap of monotonic times retries come due
        self._claim_no = itertools.count(1)
        self._inflight: dict[asyncio.Task[None], int] = {}  # task -> deliveries it carries
        self._inflight_count = 0
        self._in_hand: Counter[str] = Counter()  # enterprise -> deliveries claimed, unsettled
        self._suspects = 0  # suspect attempts in flight (see the module docstring)
        self.finished = asyncio.Event()
        self.claimed_total = 0
        writer.on_settled(self.wake)
        self._outcomes = {outcome: metrics.deliveries.labels(outcome)
                          for outcome in ("done", "skipped", "failed", "retried", "deferred")}
        self._rejected = {reason: metrics.deliveries_rejected.labels(reason)
                          for reason in ("malformed", "poison", "attempts")}

    # ------------------------------------------------------------------ waking

    def doorbell(self, _payload: str = "") -> None:
        """NOTIFY crm_events arrived: look now, and once more after the doorbell window."""
        self._recheck_at = time.monotonic() + self._recheck_after_s
        self._wake.set()

    def wake(self) -> None:
        """Look for due work now (catch-up after a reconnect, a replay...)."""
        self._wake.set()

    def _timeout(self) -> float:
        now = time.monotonic()
        deadline = now + self._poll_interval_s
        if self._recheck_at is not None:
            deadline = min(deadline, self._recheck_at)
        if self._retries_at:
            deadline = min(deadline, self._retries_at[0])
        return max(0.0, deadline - now)

    async def _sleep(self, stopping: asyncio.Event) -> None:
        timeout = self._timeout()
        if timeout > 0 and not self._wake.is_set():
            waiters = {asyncio.ensure_future(self._wake.wait()),
                       asyncio.ensure_future(stopping.wait())}
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        else:
            await asyncio.sleep(0)  # always yield: the loop must never spin without awaiting
        now = time.monotonic()
        if self._recheck_at is not None and self._recheck_at <= now:
            self._recheck_at = None
        while self._retries_at and self._retries_at[0] <= now:
            heapq.heappop(self._retries_at)

    # ------------------------------------------------------------------ the loop

    async def run(self, stopping: asyncio.Event) -> None:
        """Claim and attempt until ``stopping``; then drain and release (see module doc)."""
        # Every attempt task copies this context: its log lines name the integration.
        structlog.contextvars.bind_contextvars(integration=self._adapter.name)
        self._loop = asyncio.get_running_loop()
        try:
            while not stopping.is_set():
                free = self._concurrency - self._inflight_count
                if free <= 0 or self._suspects:
                    # Nothing to claim for, or a suspect runs alone: wait for capacity or
                    # its end (``_done`` wakes us), the stop, or a timer; a wake-up asked
                    # meanwhile is served when the loop may claim again.
                    self._wake.clear()
                    await self._sleep(stopping)
                    continue
                self._wake.clear()
                if self._writer.failing:
                    # Outcomes cannot be written: new claims would only add leases that
                    # expire unsettled. The writer's success wakes us (``on_settled``).
                    await self._health.pause(self._writer.failures, stopping)
                    continue
                asked = min(free, CLAIM_BATCH)
                claimed = await self._claim(asked)
                if claimed is None:
                    await self._health.pause(self._claim_failures, stopping)
                    continue
                for group in self._group(claimed):
                    self._start(group)
                if len(claimed) < asked:
                    await self._sleep(stopping)
        finally:
            await self._drain()
            self.finished.set()

    async def _claim(self, limit: int) -> list[Claimed] | None:
        """Claim up to ``limit`` deliveries; None when the claim itself failed."""
        held = (set(self._cache.held()) | set(self._guards.blocked())
                | set(self._ownership.excluded()))
        lease = f"{self._instance_id}:{next(self._claim_no)}"
        started = time.monotonic()
        try:
            rows = await store.claim(
                self._pool, self._adapter.name, limit, held, self._lease_s, lease,
                max_lease_expiries=self._max_lease_expiries,
                max_attempts=self._policy.max_attempts, instance=self._instance_id,
                ownership_s=self._ownership.ownership_s, takeover_s=self._takeover_s,
            )
        except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
            self._claim_failures += 1
            if not self._health.failed(exc, "dispatcher"):
                log.warning("claim_failed", error=type(exc).__name__)
            return None
        finally:
            self._metrics.claims.inc()
            self._metrics.claim_seconds.observe(time.monotonic() - started)
        self._claim_failures = 0
        self._health.succeeded()
        self.claimed_total += len(rows)
        claimed = []
        for row in rows:
            if row["reclaimed"]:
                self._metrics.leases_reclaimed.inc()
            if row["dead"] is not None:
                self._dead_lettered(row)
            elif (item := self._claimed(row, lease, started)) is not None:
                claimed.append(item)
        return claimed

    def _claimed(self, row: Mapping[str, Any], lease: str, started: float) -> Claimed | None:
        """The claimed row as a ``Claimed``; None when its payload cannot be read (it is
        dead-lettered as ``malformed`` at once: no attempt could ever map it)."""
        self._ownership.took(row["enterprise_number"], row["owner_s"], started)
        try:
            return claims.claimed(row, lease, started)
        except UnreadableJson as exc:
            self._malformed(row, lease, f"malformed: payload: {exc}")
            return None

    def _malformed(self, row: Mapping[str, Any], lease: str, reason: str) -> None:
        log_row = LogRow(
            enterprise=row["enterprise_number"], event_type=row["event_type"],
            request={"unique_id": row["unique_id"], "event_id": row["event_id"],
                     "attempt": row["attempts"], "requests": []},
            response=[], ok=False, error=reason,
        )
        self._settle(Settlement(row["event_id"], lease, "failed", last_error=reason,
                                log=log_row))
        self._rejected["malformed"].inc()
        self._outcomes["failed"].inc()
        log.warning("delivery_failed", enterprise=row["enterprise_number"],
                    unique_id=row["unique_id"], delivery_id=row["event_id"],
                    event_type=row["event_type"], attempt=row["attempts"], error=reason)

    def _dead_lettered(self, row: Mapping[str, Any]) -> None:
        """The claim dead-lettered this row itself (``store.CLAIM``: poison or attempts)."""
        self._rejected[row["dead"]].inc()
        self._outcomes["failed"].inc()
        log.warning("delivery_failed", enterprise=row["enterprise_number"],
                    unique_id=row["unique_id"], delivery_id=row["event_id"],
                    event_type=row["event_type"], attempt=row["attempts"],
                    error=row["last_error"])
        self._wake.set()  # the call's next delivery, if any, is due now

    def _group(self, claimed: list[Claimed]) -> list[list[Claimed]]:
        """One group per attempt: alone, or with others of the same enterprise and batch key
        (the claim holds at most one delivery per call, so batching keeps per-call order)."""
        groups: list[list[Claimed]] = []
        open_groups: dict[tuple[str, str], list[Claimed]] = {}
        for item in claimed:
            key = self._batch_key(item)
            if key is None or self._adapter.max_batch <= 1:
                groups.append([item])
                continue
            group = open_groups.get((item.enterprise, key))
            if group is None or len(group) >= self._adapter.max_batch:
                group = open_groups[(item.enterprise, key)] = []
                groups.append(group)
            group.append(item)
        return groups

    def _batch_key(self, item: Claimed) -> str | None:
        entry = self._cache.get(item.enterprise)
        if entry is None or entry.config is None:
            return None
        try:
            return self._adapter.batch_key(item.event, entry.config, item.steps_done)
        except Exception:  # an adapter bug must not stop the loop: that row goes alone
            self._metrics.bug_errors.inc()
            log.exception("adapter_bug", event_type=item.event.event_type, where="batch_key")
            return None

    def _start(self, group: list[Claimed]) -> None:
        # The loop's own create_task: asyncio.create_task asks for the running loop, a
        # getpid() system call on Python 3.11, once per attempt.
        assert self._loop is not None  # run() is running
        task = self._loop.create_task(self._attempt(group), name=f"delivery-{group[0].event.id}")
        self._inflight[task] = len(group)
        self._inflight_count += len(group)
        self._in_hand[group[0].enterprise] += len(group)
        self._metrics.inflight.set(self._inflight_count)
        task.add_done_callback(lambda done: self._done(done, group[0].enterprise))
        if any(item.suspect for item in group):
            self._suspects += 1
            task.add_done_callback(self._suspect_done)

    def _done(self, task: asyncio.Task[None], enterprise: str) -> None:
        was_full = self._inflight_count >= self._concurrency
        count = self._inflight.pop(task, 0)
        self._inflight_count -= count
        self._in_hand[enterprise] -= count
        if self._in_hand[enterprise] <= 0:
            del self._in_hand[enterprise]
        self._metrics.inflight.set(self._inflight_count)
        if was_full:
            self._wake.set()  # capacity came back

    def busy(self, enterprise: str) -> bool:
        """Whether deliveries of ``enterprise`` are claimed and not yet settled here."""
        return enterprise in self._in_hand

    def _suspect_done(self, _task: asyncio.Task[None]) -> None:
        self._suspects -= 1
        self._wake.set()  # claims may resume

    async def _drain(self) -> None:
        if self._inflight:
            _done, pending = await asyncio.wait(list(self._inflight), timeout=self._grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
                log.warning("attempts_cancelled_at_stop", count=len(pending))

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, group: list[Claimed]) -> None:
        # The task runs in its own copy of the context: what is bound here is gone with it.
        first = group[0]
        if len(group) == 1:
            structlog.contextvars.bind_contextvars(
                enterprise=first.enterprise, unique_id=first.event.unique_id,
                delivery_id=first.event.id,
            )
        else:
            structlog.contextvars.bind_contextvars(enterprise=first.enterprise, batch=len(group))
        try:
            await self._attempt_guarded(group)
        except asyncio.CancelledError:
            self._release(group, "stopped before the attempt finished")
            raise
        except Exception as exc:
            # Outside the adapter (which has its own classification): the database, or a
            # bug of ours. Either way the deliveries are settled now, not left to their
            # leases — a bug is counted as an attempt, so the attempts cap ends it.
            if self._health.failed(exc, "dispatcher"):
                self._release(group, "database unavailable", delay_s=UNAVAILABLE_RETRY_S)
                return
            self._metrics.bug_errors.inc()
            log.exception("attempt_bug", event_type=first.event.event_type)
            delay = self._policy.base_delay_s * self._rng.uniform(1.0, 2.0)
            self._schedule_wake(delay)
            for item in group:
                self._settle(Settlement(item.event.id, item.lease, "pending", delay_s=delay,
                                        last_error=f"bug: {type(exc).__name__}"))

    async def _attempt_guarded(self, group: list[Claimed]) -> None:
        enterprise = group[0].enterprise
        entry = await self._entry(enterprise)
        if entry is None or not entry.serves or entry.config is None:
            reason = "integration not enabled for this enterprise"
            for item in group:
                self._settle(Settlement(item.event.id, item.lease, "skipped", last_error=reason))
            self._outcomes["skipped"].inc(len(group))
            return
        # Whatever this attempt logs, its enterprise's secrets never show (its own task).
        logconfig.hide(entry.config.secrets())
        if entry.held is not None:
            self._release(group, f"held: {entry.held}")
            return
        async with self._guards.slot(enterprise):
            deadline = min(item.lease_deadline for item in group)
            if deadline - time.monotonic() < self._attempt_timeout_s + LEASE_MARGIN_S:
                self._release(group, "lease too short to start")
                return
            if not self._ownership.may_send(enterprise, self._attempt_timeout_s):
                self._release(group, "not (or no longer surely) this instance's enterprise")
                return
            # Asked only once a slot is ours: the breaker may have opened while we queued.
            wait = self._guards.admit(enterprise)
            if wait is not None:
                self._release(group, "circuit breaker open", delay_s=wait)
                return
            await self._run_adapter(group, entry)

    async def _entry(self, enterprise: str) -> Entry | None:
        entry = self._cache.get(enterprise)
        if entry is not None:
            return entry
        return await self._cache.fetch(enterprise)

    def _context(self, item: Claimed, entry: Entry, gate: RequestGate,
                 keep: Callable[[Exchange], Exchange]) -> DeliveryContext:
        assert entry.config is not None
        return DeliveryContext(
            enterprise=item.enterprise, config=entry.config, event=item.event,
            attempt=item.attempt, http=self._http, timeout_s=self._attempt_timeout_s,
            gate=self._owned_gate(item.enterprise, gate),
            load_call=lambda: self._load_call(item),
            steps_done=item.steps_done, progress=item.progress, stored_s=item.stored_s,
            claimed_at=item.claimed_at, on_exchange=gate.ended, keep=keep,
        )

    def _owned_gate(self, enterprise: str, gate: RequestGate) -> Callable[[str], Awaitable[None]]:
        """``gate``, refusing any request the enterprise's ownership might not outlive."""

        async def before_request(path: str) -> None:
            if not self._ownership.may_send(enterprise, self._attempt_timeout_s):
                raise OwnershipLapsed("this instance's ownership of the enterprise may lapse "
                                      "before the request ends: not sent",
                                      error_id="ownership_lapsed")
            await gate(path)

        return before_request

    async def _run_adapter(self, group: list[Claimed], entry: Entry) -> None:
        # A request must leave in the first half of the attempt: one begun later could be
        # cut by the attempt's timeout after the CRM took it (and be sent again).
        gate = self._guards.gate(
            group[0].enterprise, self._adapter.rate_class, self._attempt_timeout_s,
            latest_start=time.monotonic() + self._attempt_timeout_s * REQUEST_START_SHARE)
        # Every exchange is masked once, as it is recorded (daemon/logs.py).
        keep = functools.partial(masked_exchange, secrets=_secrets(entry))
        ctxs = [self._context(item, entry, gate, keep) for item in group]
        started = time.monotonic()
        results: Sequence[Outcome | BaseException]
        try:
            # asyncio.timeout, not wait_for: no second task per attempt on Python 3.11.
            async with asyncio.timeout(self._attempt_timeout_s):
                if len(ctxs) == 1:
                    results = [await self._adapter.deliver(ctxs[0])]
                else:
                    results = await self._adapter.deliver_batch(ctxs)
        except TimeoutError:
            results = [Retryable(f"attempt timed out after {self._attempt_timeout_s:g} s",
                                 error_id="timeout")] * len(ctxs)
        except DeliveryError as exc:
            results = [exc] * len(ctxs)
        except Exception as exc:
            if self._health.failed(exc, "attempt"):
                # The database (its call's events, the enterprise's numbers...), not the
                # adapter: retried like any outage, never counted as a bug.
                results = [_database_unavailable(exc)] * len(ctxs)
            else:  # anything else escaping an adapter is a bug
                self._metrics.bug_errors.inc()
                log.exception("adapter_bug", event_type=group[0].event.event_type)
                results = [exc] * len(ctxs)
        finally:
            gate.close()  # a request cut by the timeout or a stop still counts a while
        elapsed = time.monotonic() - started
        self._metrics.attempt_seconds.observe(elapsed)
        for item, ctx, result in zip(group, ctxs, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(item, entry, ctx, result, elapsed)
            else:
                self._succeeded(item, entry, ctx, result, elapsed)

    async def _load_call(self, item: Claimed) -> Sequence[StoredEvent]:
        """Every readable stored event of the item's call: as the claim returned it, or
        read again when the attempt started long after its claim (``daemon.claims``). A
        row that cannot be decoded is left out (its own delivery, if it has one, fails as
        ``malformed``); the database being away raises ``Retryable`` — an outage, not a
        bug of the adapter."""
        events = claims.call_of(item)
        if events is not None:
            return events
        try:
            return await claims.load_call(self._pool, item)
        except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
            if not self._health.failed(exc, "attempt"):
                raise
            raise _database_unavailable(exc) from None

    def _succeeded(self, item: Claimed, entry: Entry, ctx: DeliveryContext,
                   outcome: Outcome, elapsed: float) -> None:
        self._guards.succeeded(item.enterprise)
        # A skip or a deferral that sent nothing leaves no log row: its reason is on the
        # delivery (a skip's) or nowhere worth a row (a deferral's).
        said = outcome.detail if isinstance(outcome, Delivered) else outcome.reason
        row = self._log_row(item, entry, ctx, ok=True, error=None, detail=said) if (
            isinstance(outcome, Delivered) or ctx.exchanges) else None
        if isinstance(outcome, Deferred):
            self._schedule_wake(outcome.delay_s)
            self._settle(Settlement(item.event.id, item.lease, "pending", attempts_delta=-1,
                                    delay_s=max(0.0, outcome.delay_s), log=row,
                                    steps=item.steps()))
            self._outcomes["deferred"].inc()
            return
        delivered = isinstance(outcome, Delivered)
        status = "done" if delivered else "skipped"
        detail = mask(said, _secrets(entry))
        self._settle(Settlement(item.event.id, item.lease, status,
                                last_error=None if delivered else detail, log=row,
                                steps=item.steps()))
        self._outcomes[status].inc()
        # One line per success would cost more than the delivery itself at full speed; the
        # attempt is in integration_logs and the metrics. Failures are logged at info.
        if _stdlib_log.isEnabledFor(logging.DEBUG):
            log.debug("delivery_done" if delivered else "delivery_skipped",
                      event_type=item.event.event_type, attempt=item.attempt,
                      duration_ms=round(elapsed * 1000, 1), detail=detail)

    def _failed(self, item: Claimed, entry: Entry, ctx: DeliveryContext,
                error: BaseException, elapsed: float) -> None:
        if isinstance(error, LocalRateLimit | OwnershipLapsed):
            self._not_sent(item, entry, ctx, error)
            return
        streak = 1
        if error_id(error) == DATABASE_UNAVAILABLE:
            pass  # not the CRM's doing: its breaker stays as it is
        elif isinstance(error, Retryable) and error.rate_limited:
            streak = self._guards.rate_limited(item.enterprise)
        elif isinstance(error, Retryable):
            self._guards.failed(item.enterprise)
        elif isinstance(error, DeliveryError):
            self._guards.succeeded(item.enterprise)  # a definite answer: the CRM is up
        age_s = (datetime.now(UTC) - item.queued_at).total_seconds()
        decision = decide(error, item.attempt, age_s, self._policy, self._rng,
                          rate_limited_streak=streak)
        if decision.action == "retry" and not decision.counted:
            # The CRM said "slow down" to this key: none of its deliveries goes before this
            # one's backoff (and Retry-After) has passed.
            self._guards.throttle(item.enterprise, decision.delay_s)
        # A CRM may echo a credential in its error: the reason is masked before it is
        # stored, logged or shown anywhere.
        reason = mask(decision.reason, _secrets(entry))
        decision = dataclasses.replace(decision, reason=reason)
        row = self._log_row(item, entry, ctx, ok=False, error=reason)
        self._settle(self._settlement(item, decision, row))
        outcome = "failed" if decision.action == "fail" else "retried"
        self._outcomes[outcome].inc()
        log.info(f"delivery_{outcome}", event_type=item.event.event_type,
                 attempt=item.attempt, duration_ms=round(elapsed * 1000, 1),
                 error=reason, retry_in_s=round(decision.delay_s, 2)
                 if decision.action == "retry" else None)

    def _not_sent(self, item: Claimed, entry: Entry, ctx: DeliveryContext,
                  error: LocalRateLimit | OwnershipLapsed) -> None:
        """One of our own guards stopped a request before it left: not an attempt at all.
        Requests the attempt did send before are logged, and their steps kept."""
        delay_s = error.retry_after
        if isinstance(error, LocalRateLimit):
            self._guards.throttle(item.enterprise, error.retry_after or 1.0)
        if not ctx.exchanges:
            self._release([item], error.error_id, delay_s=delay_s)
            return
        self._metrics.retries.labels("guard").inc()
        self._schedule_wake(delay_s or 0.0)
        row = self._log_row(item, entry, ctx, ok=False, error=mask(str(error), _secrets(entry)))
        self._settle(Settlement(item.event.id, item.lease, "pending", attempts_delta=-1,
                                delay_s=delay_s, log=row, steps=item.steps()))

    def _settlement(self, item: Claimed, decision: Decision, row: LogRow) -> Settlement:
        if decision.action == "fail":
            hold = (item.enterprise, "auth_failed", decision.reason) if decision.hold else None
            if hold:
                log.warning("enterprise_needs_attention", reason=decision.reason)
            return Settlement(item.event.id, item.lease, "failed", last_error=decision.reason,
                              log=row, hold=hold, steps=item.steps())
        self._metrics.retries.labels("rate_limited" if not decision.counted else "error").inc()
        self._schedule_wake(decision.delay_s)
        return Settlement(
            item.event.id, item.lease, "pending", attempts_delta=0 if decision.counted else -1,
            delay_s=decision.delay_s, last_error=decision.reason, log=row, steps=item.steps(),
        )

    def _release(self, group: list[Claimed], reason: str, delay_s: float | None = None) -> None:
        """Give deliveries back without counting an attempt (a guard said "not now"); steps
        an interrupted attempt finished are kept."""
        self._metrics.retries.labels("guard").inc(len(group))
        if delay_s is not None:
            self._schedule_wake(delay_s)
        for item in group:
            self._settle(Settlement(item.event.id, item.lease, "pending", attempts_delta=-1,
                                    delay_s=delay_s, last_error=None, steps=item.steps()))
        log.debug("delivery_released", reason=reason, count=len(group))

    def _schedule_wake(self, delay_s: float) -> None:
        if len(self._retries_at) < MAX_RETRY_WAKES:
            heapq.heappush(self._retries_at, time.monotonic() + delay_s)

    def _settle(self, settlement: Settlement) -> None:
        self._writer.put(settlement)

    def _log_row(self, item: Claimed, entry: Entry, ctx: DeliveryContext, *,
                 ok: bool, error: str | None, detail: str = "") -> LogRow:
        return attempt_row(item.enterprise, item.event, item.attempt, ctx.exchanges,
                           ctx.progress, _secrets(entry), ok=ok, error=error, detail=detail)

    # ------------------------------------------------------------------ observation


    async def run_stats(self, stopping: asyncio.Event) -> None:
        """Refresh the queue gauges every ``STATS_INTERVAL_S`` (one cheap query)."""
        while not stopping.is_set():
            try:
                row = await self._pool.fetchrow(store.QUEUE_STATS, self._adapter.name)
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                if not self._health.failed(exc, "queue-stats"):
                    log.warning("queue_stats_failed", error=type(exc).__name__)
            else:
                self._health.succeeded()
                if row is not None:
                    self._metrics.queue_depth.set(row["pending"])
                    self._metrics.oldest_due_seconds.set(row["oldest_due_s"])
                    self._metrics.failed_total.set(row["failed"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), STATS_INTERVAL_S)

    def stats(self) -> dict[str, object]:
        """Dispatcher state for ``/stats``."""
        return {
            "in_flight": self._inflight_count, "concurrency": self._concurrency,
            "claimed_total": self.claimed_total, "notify": self._notify,
            "poll_interval_s": self._poll_interval_s, "fenced_outcomes": self._writer.fenced,
            "ownership": self._ownership.stats(),
        }


def _secrets(entry: Entry) -> tuple[str, ...]:
    return entry.config.secrets() if entry.config is not None else ()


def _database_unavailable(exc: BaseException) -> Retryable:
    return Retryable(f"the database was unavailable ({type(exc).__name__})",
                     error_id=DATABASE_UNAVAILABLE)


def error_id(error: BaseException) -> str | None:
    """The stable error id of a delivery error (None for anything else)."""
    return error.error_id if isinstance(error, DeliveryError) else None
