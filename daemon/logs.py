"""Each attempt's record: the delivery's new state and its ``integration_logs`` row, batched.

The dispatcher hands every settled attempt to ``OutcomeWriter.put`` (no await, no I/O on the
hot path). One background task writes whatever has accumulated — the state changes
(``UPDATE … FROM unnest(…)`` fenced by lease) and the log rows (``INSERT … SELECT unnest``)
in one statement, plus any new holds in the same transaction: a burst of thousands of
attempts is a handful of round trips. While one batch is being written the next
accumulates, so batches grow with load and an idle system writes at once.

``mask`` is applied to every request and response before it becomes a log row: values under
secret-looking keys are masked, and so is any occurrence of the enterprise's own secrets
(API key, callback secret) anywhere in a string — values and keys alike (a CRM may echo the
clientId back as an object key). It also makes every string storable: PostgreSQL's ``jsonb``
and ``text`` refuse ``\u0000`` and UTF-8 cannot carry a lone surrogate, so a CRM answer
holding either is kept with the character escaped rather than losing the whole batch.

An attempt's CRM exchanges are masked once each, when they are recorded
(``masked_exchange``, the ``DeliveryContext.keep`` of every attempt); ``attempt_row`` builds
the attempt's row from them, masking only what it adds — the same row as masking it whole,
at a fraction of the cost (an upload shared by a batch is masked once, not once per
delivery). An exchange that was not recorded that way is masked there.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from daemon import db, store
from daemon.calls import StoredEvent
from daemon.db import DatabaseHealth
from daemon.integrations.base import Exchange
from daemon.logconfig import MASK, is_secret_key, scrub_text
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

MAX_BATCH = 1000
MAX_TEXT = 4000  # a log row keeps at most this much of any one string


def mask(value: Any, secrets: Iterable[str] = (), depth: int = 0) -> Any:
    """``value`` with every secret masked (by key, by pattern and by the values given)."""
    if depth > 10:
        return MASK
    kind = type(value)
    if kind in _SCALARS:  # most leaves; an exact type test is far cheaper than isinstance
        return value
    if isinstance(value, str):
        value = scrub_text(_storable(_hide(value, secrets)))
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "…"
    known = secrets if type(secrets) is tuple else tuple(secrets)
    if kind is dict or isinstance(value, Mapping):
        return {
            _storable(_hide(str(k), known)):
                MASK if is_secret_key(k) and v not in (None, "") else mask(v, known, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask(v, known, depth + 1) for v in value]
    return value


_SCALARS = frozenset({int, float, bool, type(None)})


def _hide(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def _storable(text: str) -> str:
    """``text`` with what PostgreSQL cannot store escaped: NUL, lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True, slots=True)
class MaskedExchange(Exchange):
    """An exchange as an attempt's log row shows it: every string masked (``mask``)."""


# Where attempt_row places an exchange's request (request.requests[i].request) and its
# answer (response[i].body): mask() gives up below a depth, so each is masked at its own.
_REQUEST_DEPTH = 3
_RESPONSE_DEPTH = 2


def masked_exchange(exchange: Exchange, secrets: tuple[str, ...]) -> MaskedExchange:
    """``exchange`` masked once, as ``attempt_row`` places it (a copy: the client's objects
    may still be its caller's)."""
    return MaskedExchange(
        mask(exchange.method, secrets), mask(exchange.path, secrets),
        mask(exchange.request, secrets, _REQUEST_DEPTH), exchange.status,
        mask(exchange.response, secrets, _RESPONSE_DEPTH), exchange.duration_s,
    )


