"""Database connections, untrusted JSON, and what "the database is unavailable" means.

**Connections.** The asyncpg pool and single connections opened the same way. Every
connection has a ``command_timeout`` (asyncpg's default is none) and goes back to the pool
without asyncpg's session reset (see ``_keep_session``). JSON and JSONB columns are encoded
from Python objects on every connection, and decoded to Python objects — but only for JSON
crm-bridge wrote itself (holds, log rows): a codec runs inside ``fetch``, where one value it
cannot decode fails the whole statement.

**Untrusted JSON** (``crm_events.payload``, written by call services; ``enterprises.
integrations_config``, written by every integration's services and by hand) is selected as
text (``::text`` in ``daemon/store.py``) and decoded row by row with ``decode_json``, which
turns everything ``json.loads`` can raise — a body nested thousands of levels deep
(``RecursionError``), a number of thousands of digits (``ValueError``) — into
``UnreadableJson``: that one row is refused, the others go on.

**Database unavailable.** ``unavailable(exc)`` is the one classification of a failure that
says "PostgreSQL cannot be reached or used right now" (a restart, a network cut, too many
connections, a timeout) rather than "this statement is wrong". Every loop that talks to the
database reports what it finds to the process's one ``DatabaseHealth``, which logs
``database_unavailable`` and ``database_recovered`` once each and exports the state; the
loop backs off with jitter (``DatabaseHealth.pause``) and tries again. The process stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any

import asyncpg
import structlog

from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

# A row's JSON text longer than this is refused unread (the HTTP ingest's body limit).
MAX_JSON_CHARS = 1024 * 1024
# Backoff of a loop that found the database unavailable: doubling from the first, capped,
# each wait drawn uniformly from its upper half (jitter: instances do not retry in step).
PAUSE_FIRST_S = 0.1
PAUSE_MAX_S = 5.0


# Built once: json.dumps with options builds a new encoder on every call. (An encoder keeps
# no state between calls: a constant.)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=_dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """What the pool does on release besides rolling back an unfinished transaction: nothing.

    Nothing in crm-bridge changes session state on a pooled connection (no SET, LISTEN,
    advisory lock or cursor: the listener and the migrator have connections of their own),
    so asyncpg's default reset (``RESET ALL; UNLISTEN *; …``) would undo nothing, at one
    more round trip on every release — measured at 7 % of the daemon's time per delivery.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    command_timeout_s: float = 10.0,
    application_name: str = "crm-bridge",
) -> asyncpg.Pool:
    """A pool whose connections speak JSON natively and time out commands."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout_s,
        init=_init_connection,
        reset=_keep_session,
        server_settings={"application_name": application_name},
    )
    assert pool is not None
    return pool


async def connect(
    dsn: str, *, command_timeout_s: float = 10.0, application_name: str = "crm-bridge"
) -> asyncpg.Connection:
    """One connection outside the pool, set up like the pool's (the listener, the migrator)."""
    conn = await asyncpg.connect(
        dsn,
        command_timeout=command_timeout_s,
        server_settings={"application_name": application_name},
        timeout=command_timeout_s,
    )
    await _init_connection(conn)
    return conn


# ---------------------------------------------------------------------- untrusted JSON


class UnreadableJson(ValueError):
    """A JSON text that cannot be decoded safely; the message says why, in a few words,
    and never quotes the text."""


def decode_json(text: str, *, max_chars: int = MAX_JSON_CHARS) -> Any:
    """``text`` (JSON selected as text) decoded, or ``UnreadableJson`` — never anything
    else, whatever the text holds."""
    if len(text) > max_chars:
        raise UnreadableJson(f"larger than {max_chars} characters")
    try:
        return json.loads(text)
    except RecursionError:
        raise UnreadableJson("nested too deeply to read") from None
    except json.JSONDecodeError as exc:
        raise UnreadableJson(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError:
        # int() refuses a number of more than sys.get_int_max_str_digits() digits.
        raise UnreadableJson("holds a number too long to read") from None


# ---------------------------------------------------------------------- unavailable

# SQLSTATE classes that mean "the server cannot serve anyone now", not "this statement is
# wrong": 08 connection exception, 53 insufficient resources (too many connections, disk
# full, out of memory), 57 operator intervention (shutting down, starting up, a crash,
# a cancelled or timed-out statement), 58 system error (I/O).
UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})
# Failures below SQL: the socket (OSError), a client-side timeout, asyncpg's own state
# ("connection is closed", and the "cannot switch to state …" of a connection the server
# left mid-protocol).
UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError,
)


def unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be reached or used right now (retry
    later); False for anything else — a statement's own error, or a bug."""
    if isinstance(exc, UNAVAILABLE_TYPES):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES
    return False


class DatabaseHealth:
    """The database as the process's loops find it; one per Runtime (no singleton).

    ``failed(exc, task)`` notes a failure that ``unavailable`` classes as such (and says
    whether it was one); ``succeeded()`` notes a statement that went through. The first
    failure after a success logs ``database_unavailable``, the first success after a
    failure logs ``database_recovered`` with how long it lasted: one line each per outage,
    however many loops and statements fail meanwhile.
    """

    def __init__(self, metrics: Metrics | None = None, *,
                 rng: random.Random | None = None) -> None:
        self._metrics = metrics
        self._rng = rng or random.Random()
        self.available = True
        self.down_since: float | None = None  # time.monotonic() of the outage's first failure
        self.last_error: str | None = None
        self.outages = 0
        if metrics is not None:
            metrics.database_up.set(1)

    def failed(self, exc: BaseException, task: str) -> bool:
        """Note ``exc`` if it means "database unavailable" and return True; return False
        (noting nothing) for any other error, which the caller handles as its own."""
        if not unavailable(exc):
            return False
        self.last_error = f"{task}: {type(exc).__name__}"
        if self.available:
            self.available = False
            self.down_since = time.monotonic()
            self.outages += 1
            log.warning("database_unavailable", task=task, error=type(exc).__name__)
            if self._metrics is not None:
                self._metrics.database_up.set(0)
                self._metrics.database_outages.inc()
        return True

    def succeeded(self) -> None:
        """A statement went through: the database is back if it was away."""
        if self.available:
            return
        down_s = time.monotonic() - (self.down_since or time.monotonic())
        self.available = True
        self.down_since = None
        log.info("database_recovered", down_s=round(down_s, 2), last_error=self.last_error)
        if self._metrics is not None:
            self._metrics.database_up.set(1)

    def pause_s(self, failures: int) -> float:
        """How long a loop waits after its ``failures``-th failure in a row (1-based)."""
        ceiling = min(PAUSE_MAX_S, PAUSE_FIRST_S * 2 ** max(0, failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def pause(self, failures: int, stopping: asyncio.Event) -> None:
        """Wait ``pause_s(failures)``, or less if ``stopping`` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), self.pause_s(failures))

    def stats(self) -> dict[str, object]:
        """For ``/stats`` and ``/ready``."""
        return {
            "available": self.available, "last_error": self.last_error,
            "down_s": None if self.down_since is None
            else round(time.monotonic() - self.down_since, 1),
            "outages": self.outages,
        }
