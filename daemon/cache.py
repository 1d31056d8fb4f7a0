"""ConfigCache and EnablementMatrix: every enterprise's configuration, in memory, always fresh.

Readers (the dispatcher, the ingest API, callbacks) call ``ConfigCache.get`` — a plain dict
lookup: no lock, no await. Entries are replaced whole (frozen values, atomic swaps), so a
reader never sees half an update. Freshness comes from four sources:

* ``NOTIFY crm_config`` → ``invalidate(enterprise)`` reloads that enterprise. Loads are
  single-flight per enterprise: however many notifications and readers arrive, one load
  runs; a notification that arrives during it marks the entry dirty and causes exactly one
  more (the running load may have read the row before the change committed);
* every (re)connect of the listener → ``catch_up`` (notifications sent meanwhile are lost):
  a full refresh, unless one that began after LISTEN has completed (the startup load);
* a periodic full refresh (``refresh_s`` ± 20 % jitter) swaps the whole map at once;
* a per-entry TTL (``ttl_s`` × 2/3…4/3): an expired entry is still served while it is
  reloaded in the background (stale-while-revalidate).

A full refresh reads the enterprises a page at a time (``PAGE``, keyset by number): one
page's decoded rows live at a time, and the event loop runs between pages. Readers see the
old map until the new one is complete. It never overwrites an entry loaded after the refresh
began (each load is stamped with a sequence number taken before its first query).

An enterprise whose configuration of this integration fails validation — or cannot even
be read (nested too deeply, a number too long: it is decoded row by row, see daemon/db.py)
— is kept with ``invalid`` set: its integration counts as disabled, its deliveries wait (it
is "held"), and the reason is logged once and shown in ``/stats``. One enterprise's
configuration never fails a load, a full refresh or start-up.

The ``EnablementMatrix`` resolves an event's ``Token`` by the rule of docs/events.md: the
enterprise whose ``name2`` it is, else whose ``secret`` it is, else whose number it is,
among active enterprises; more than one at the first level that matches is
``AmbiguousToken``. Its indexes are multi-maps, so an enterprise that goes away, is
deactivated or changes its Token un-shadows the others at once, without a full refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import asyncpg
import structlog

from daemon import db, store
from daemon.crypto import Crypto
from daemon.db import DatabaseHealth, UnreadableJson, decode_json
from daemon.errors import ConfigError
from daemon.integrations.base import Adapter, IntegrationConfig
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

HOLD_REASONS = frozenset({"invalid_config", "auth_failed", "deactivated"})
PAGE = 1_000  # enterprises per query of a full refresh
NO_HOLDS: Mapping[str, str] = MappingProxyType({})  # shared by every entry without holds


@dataclass(frozen=True, slots=True)
class Entry:
    """One enterprise as this process sees it (replaced whole, never mutated)."""

    enterprise: str
    token: str | None  # name2
    secret_fp: str | None  # the keyed fingerprint of the platform's ``secret`` (never it)
    active: bool
    enabled_types: frozenset[str]
    config: IntegrationConfig | None
    invalid: str | None
    holds: Mapping[str, str]
    seq: int
    expires_at: float = field(compare=False)

    @property
    def held(self) -> str | None:
        """Why this enterprise's deliveries must wait now, or None."""
        if self.invalid is not None:
            return "invalid_config"
        if self.holds:
            return sorted(self.holds)[0]
        return None

    @property
    def serves(self) -> bool:
        """True when this process's integration is enabled and valid here."""
        return self.active and self.config is not None and self.config.enabled


class AmbiguousToken(LookupError):
    """A Token names more than one active enterprise at the first level that matches
    (``level``: name2 or secret); nothing may be stored for it."""

    def __init__(self, level: str, enterprises: Sequence[str]) -> None:
        self.level = level
        self.enterprises = tuple(sorted(enterprises))
        super().__init__(f"the Token is the {level} of {len(self.enterprises)} active "
                         f"enterprises ({', '.join(self.enterprises)})")