def attempt_row(enterprise: str, event: StoredEvent, attempt: int,
                exchanges: Iterable[Exchange], steps: Collection[str],
                secrets: tuple[str, ...], *, ok: bool, error: str | None,
                detail: str = "") -> LogRow:
    """The ``integration_logs`` row of one attempt of ``event``: its CRM ``exchanges``
    (masked when recorded; any other one masked here), the ``steps`` it finished, the
    outcome's ``detail``, every string masked with ``secrets``."""
    kept = [x if type(x) is MaskedExchange else masked_exchange(x, secrets)
            for x in exchanges]
    request: dict[str, Any] = {
        "unique_id": mask(event.unique_id, secrets), "event_id": event.id, "attempt": attempt,
        "requests": [{"method": x.method, "path": x.path, "request": x.request,
                      "status": x.status, "duration_ms": round(x.duration_s * 1000, 1)}
                     for x in kept],
    }
    if detail:
        request["outcome"] = mask(detail, secrets)
    if steps:
        request["steps_done"] = [mask(step, secrets) for step in sorted(steps)]
    response = [{"path": x.path, "status": x.status, "body": x.response} for x in kept]
    return LogRow(enterprise, event.event_type, request, response, ok, error)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One attempt's outcome, as the dispatcher decided it.

    ``status``: done | skipped | failed | pending (rescheduled). ``attempts_delta`` -1 undoes
    the attempt counted at claim time (an attempt not made, or one that must not count).
    ``delay_s`` None keeps ``next_attempt_at``. ``log`` is the integration_logs row, or
    None when nothing was attempted. ``hold`` puts a hold (reason, detail) on the enterprise.
    ``steps`` is every step of the delivery done so far, comma-joined (None keeps them).
    """

    event_id: int
    lease: str
    status: str
    attempts_delta: int = 0
    delay_s: float | None = None
    last_error: str | None = None
    log: LogRow | None = None
    hold: tuple[str, str, str] | None = None  # (enterprise, reason, detail)
    steps: str | None = None


@dataclass(frozen=True, slots=True)
class LogRow:
    """One ``integration_logs`` row (request/response already masked)."""

    enterprise: str
    event_type: str
    request: Any
    response: Any
    ok: bool
    error: str | None


class OutcomeWriter:
    """Writes settlements in batches (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, integration: str, metrics: Metrics, *,
                 health: DatabaseHealth | None = None) -> None:
        self._pool = pool
        self._integration = integration
        self._metrics = metrics
        self._health = health or DatabaseHealth()
        self.failures = 0  # consecutive failed writes of the current batch
        self._pending: list[Settlement] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_settled: list[Callable[[], None]] = []
        self._on_written: list[Callable[[list[int]], None]] = []
        self.fenced = 0

    def on_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after each batch that finished a delivery (done, skipped or
        failed) with a later delivery of the same call waiting: that one is due now, and
        the dispatcher should not wait for the poll to find out. Also after the first
        batch written once ``failing`` is over."""
        self._on_settled.append(callback)

    @property
    def failing(self) -> bool:
        """True while the last write failed and its batch waits to be written again."""
        return self.failures > 0

    def on_written(self, callback: Callable[[list[int]], None]) -> None:
        """Call ``callback`` with the event ids of every batch of deliveries settled (the
        admin pages' live journal shows their new state)."""
        self._on_written.append(callback)

    def put(self, settlement: Settlement) -> None:
        """Queue one settlement for the next batch (never blocks)."""
        self._pending.append(settlement)
        self._idle.clear()
        self._wake.set()

    async def flushed(self) -> None:
        """Wait until everything put so far is written."""
        await self._idle.wait()

    async def run(self, stopping: asyncio.Event) -> None:
        """Write batches until ``stopping`` is set and nothing is left."""
        while True:
            if not self._pending:
                self._idle.set()
                if stopping.is_set():
                    return
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                self._wake.clear()
                continue
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            await self._write_with_retry(batch, stopping)

    async def _write_with_retry(self, batch: list[Settlement], stopping: asyncio.Event) -> None:
        with_logs = True
        while True:
            try:
                await self._write(batch, with_logs=with_logs)
            except asyncpg.DataError as exc:
                # A row the database refuses is a bug of ours; settling the deliveries
                # matters more than their log rows, so they go without.
                log.error("log_rows_dropped", error=type(exc).__name__, detail=str(exc)[:200],
                          batch=len(batch))
                with_logs = False
                continue
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                # The leases keep the deliveries safe meanwhile; if they expire, the work is
                # redone (at least once). Never drop a batch while the process lives.
                self.failures += 1
                if not self._health.failed(exc, "outcome-writer"):
                    log.warning("outcomes_write_failed", error=type(exc).__name__,
                                batch=len(batch))
                if stopping.is_set() and self.failures > 5:
                    log.error("outcomes_abandoned", batch=len(batch))
                    self.failures = 0
                    return
                await asyncio.sleep(self._health.pause_s(self.failures))
                continue
            self._health.succeeded()
            if self.failures:
                self.failures = 0
                for callback in self._on_settled:
                    callback()
            return

    async def _write(self, batch: list[Settlement], *, with_logs: bool = True) -> None:
        rows = [s.log for s in batch if s.log is not None] if with_logs else []
        holds = {s.hold for s in batch if s.hold is not None}
        args = (
            store.SETTLE, self._integration,
            [s.event_id for s in batch], [s.lease for s in batch],
            [s.status for s in batch], [s.attempts_delta for s in batch],
            [s.delay_s for s in batch], [s.last_error for s in batch],
            [r.enterprise for r in rows], [r.event_type for r in rows],
            [_json(r.request) for r in rows], [_json(r.response) for r in rows],
            ["success" if r.ok else "error" for r in rows], [r.error for r in rows],
            [s.steps for s in batch],
        )
        if not holds:  # the usual batch: one statement, one round trip
            settled = await self._pool.fetch(*args)
        else:
            async with self._pool.acquire() as conn, conn.transaction():
                settled = await conn.fetch(*args)
                for enterprise, reason, detail in sorted(holds):
                    await conn.execute(store.PUT_HOLD, enterprise, self._integration, reason,
                                       detail)
        if any(row["unblocks"] for row in settled):
            for callback in self._on_settled:
                callback()
        if self._on_written and settled:
            ids = [row["event_id"] for row in settled]
            for written in self._on_written:
                written(ids)
        fenced = len(batch) - len(settled)
        if fenced:
            self.fenced += fenced
            self._metrics.acks_lost.inc(fenced)
            log.warning("outcomes_fenced", count=fenced)
        self._metrics.log_rows.inc(len(rows))
        self._metrics.log_flushes.inc()


# Built once: json.dumps with options builds a new encoder on every call. (An encoder keeps
# no state between calls: a constant.)
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
