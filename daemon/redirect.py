"""Smart redirect: which extension should ring first for an incoming call, within a deadline.

CRM-neutral. The PBX dialplan asks on every incoming call and a caller is waiting, so an
answer never takes longer than ``deadline_s`` (``CRM_BRIDGE_SMART_REDIRECT_DEADLINE_S``,
1.5 s by default): when the CRM is slower, the answer is "no match" (``reason``
``timeout``) at the deadline, and the look-up goes on in the background into the cache, so
the next call from that number is answered from memory.

An answer is built in three parts:

* **the CRM's look-up** (``Adapter.responsible_manager``: the customer and the manager
  responsible for the number), the only slow part. It is cached per enterprise and caller
  (the caller's digits): 5 minutes when a manager was named, 1 minute when nobody was, 5
  seconds when the CRM failed (so a CRM outage costs one request per number, not one per
  call). Concurrent calls from one number share one look-up.
* **the enterprise's directory**: its internal numbers and its managers' stored statuses,
  kept in memory with the sequence number of the config-cache entry they were read under
  and read again (one query) as soon as that entry is reloaded — which every change of the
  enterprise's configuration or of a status causes on every instance (``NOTIFY
  crm_config``).
* **the decision** (``Adapter.route``, pure), made on every call from the look-up, the
  enterprise's current configuration (its manager ↔ number map) and the directory. So a
  changed mapping or status counts from the next call on, without asking the CRM again;
  and an extension that is not one of the enterprise's internal numbers is never returned.

With ``redirect`` and ``from_ext``, a blind transfer from ``from_ext`` to the extension
found is asked of the PBX in the background (a tracked task; its outcome is logged and
leaves one ``integration_logs`` row, ``event_type`` ``smart_redirect``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import structlog

from daemon import phones, store
from daemon.auditlog import AuditLog, AuditRow
from daemon.cache import ConfigCache, Entry
from daemon.errors import DeliveryError
from daemon.integrations.base import Adapter, Responsible
from daemon.metrics import Metrics
from daemon.pbx import Pbx, PbxError, shown

log = structlog.get_logger(__name__)
_std_log = logging.getLogger(__name__)  # whether debug lines are on, without building one

POSITIVE_TTL_S: Final = 300.0
NEGATIVE_TTL_S: Final = 60.0
FAILURE_TTL_S: Final = 5.0
MAX_CACHED: Final = 50_000  # caller numbers remembered; the oldest go first past this
TRANSFER_EVENT: Final = "smart_redirect"
_EXTENSION: Final = re.compile(r"[0-9]{1,10}")

Clock = Callable[[], float]


class RedirectRefused(ValueError):
    """A request value is unusable (``field`` names it); nothing was asked of anyone."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Answer:
    """What the dialplan gets: the extension or why none (``reason``), who and from where.

    ``source`` is ``cache`` when the CRM's look-up came from memory, the integration's name
    (``retailcrm``) when it was made for this call, None when no look-up was used.
    """

    extension: str | None
    reason: str | None = None
    manager_id: str | None = None
    manager_name: str | None = None
    customer_name: str | None = None
    source: str | None = None
    redirect: str | None = None

    def body(self) -> dict[str, Any]:
        """The JSON answer (``redirect`` only when a transfer was asked for)."""
        body: dict[str, Any] = {
            "extension": self.extension, "manager_id": self.manager_id,
            "manager_name": self.manager_name, "customer_name": self.customer_name,
            "source": self.source, "reason": self.reason,
        }
        if self.redirect is not None:
            body["redirect"] = self.redirect
        return body


@dataclass(frozen=True, slots=True)
class _Found:
    """A finished look-up: what the CRM said, or the error id when it failed."""

    responsible: Responsible | None
    error: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Directory:
    seq: int  # of the config-cache entry it was read under
    generation: int  # of this enterprise's local changes (``forget``)
    numbers: frozenset[str]
    statuses: dict[str, str]