class EnablementMatrix:
    """Enterprise → enabled integration types, and the reverse lookups of the hot paths.

    ``Token`` → enterprise for events (``by_token``, the rule of the module docstring), and
    the callback secret's keyed fingerprint → enterprise for CRM callbacks. Secrets are
    indexed by their keyed fingerprint only, never as text.
    """

    def __init__(self, crypto: Crypto) -> None:
        self._crypto = crypto
        self._types: dict[str, frozenset[str]] = {}
        self._active: set[str] = set()
        self._name2: dict[str, set[str]] = {}
        self._platform_secrets: dict[str, set[str]] = {}  # fingerprint -> enterprises
        self._secrets: dict[str, str] = {}  # callback secret fingerprint -> enterprise
        self.ambiguous_count = 0  # keys of _name2 and _platform_secrets naming several

    def _callback_key(self, entry: Entry) -> str | None:
        secret = entry.config.callback_secret if entry.config is not None else None
        return self._crypto.fingerprint(secret) if secret else None

    def put(self, old: Entry | None, new: Entry | None) -> None:
        """Replace ``old``'s lookups with ``new``'s (either may be None)."""
        if old is not None:
            self._types.pop(old.enterprise, None)
            if old.active:
                self._active.discard(old.enterprise)
                self._drop(self._name2, old.token, old.enterprise)
                self._drop(self._platform_secrets, old.secret_fp, old.enterprise)
            secret = self._callback_key(old)
            if secret and self._secrets.get(secret) == old.enterprise:
                del self._secrets[secret]
        if new is not None:
            self._types[new.enterprise] = new.enabled_types if new.active else frozenset()
            if new.active:
                self._active.add(new.enterprise)
                self._add(self._name2, new.token, new.enterprise)
                self._add(self._platform_secrets, new.secret_fp, new.enterprise)
            secret = self._callback_key(new)
            if secret:
                self._secrets[secret] = new.enterprise

    def _add(self, index: dict[str, set[str]], key: str | None, enterprise: str) -> None:
        if not key:
            return
        holders = index.setdefault(key, set())
        holders.add(enterprise)
        if len(holders) == 2:
            self.ambiguous_count += 1

    def _drop(self, index: dict[str, set[str]], key: str | None, enterprise: str) -> None:
        if not key:
            return
        holders = index.get(key)
        if holders is None or enterprise not in holders:
            return
        holders.discard(enterprise)
        if len(holders) == 1:
            self.ambiguous_count -= 1
        elif not holders:
            del index[key]

    def rebuild(self, entries: Iterable[Entry]) -> None:
        """Start over from ``entries`` (after a full refresh)."""
        self._types, self._active, self._secrets = {}, set(), {}
        self._name2, self._platform_secrets, self.ambiguous_count = {}, {}, 0
        for entry in entries:
            self.put(None, entry)

    def enabled(self, enterprise: str) -> frozenset[str] | None:
        """The enabled integration types (None: unknown enterprise)."""
        return self._types.get(enterprise)

    def by_token(self, token: str) -> str | None:
        """The active enterprise ``token`` names: by ``name2``, else by ``secret``, else by
        number. None: no active enterprise; ``AmbiguousToken``: several at the first level
        that matches."""
        if not token:
            return None
        level, found = "name2", self._name2.get(token)
        if not found:
            level, found = "secret", self._platform_secrets.get(self._crypto.fingerprint(token))
        if not found:
            return token if token in self._active else None
        if len(found) > 1:
            raise AmbiguousToken(level, list(found))
        return next(iter(found))

    def ambiguous(self) -> dict[str, list[list[str]]]:
        """Every ambiguous Token's enterprises, by level (for ``/stats``; the Tokens
        themselves are not given: a secret-level one is a secret)."""
        return {
            level: sorted(sorted(holders) for holders in index.values() if len(holders) > 1)
            for level, index in (("name2", self._name2), ("secret", self._platform_secrets))
        }

    def by_secret(self, secret: str) -> str | None:
        """The enterprise whose callback secret is ``secret``."""
        return self._secrets.get(self._crypto.fingerprint(secret))