class SmartRedirect:
    """See the module docstring. One per process, held by the Runtime."""

    def __init__(self, cache: ConfigCache, adapter: Adapter, pool: asyncpg.Pool,
                 audit: AuditLog, pbx: Pbx, metrics: Metrics, *, deadline_s: float,
                 lookup_timeout_s: float, max_cached: int = MAX_CACHED,
                 clock: Clock = time.monotonic) -> None:
        self._cache = cache
        self._adapter = adapter
        self._pool = pool
        self._audit = audit
        self._pbx = pbx
        self._metrics = metrics
        self.deadline_s = deadline_s
        self.lookup_timeout_s = max(lookup_timeout_s, deadline_s)
        self._clock = clock
        self._max_cached = max_cached
        self._found: dict[tuple[str, str], _Found] = {}
        self._lookups: dict[tuple[str, str], asyncio.Task[_Found]] = {}
        self._abandoned: set[tuple[str, str]] = set()
        self._directories: dict[str, _Directory] = {}
        self._generations: dict[str, int] = {}
        self._directory_loads: dict[tuple[str, int, int], asyncio.Task[_Directory]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ answering

    def resolve(self, enterprise: str | None, token: str | None) -> Entry | None:
        """The cache entry of the enterprise named by number or by ``Token``; None: unknown;
        ``AmbiguousToken`` when the Token names several active enterprises."""
        if token:
            enterprise = self._cache.matrix.by_token(token)
        return self._cache.get(enterprise) if enterprise else None

    async def answer(self, entry: Entry, phone: str, *, from_ext: str | None = None,
                     redirect: bool = False, unique_id: str | None = None) -> Answer:
        """The routing answer for a call from ``phone`` (see the module docstring);
        ``RedirectRefused`` for an unusable ``from_ext``. Never takes longer than the
        deadline."""
        if from_ext is not None and not _EXTENSION.fullmatch(from_ext):
            raise RedirectRefused("from_ext", f"{shown(from_ext)!r} is not an internal number "
                                  "(digits only)")
        answer = self._from_memory(entry, phone, from_ext)
        if answer is None:  # something to read or to ask: the deadline applies
            answer = await self._within_deadline(self._route(entry, phone, from_ext))
        if redirect and from_ext is not None:
            if answer.extension is not None and answer.extension != from_ext:
                self._spawn(self._transfer(entry.enterprise, from_ext, answer.extension,
                                           unique_id))
                answer = _with_redirect(answer, "requested")
            else:
                answer = _with_redirect(answer, "not_needed")
        # One line per answer, at info when it says something new: a look-up made, a miss,
        # a transfer. A match from the cache is the bulk at full rate, and a line costs a
        # third of its answer's CPU: debug (the metrics count them).
        routine = answer.source == "cache" and answer.reason is None and not redirect
        if not routine or _std_log.isEnabledFor(logging.DEBUG):
            (log.debug if routine else log.info)(
                "smart_redirect", enterprise=entry.enterprise, unique_id=unique_id,
                extension=answer.extension, reason=answer.reason, source=answer.source)
        return answer

    async def customer(self, entry: Entry, phone: str) -> Answer:
        """The caller's name as the CRM knows it (the same cached look-up), within the
        deadline."""
        return await self._within_deadline(self._customer(entry, phone))

    async def _within_deadline(self, work: Coroutine[Any, Any, Answer]) -> Answer:
        try:
            async with asyncio.timeout(self.deadline_s):
                return await work
        except TimeoutError:
            return Answer(None, "timeout")

    def _from_memory(self, entry: Entry, phone: str, from_ext: str | None) -> Answer | None:
        """The answer when all it needs is in memory — the enterprise's directory read under
        its current entry, the caller's look-up cached — without a task or a timer (the
        bulk of the calls); None when something must be read or asked first."""
        if not entry.serves or entry.config is None:
            return Answer(None, "not_connected")
        directory = self._directories.get(entry.enterprise)
        if directory is None or (directory.seq, directory.generation) != (
                entry.seq, self._generations.get(entry.enterprise, 0)):
            return None
        _check_from(from_ext, directory)
        key = _caller_key(phone)
        if key is None:
            return Answer(None, "not_a_phone")
        found = self._found.get((entry.enterprise, key))
        if found is None or found.expires_at <= self._clock():
            return None
        self._metrics.routing_lookups.labels("hit").inc()
        return self._decide(entry, directory, found, "cache")

    async def _route(self, entry: Entry, phone: str, from_ext: str | None) -> Answer:
        if not entry.serves or entry.config is None:
            return Answer(None, "not_connected")
        directory = await self._directory(entry)
        _check_from(from_ext, directory)
        key = _caller_key(phone)
        if key is None:
            return Answer(None, "not_a_phone")
        found, source = await self._look_up(entry, key, phone)
        return self._decide(entry, directory, found, source)

    def _decide(self, entry: Entry, directory: _Directory, found: _Found,
                source: str) -> Answer:
        """The adapter's decision on ``found``, never an extension not the enterprise's."""
        if found.responsible is None:
            return Answer(None, "crm_unavailable", source=source)
        who = found.responsible
        assert entry.config is not None
        route = self._adapter.route(entry.config, who, directory.statuses)
        extension, reason = route.extension, route.reason
        if extension is not None and extension not in directory.numbers:
            log.warning("smart_redirect_foreign_extension", enterprise=entry.enterprise,
                        extension=shown(extension), manager_id=who.manager_id)
            extension, reason = None, "foreign_extension"
        return Answer(extension, reason, who.manager_id, who.manager_name, who.customer_name,
                      source)

    async def _customer(self, entry: Entry, phone: str) -> Answer:
        if not entry.serves or entry.config is None:
            return Answer(None, "not_connected")
        key = _caller_key(phone)
        if key is None:
            return Answer(None, "not_a_phone")
        found, source = await self._look_up(entry, key, phone)
        who = found.responsible
        if who is None:
            return Answer(None, "crm_unavailable", source=source)
        reason = None if who.customer_name else "no_customer"
        return Answer(None, reason, who.manager_id, who.manager_name, who.customer_name, source)

    # ------------------------------------------------------------------ the CRM's look-up

    async def _look_up(self, entry: Entry, key: str, phone: str) -> tuple[_Found, str]:
        cache_key = (entry.enterprise, key)
        found = self._found.get(cache_key)
        if found is not None and found.expires_at > self._clock():
            self._metrics.routing_lookups.labels("hit").inc()
            return found, "cache"
        task = self._lookups.get(cache_key)
        if task is None:
            self._metrics.routing_lookups.labels("miss").inc()
            task = asyncio.create_task(self._run_look_up(entry, cache_key, phone))
            self._lookups[cache_key] = task
            task.add_done_callback(lambda t: self._look_up_done(cache_key, t))
        else:
            self._metrics.routing_lookups.labels("joined").inc()
        try:
            return await asyncio.shield(task), self._adapter.name
        except asyncio.CancelledError:
            if not task.done():
                self._abandoned.add(cache_key)  # our deadline passed: it lands in the cache
            raise

    async def _run_look_up(self, entry: Entry, cache_key: tuple[str, str],
                           phone: str) -> _Found:
        assert entry.config is not None
        try:
            who = await self._adapter.responsible_manager(
                entry.enterprise, entry.config, phone, timeout_s=self.lookup_timeout_s)
        except DeliveryError as exc:
            log.warning("routing_lookup_failed", enterprise=entry.enterprise,
                        error=exc.error_id)
            found = _Found(None, exc.error_id, self._clock() + FAILURE_TTL_S)
        except Exception:  # a bug of the adapter: counted and logged, the call still routed
            self._metrics.bug_errors.inc()
            log.exception("routing_lookup_crashed", enterprise=entry.enterprise)
            found = _Found(None, "bug", self._clock() + FAILURE_TTL_S)
        else:
            ttl = POSITIVE_TTL_S if who.manager_id is not None else NEGATIVE_TTL_S
            found = _Found(who, None, self._clock() + ttl)
        self._remember(cache_key, found)
        return found

    def _remember(self, cache_key: tuple[str, str], found: _Found) -> None:
        if len(self._found) >= self._max_cached:
            now = self._clock()
            fresh = {k: v for k, v in self._found.items() if v.expires_at > now}
            if len(fresh) >= self._max_cached:  # still full: the oldest tenth go, at once
                fresh = dict(list(fresh.items())[self._max_cached // 10:])
            self._found = fresh
        self._found.pop(cache_key, None)
        self._found[cache_key] = found

    def _look_up_done(self, cache_key: tuple[str, str], task: asyncio.Task[_Found]) -> None:
        self._lookups.pop(cache_key, None)
        abandoned = cache_key in self._abandoned
        self._abandoned.discard(cache_key)
        if task.cancelled():
            return
        if abandoned:
            self._metrics.routing_lookups.labels("late").inc()
            log.info("routing_lookup_late", enterprise=cache_key[0])

    # ------------------------------------------------------------------ the directory

    def forget(self, enterprise: str) -> None:
        """``enterprise``'s statuses or numbers changed here: read them again on its next
        call (other instances learn of it through ``NOTIFY crm_config``)."""
        self._generations[enterprise] = self._generations.get(enterprise, 0) + 1
        self._directories.pop(enterprise, None)

    async def _directory(self, entry: Entry) -> _Directory:
        generation = self._generations.get(entry.enterprise, 0)
        known = self._directories.get(entry.enterprise)
        if known is not None and (known.seq, known.generation) == (entry.seq, generation):
            return known
        load_key = (entry.enterprise, entry.seq, generation)
        task = self._directory_loads.get(load_key)
        if task is None:
            task = asyncio.create_task(self._load_directory(entry, generation))
            self._directory_loads[load_key] = task
            task.add_done_callback(lambda _t: self._directory_loads.pop(load_key, None))
        return await asyncio.shield(task)

    async def _load_directory(self, entry: Entry, generation: int) -> _Directory:
        numbers, statuses = await store.routing_directory(self._pool, entry.enterprise,
                                                          self._adapter.name)
        directory = _Directory(entry.seq, generation, numbers, statuses)
        current = self._directories.get(entry.enterprise)
        fresh = generation == self._generations.get(entry.enterprise, 0)
        if fresh and (current is None or current.seq <= entry.seq):
            self._directories[entry.enterprise] = directory
        return directory

    # ------------------------------------------------------------------ transfers

    async def _transfer(self, enterprise: str, from_ext: str, to_ext: str,
                        unique_id: str | None) -> None:
        request = {"from_ext": from_ext, "to_ext": to_ext, "unique_id": unique_id}
        try:
            line = await self._pbx.line(enterprise)
            answer = await self._pbx.transfer(line, from_ext, to_ext)
        except PbxError as exc:
            log.warning("smart_redirect_transfer_failed", enterprise=enterprise,
                        unique_id=unique_id, error=exc.error_id)
            self._audit.put(AuditRow(enterprise, self._adapter.name, TRANSFER_EVENT, request,
                                     None, False, exc.message))
            return
        log.info("smart_redirect_transferred", enterprise=enterprise, unique_id=unique_id,
                 from_ext=from_ext, to_ext=to_ext)
        self._audit.put(AuditRow(enterprise, self._adapter.name, TRANSFER_EVENT, request,
                                 {"status": answer.status, "body": answer.body}, True, None))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("smart_redirect_task_crashed", exc_info=exc)

    async def close(self) -> None:
        """Cancel look-ups and transfers still running (teardown), waiting a little."""
        tasks = [*self._background, *self._lookups.values(), *self._directory_loads.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    def stats(self) -> dict[str, int]:
        """Sizes, for operators."""
        return {"cached_callers": len(self._found), "lookups_in_flight": len(self._lookups),
                "transfers_in_flight": len(self._background)}


def _check_from(from_ext: str | None, directory: _Directory) -> None:
    if from_ext is not None and from_ext not in directory.numbers:
        raise RedirectRefused("from_ext", f"{from_ext} is not an internal number of this "
                              "enterprise")


def _caller_key(phone: str) -> str | None:
    """The cache key of a caller: their digits; None for an anonymous or internal caller."""
    digits = phones.digits(phone)
    if not digits or phones.is_extension(digits) or len(digits) > 20:
        return None
    return digits


def _with_redirect(answer: Answer, redirect: str) -> Answer:
    return Answer(answer.extension, answer.reason, answer.manager_id, answer.manager_name,
                  answer.customer_name, answer.source, redirect)