class ConfigCache:
    """See the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        adapter: Adapter,
        crypto: Crypto,
        metrics: Metrics,
        *,
        ttl_s: float = 90.0,
        refresh_s: float = 240.0,
        health: DatabaseHealth | None = None,
    ) -> None:
        self._pool = pool
        self._adapter = adapter
        self._crypto = crypto
        self._metrics = metrics
        self._health = health or DatabaseHealth()
        # Jitter from an instance of our own: the random module's global state is shared with
        # whatever else runs in the process (a test's hypothesis draws it, for one).
        self._rng = random.Random()
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.matrix = EnablementMatrix(crypto)
        self._entries: dict[str, Entry] = {}
        self._held: dict[str, str] = {}
        self._loads: dict[str, asyncio.Task[Entry | None]] = {}
        self._dirty: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._seq = itertools.count(1)
        self._type_sets: dict[frozenset[str], frozenset[str]] = {}
        self._refreshed_from = -math.inf  # monotonic start of the newest completed refresh
        self.loaded = asyncio.Event()
        self.last_full_refresh_at: float | None = None

    # ------------------------------------------------------------------ reading

    def get(self, enterprise: str) -> Entry | None:
        """The cached entry (maybe stale: then a background reload starts). Never awaits."""
        entry = self._entries.get(enterprise)
        if entry is None:
            self._metrics.cache_misses.inc()
            return None
        self._metrics.cache_hits.inc()
        if entry.expires_at <= time.monotonic() and enterprise not in self._loads:
            self._spawn(self.load(enterprise, "ttl"))
        return entry

    async def fetch(self, enterprise: str) -> Entry | None:
        """The entry, loading it (single-flight) on a miss. None: no such enterprise."""
        entry = self.get(enterprise)
        if entry is not None:
            return entry
        return await self.load(enterprise, "miss")

    def held(self) -> dict[str, str]:
        """Enterprises whose deliveries must wait, with the reason (a copy)."""
        return dict(self._held)

    def entries(self) -> list[Entry]:
        """Every cached entry (a snapshot list)."""
        return list(self._entries.values())

    # ------------------------------------------------------------------ loading

    def invalidate(self, enterprise: str) -> None:
        """A notification said ``enterprise`` changed: reload it (single-flight, dirty-aware)."""
        if enterprise in self._loads:
            self._dirty.add(enterprise)
            return
        self._spawn(self.load(enterprise, "notify"))

    async def load(self, enterprise: str, reason: str) -> Entry | None:
        """Load one enterprise now, or join the load already running for it."""
        task = self._loads.get(enterprise)
        if task is None:
            task = asyncio.create_task(self._load_until_clean(enterprise, reason))
            self._loads[enterprise] = task
            task.add_done_callback(lambda _t: self._loads.pop(enterprise, None))
        return await asyncio.shield(task)

    async def _load_until_clean(self, enterprise: str, reason: str) -> Entry | None:
        while True:
            self._dirty.discard(enterprise)
            entry = await self._load_one(enterprise, reason)
            if enterprise not in self._dirty:
                return entry
            reason = "notify"

    async def _load_one(self, enterprise: str, reason: str) -> Entry | None:
        seq = next(self._seq)
        self._metrics.cache_loads.labels(reason).inc()
        with self._metrics.cache_load_seconds.labels("one").time():
            row = await store.load_entry(self._pool, self._adapter.name, enterprise)
        self._health.succeeded()
        entry = self._build(row, seq) if row is not None else None
        self._swap(enterprise, entry)
        return entry

    async def refresh_all(self, reason: str = "full") -> int:
        """Reload every enterprise and swap the whole map; returns the number of entries."""
        seq, started = next(self._seq), time.monotonic()
        self._metrics.cache_loads.labels(reason).inc()
        fresh: dict[str, Entry] = {}
        with self._metrics.cache_load_seconds.labels("all").time():
            after = ""
            while rows := await store.load_entries_after(self._pool, self._adapter.name,
                                                         after, PAGE):
                for row in rows:
                    fresh[row["number"]] = self._build(row, seq)
                after = rows[-1]["number"]
        # Anything loaded on its own after our first query is newer than what we read.
        for enterprise, current in self._entries.items():
            if current.seq > seq:
                fresh[enterprise] = current
        for enterprise, entry in fresh.items():
            self._note_validity(self._entries.get(enterprise), entry)
        self._entries = fresh
        self._held = {e: h for e, entry in fresh.items() if (h := entry.held)}
        self.matrix.rebuild(fresh.values())
        self._export()
        self.last_full_refresh_at = time.time()
        self._refreshed_from = max(self._refreshed_from, started)
        self.loaded.set()
        return len(fresh)

    async def catch_up(self, since: float) -> None:
        """Notifications are received from ``since`` (``time.monotonic()``) on: reload
        everything, unless a full refresh that began after ``since`` has completed — it read
        every row after any change committed before then (the startup load, when the
        listener connected first)."""
        if self._refreshed_from <= since:
            await self.refresh_all("connect")

    async def run_refresher(self, stopping: asyncio.Event) -> None:
        """Full refresh every ``refresh_s`` ± 20 %, until ``stopping``. A refresh the
        database fails is retried after a short jittered pause, not a whole period."""
        failures = 0
        while not stopping.is_set():
            period = (self._health.pause_s(failures) if failures
                      else self.refresh_s * self._rng.uniform(0.8, 1.2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), period)
            if stopping.is_set():
                return
            try:
                await self.refresh_all("full")
            except (asyncpg.PostgresError, *db.UNAVAILABLE_TYPES) as exc:
                failures += 1
                self._metrics.cache_load_failures.labels("all").inc()
                if not self._health.failed(exc, "config-refresher"):
                    log.warning("config_refresh_failed", error=type(exc).__name__)
                continue
            failures = 0
            self._health.succeeded()

    # ------------------------------------------------------------------ building

    def _build(self, row: Mapping[str, Any], seq: int) -> Entry:
        """An entry from a ``store._ENTRY_COLUMNS`` row; whatever the stored configuration
        holds, an entry (``invalid`` saying why it cannot be used), never an exception."""
        enabled = self._types(row["enabled"])
        config: IntegrationConfig | None = None
        invalid: str | None = None
        if row["config"] is not None:
            try:
                config = self._parse(row["config"])
            except ConfigError as exc:
                invalid = str(exc)
                enabled = self._types(enabled - {self._adapter.name})
        ttl = self.ttl_s * self._rng.uniform(2 / 3, 4 / 3)
        secret = row["secret"]
        return Entry(
            enterprise=row["number"], token=row["name2"],
            secret_fp=self._crypto.fingerprint(secret) if secret else None,
            active=bool(row["active"]), enabled_types=enabled, config=config,
            invalid=invalid, holds=row["holds"] or NO_HOLDS, seq=seq,
            expires_at=time.monotonic() + ttl,
        )

    def _parse(self, text: str) -> IntegrationConfig:
        """This integration's stored configuration (JSON text) parsed; ``ConfigError``
        for anything unusable — unreadable JSON, not an object, a wrong value anywhere."""
        name = self._adapter.name
        try:
            raw = decode_json(text)
        except UnreadableJson as exc:
            raise ConfigError(name, f"the stored configuration cannot be read: {exc}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(name, "expected an object")
        try:
            return self._adapter.parse_config(raw)
        except ConfigError:
            raise
        except Exception as exc:
            # The adapter's parser missed a shape (a bug of its own, logged as one); the
            # enterprise is invalid, the load and every other enterprise go on.
            self._metrics.bug_errors.inc()
            log.exception("config_parse_bug", integration=name)
            raise ConfigError(name, f"the stored configuration cannot be parsed "
                              f"({type(exc).__name__})") from None

    def _types(self, names: Iterable[str]) -> frozenset[str]:
        """The one shared frozenset of ``names``: thousands of entries, a handful of sets."""
        types = frozenset(names)
        return self._type_sets.setdefault(types, types)

    def _swap(self, enterprise: str, entry: Entry | None) -> None:
        old = self._entries.get(enterprise)
        if old is not None and entry is not None and old.seq > entry.seq:
            return  # a newer load already landed
        self._note_validity(old, entry)
        if entry is None:
            self._entries.pop(enterprise, None)
        else:
            self._entries[enterprise] = entry
        held = entry.held if entry is not None else None
        if held:
            self._held[enterprise] = held
        else:
            self._held.pop(enterprise, None)
        self.matrix.put(old, entry)
        self._export()

    def _note_validity(self, old: Entry | None, new: Entry | None) -> None:
        before = old.invalid if old is not None else None
        after = new.invalid if new is not None else None
        if after and after != before:
            log.warning("config_invalid", enterprise=new.enterprise if new else None,
                        integration=self._adapter.name, reason=after)
        elif before and not after and new is not None:
            log.info("config_valid_again", enterprise=new.enterprise,
                     integration=self._adapter.name)

    def _export(self) -> None:
        self._metrics.cache_entries.set(len(self._entries))
        self._metrics.ambiguous_tokens.set(self.matrix.ambiguous_count)
        by_reason = Counter(self._held.values())
        self._metrics.cache_invalid.set(by_reason.get("invalid_config", 0))
        for reason in HOLD_REASONS | by_reason.keys():
            self._metrics.held_enterprises.labels(reason).set(by_reason.get(reason, 0))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        self._metrics.cache_load_failures.labels("one").inc()
        if not self._health.failed(exc, "config-cache"):
            log.warning("config_load_failed", error=type(exc).__name__)

    async def close(self) -> None:
        """Cancel background loads (teardown)."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=2)

    def stats(self) -> dict[str, object]:
        """Cache state for ``/stats``."""
        return {
            "entries": len(self._entries),
            "serving": sum(1 for e in self._entries.values() if e.serves),
            "held": self.held(),
            "invalid": {e.enterprise: e.invalid for e in self._entries.values() if e.invalid},
            "ambiguous_tokens": self.matrix.ambiguous(),
            "loads_in_flight": len(self._loads),
            "last_full_refresh_at": self.last_full_refresh_at,
        }
