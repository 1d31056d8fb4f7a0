"""All runtime SQL of crm-bridge, as named constants and the small functions that run them.

Nothing else in the code base writes SQL (migrations live in ``sql/``). Each function takes a
pool or a connection and returns plain values or records; none of them knows about HTTP,
CRMs or caching.

JSON that others write — ``crm_events.payload``, ``enterprises.integrations_config`` — is
selected as text and decoded row by row (``daemon.db.decode_json``), never by the
connection's codec inside ``fetch``, where one unreadable value would fail every row of the
statement (see daemon/db.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeAlias

import asyncpg

from daemon.db import UnreadableJson, decode_json
from daemon.errors import ConfigError

Executor: TypeAlias = "asyncpg.Pool | asyncpg.Connection"

# ------------------------------------------------------------------ process

PING = "SELECT 1"

REGISTER_INTEGRATION = """
INSERT INTO crm_integrations (integration_type, event_types)
VALUES ($1, $2)
ON CONFLICT (integration_type) DO UPDATE
   SET event_types = EXCLUDED.event_types, last_seen_at = now()
"""


async def ping(db: Executor, timeout_s: float) -> None:
    """One real round trip; raises when the database does not answer in ``timeout_s``."""
    await db.fetchval(PING, timeout=timeout_s)


async def register_integration(db: Executor, name: str, event_types: Iterable[str]) -> None:
    """Tell the fan-out trigger that ``name`` is served and which event types it acts on."""
    await db.execute(REGISTER_INTEGRATION, name, sorted(event_types))

SERVED_INTEGRATIONS = "SELECT integration_type FROM crm_integrations ORDER BY 1"

NOTIFICATION_QUEUE_USAGE = "SELECT pg_notification_queue_usage()"


async def served_integrations(db: Executor) -> list[str]:
    """The integrations some crm-bridge process has registered."""
    return [r["integration_type"] for r in await db.fetch(SERVED_INTEGRATIONS)]


# The migrations applied (``/ready``).
APPLIED_MIGRATIONS = "SELECT coalesce(array_agg(version), '{}') FROM schema_migrations"


async def applied_migrations(db: Executor, timeout_s: float) -> set[int]:
    """The versions recorded in ``schema_migrations`` — none when it does not exist yet
    (one round trip within ``timeout_s``)."""
    try:
        versions: list[int] = await db.fetchval(APPLIED_MIGRATIONS, timeout=timeout_s)
    except asyncpg.UndefinedTableError:
        return set()
    return set(versions)


# ------------------------------------------------------------------ configuration

# One enterprise for the adapter's upkeep: its key of integrations_config as text
# (decoded by ``load_enterprise``), and its holds of integration $1.
LOAD_ENTERPRISE = """
SELECT e.number, e.name2, e.active, (e.integrations_config -> $1::text)::text AS config,
       coalesce(h.holds, '{}'::jsonb) AS holds
  FROM enterprises e
  LEFT JOIN (SELECT enterprise_number, jsonb_object_agg(reason, detail) AS holds
               FROM crm_holds WHERE integration_type = $1
              GROUP BY enterprise_number) h ON h.enterprise_number = e.number
 WHERE e.number = $2
"""

# What the ConfigCache needs of an enterprise, and no more: ``config`` is only this
# integration's key of integrations_config, as text (the cache decodes it row by row),
# ``enabled`` the names of the keys whose ``enabled`` is true (other services' configs are
# neither sent nor decoded: most of a full refresh's time and memory went there), ``holds``
# NULL when there are none. ``secret`` is read only to be fingerprinted at once: a Token may
# name an enterprise by it (docs/events.md).
_ENTRY_COLUMNS = """
SELECT e.number, e.name2, e.secret, e.active,
       (e.integrations_config -> $1::text)::text AS config,
       ARRAY(SELECT c.key
               FROM jsonb_each(CASE jsonb_typeof(e.integrations_config)
                               WHEN 'object' THEN e.integrations_config END) c
              WHERE c.value -> 'enabled' = 'true'::jsonb) AS enabled,
       (SELECT jsonb_object_agg(h.reason, h.detail)
          FROM crm_holds h
         WHERE h.enterprise_number = e.number AND h.integration_type = $1) AS holds
  FROM enterprises e
"""

LOAD_ENTRY = _ENTRY_COLUMNS + " WHERE e.number = $2"
# Keyset pagination: the page after enterprise ``$2`` ('' sorts before every number).
LOAD_ENTRIES_AFTER = _ENTRY_COLUMNS + " WHERE e.number > $2 ORDER BY e.number LIMIT $3"

# Tokens that name more than one active enterprise at the first level that matches (the
# rule of sql/004's crm_events_admit and of cache.EnablementMatrix): a name2 shared by
# several active enterprises, and a secret shared by several that no active name2 equals.
# A secret is never returned, only the enterprises sharing it.
AMBIGUOUS_TOKENS = """
SELECT 'name2' AS level, e.name2 AS token, array_agg(e.number ORDER BY e.number) AS enterprises
  FROM enterprises e
 WHERE e.active AND coalesce(e.name2, '') <> ''
 GROUP BY e.name2
HAVING count(*) > 1
 UNION ALL
SELECT 'secret', NULL, array_agg(e.number ORDER BY e.number)
  FROM enterprises e
 WHERE e.active AND coalesce(e.secret, '') <> ''
   AND NOT EXISTS (SELECT 1 FROM enterprises n WHERE n.active AND n.name2 = e.secret)
 GROUP BY e.secret
HAVING count(*) > 1
 ORDER BY 1, 3
"""

PUT_HOLD = """
INSERT INTO crm_holds (enterprise_number, integration_type, reason, detail)
VALUES ($1, $2, $3, $4)
ON CONFLICT (enterprise_number, integration_type, reason)
DO UPDATE SET detail = EXCLUDED.detail, created_at = now()
"""

LIFT_HOLD = """
DELETE FROM crm_holds WHERE enterprise_number = $1 AND integration_type = $2 AND reason = $3
"""


def _config_value(text: str | None, integration: str) -> Any:
    """A stored ``integrations_config[integration]`` read as text, decoded; an unreadable
    one is a ``ConfigError`` naming the integration (never a crash of the caller)."""
    if text is None:
        return None
    try:
        return decode_json(text)
    except UnreadableJson as exc:
        raise ConfigError(integration, f"the stored configuration cannot be read: {exc}") from None


def _config_object(text: str | None, integration: str) -> dict[str, Any] | None:
    value = _config_value(text, integration)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(integration, "the stored configuration is not a JSON object")
    return value


async def load_enterprise(
    db: Executor, integration: str, number: str
) -> dict[str, Any] | None:
    """One enterprise (None when it does not exist): ``number``, ``name2``, ``active``,
    ``config`` (its ``integrations_config[integration]`` decoded, or None) and ``holds`` of
    ``integration``. An unreadable config raises ``ConfigError(integration)``."""
    row = await db.fetchrow(LOAD_ENTERPRISE, integration, number)
    if row is None:
        return None
    return {**dict(row), "config": _config_value(row["config"], integration)}


async def load_entry(db: Executor, integration: str, number: str) -> asyncpg.Record | None:
    """One enterprise as the ConfigCache sees it (``_ENTRY_COLUMNS``; None: no such one)."""
    row: asyncpg.Record | None = await db.fetchrow(LOAD_ENTRY, integration, number)
    return row


async def load_entries_after(
    db: Executor, integration: str, after: str, limit: int
) -> list[asyncpg.Record]:
    """Up to ``limit`` enterprises numbered after ``after`` ('' for the first page), in
    number order, as the ConfigCache sees them (``_ENTRY_COLUMNS``)."""
    rows: list[asyncpg.Record] = await db.fetch(LOAD_ENTRIES_AFTER, integration, after, limit)
    return rows


async def ambiguous_tokens(db: Executor) -> list[asyncpg.Record]:
    """Every ambiguous Token: ``level`` (name2 | secret), ``token`` (None for a secret) and
    ``enterprises`` (the active ones it names)."""
    rows: list[asyncpg.Record] = await db.fetch(AMBIGUOUS_TOKENS)
    return rows


async def put_hold(db: Executor, number: str, integration: str, reason: str, detail: str) -> None:
    """Hold ``number``'s deliveries of ``integration`` (see sql/002_delivery_holds.sql)."""
    await db.execute(PUT_HOLD, number, integration, reason, detail)


async def lift_hold(db: Executor, number: str, integration: str, reason: str) -> bool:
    """Remove one hold; True when there was one."""
    status: str = await db.execute(LIFT_HOLD, number, integration, reason)
    return status != "DELETE 0"


# Merge ``$3`` into one integration's key of integrations_config (created when absent). Other
# keys of the column are neither read nor written: other services write them concurrently.
MERGE_INTEGRATION_CONFIG = """
UPDATE enterprises
   SET integrations_config = jsonb_set(
           integrations_config, ARRAY[$2::text],
           coalesce(integrations_config -> $2::text, '{}'::jsonb) || $3::jsonb, true)
 WHERE number = $1
RETURNING (integrations_config -> $2::text)::text
"""

READ_INTEGRATION_CONFIG = """
SELECT (integrations_config -> $2::text)::text FROM enterprises WHERE number = $1
"""

BUMP_INTEGRATION_COUNTER = """
UPDATE enterprises
   SET integrations_config = jsonb_set(
           integrations_config, ARRAY[$2::text, $3::text],
           -- A value that is not a plain count (hand-edited: 1.5, 1e10, "x") counts as 0.
           to_jsonb(CASE WHEN integrations_config -> $2::text ->> $3::text ~ '^[0-9]{1,9}$'
                         THEN (integrations_config -> $2::text ->> $3::text)::int
                         ELSE 0 END + 1), true)
 WHERE number = $1 AND integrations_config ? $2::text
RETURNING (integrations_config -> $2::text ->> $3::text)::int
"""


async def merge_integration_config(
    db: Executor, enterprise: str, integration: str, values: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Set ``values`` in ``integrations_config[integration]``; the new value (None: no such
    enterprise; ``ConfigError`` when what is stored cannot be read)."""
    text = await db.fetchval(MERGE_INTEGRATION_CONFIG, enterprise, integration, dict(values))
    return _config_object(text, integration)


async def read_integration_config(
    db: Executor, enterprise: str, integration: str
) -> dict[str, Any] | None:
    """``integrations_config[integration]`` as stored, or None (``ConfigError`` when it
    cannot be read)."""
    text = await db.fetchval(READ_INTEGRATION_CONFIG, enterprise, integration)
    return _config_object(text, integration)


async def bump_integration_counter(
    db: Executor, enterprise: str, integration: str, key: str
) -> int | None:
    """``integrations_config[integration][key] += 1`` in one statement; the new value."""
    value: int | None = await db.fetchval(BUMP_INTEGRATION_COUNTER, enterprise, integration, key)
    return value


# ------------------------------------------------------------------ ingest

INSERT_EVENT = """
INSERT INTO crm_events (enterprise_number, event_type, unique_id, payload, record_url, origin)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT DO NOTHING
RETURNING id
"""


async def insert_event(
    db: Executor, enterprise: str, event_type: str, unique_id: str, payload: object,
    record_url: str | None, origin: str,
) -> int | None:
    """Store one event (the fan-out triggers run); its id, or None for a duplicate/dropped one."""
    event_id: int | None = await db.fetchval(
        INSERT_EVENT, enterprise, event_type, unique_id, payload, record_url, origin
    )
    return event_id


# ------------------------------------------------------------------ delivery queue

# Due deliveries of one integration, oldest first, skipping what another instance holds,
# what a held enterprise owns, and any delivery whose call has an earlier one still
# pending (per-call order). Takes a lease and counts the attempt in the same statement.
#
# A delivery whose lease expired without an outcome (its holder crashed, hung, or lost the
# database for longer than the lease) is counted in ``lease_expiries``; when that reaches
# $6, or its attempts have reached $7 (CRM_BRIDGE_MAX_ATTEMPTS), the claim dead-letters it
# instead ('poison' / 'attempts' in ``dead``) and writes its log row: a row that kills
# every process attempting it cannot do so forever. Dead rows come back without payload.
# A delivery reclaimed after an earlier expiry already (its second or later) is a
# ``suspect``: it is taken alone (with any dead ones), so if it is what crashes its holders,
# the deliveries in flight beside it are not taken down with it again — an innocent delivery
# is not poisoned by company. (After one expiry, the common case of a process killed with a
# batch in flight, deliveries are claimed together as usual.)
# The payload comes as text, decoded row by row by the dispatcher (see daemon/db.py); so
# do the call's other stored events (``call_*``, parallel arrays in no particular order,
# NULL when there are none): the call is read with the claim, not in a round trip of its
# own per delivery (daemon/claims.py).
#
# Only enterprises this instance owns are claimed (crm_owners, sql/005): those whose live
# ownership row names it, and free ones (no live row) it takes in the same statement — if
# it is the live instance the enterprise hashes to, or whoever comes once the work has
# waited $10 s for that one. Two instances taking one enterprise at once meet on its
# crm_owners row: one wins, the other's rows of it are left alone. ``owner_s`` is how long
# the ownership lasts from the statement's start; ``stored_s`` how old the event is.
#
# $1 integration, $2 limit, $3 enterprises to skip, $4 lease s, $5 lease tag,
# $6 lease expiries before poison, $7 max attempts, $8 instance id, $9 ownership s,
# $10 takeover s.
CLAIM = """
WITH due AS (
    SELECT d.event_id, d.enterprise_number, d.locked_until IS NOT NULL AS reclaimed,
           d.locked_until IS NOT NULL AND d.lease_expiries >= 1 AS suspect,
           CASE WHEN d.locked_until IS NOT NULL AND d.lease_expiries + 1 >= $6 THEN 'poison'
                WHEN d.attempts >= $7 THEN 'attempts' END AS dead,
           o.owner IS NOT NULL AS owned,
           extract(epoch FROM o.until - now())::float8 AS owner_s
      FROM crm_deliveries d
      -- A lateral lookup per candidate, not a join the planner could turn into a hash join:
      -- that would read every due row before the LIMIT instead of stopping at it.
      LEFT JOIN LATERAL (
             SELECT o.owner, o.until FROM crm_owners o
              WHERE o.integration_type = d.integration_type
                AND o.enterprise_number = d.enterprise_number
                AND o.until >= now()
              LIMIT 1) o ON true
     WHERE d.integration_type = $1
       AND d.status = 'pending'
       AND d.next_attempt_at <= now()
       AND (d.locked_until IS NULL OR d.locked_until < now())
       AND d.enterprise_number <> ALL ($3::text[])
       AND CASE WHEN o.owner IS NOT NULL THEN o.owner = $8
                WHEN d.next_attempt_at < now() - make_interval(secs => $10) THEN true
                ELSE $8 = (SELECT i.instance_id FROM crm_instances i
                            WHERE i.integration_type = $1 AND i.alive_until >= now()
                            ORDER BY hashtext(d.enterprise_number || '/' || i.instance_id) DESC,
                                     i.instance_id
                            LIMIT 1)
           END
       AND NOT EXISTS (
               SELECT 1 FROM crm_deliveries p
                WHERE p.integration_type = d.integration_type
                  AND p.enterprise_number = d.enterprise_number
                  AND p.unique_id = d.unique_id
                  AND p.status = 'pending'
                  AND p.event_id < d.event_id)
     ORDER BY d.next_attempt_at, d.event_id
     LIMIT $2
       FOR UPDATE OF d SKIP LOCKED
), picked AS (
    SELECT due.* FROM due
     WHERE due.dead IS NOT NULL
        OR due.event_id = coalesce(
               (SELECT min(s.event_id) FROM due s WHERE s.suspect AND s.dead IS NULL),
               due.event_id)
), owning AS (
    INSERT INTO crm_owners AS o (integration_type, enterprise_number, owner, until)
    SELECT DISTINCT $1, p.enterprise_number, $8, now() + make_interval(secs => $9)
      FROM picked p
     WHERE NOT p.owned AND p.dead IS NULL
     ORDER BY 2
        ON CONFLICT (integration_type, enterprise_number) DO UPDATE
       SET owner = EXCLUDED.owner, until = EXCLUDED.until
     WHERE o.until < now()
 RETURNING o.enterprise_number
), claimable AS (
    SELECT p.event_id, p.reclaimed, p.suspect, p.dead, p.owner_s
      FROM picked p
     WHERE p.owned OR p.dead IS NOT NULL
     UNION ALL
    SELECT p.event_id, p.reclaimed, p.suspect, p.dead, $9::float8
      FROM picked p JOIN owning ON owning.enterprise_number = p.enterprise_number
     WHERE NOT p.owned AND p.dead IS NULL
), taken AS (
    UPDATE crm_deliveries d
       SET locked_until = CASE WHEN due.dead IS NULL
                               THEN now() + make_interval(secs => $4) END,
           locked_by = CASE WHEN due.dead IS NULL THEN $5 END,
           attempts = d.attempts + (due.dead IS NULL)::int,
           lease_expiries = d.lease_expiries + due.reclaimed::int,
           status = CASE WHEN due.dead IS NULL THEN 'pending' ELSE 'failed' END,
           last_error = CASE due.dead
               WHEN 'poison' THEN format(
                   'poison: its lease expired %s times without an outcome (the process '
                   'attempting it crashed, hung or lost the database)', d.lease_expiries + 1)
               WHEN 'attempts' THEN format(
                   'attempts: gave up after %s attempts, the last one without an outcome',
                   d.attempts)
               ELSE d.last_error END
      FROM claimable due
     WHERE d.integration_type = $1 AND d.event_id = due.event_id
 RETURNING d.event_id, d.attempts, d.queued_at, d.steps_done, due.reclaimed, due.suspect,
           due.dead, d.last_error, d.enterprise_number, d.unique_id, due.owner_s,
           extract(epoch FROM d.locked_until - now())::float8 AS lease_s
), logged AS (
    INSERT INTO integration_logs (enterprise_number, integration_type, event_type,
                                  request_data, response_data, status, error_message)
    SELECT t.enterprise_number, $1, e.event_type,
           jsonb_build_object('unique_id', t.unique_id, 'event_id', t.event_id,
                              'attempt', t.attempts, 'requests', '[]'::jsonb),
           '[]'::jsonb, 'error', t.last_error
      FROM taken t
      JOIN crm_events e ON e.id = t.event_id
     WHERE t.dead IS NOT NULL
)
SELECT t.event_id, t.attempts, t.queued_at, t.steps_done, t.reclaimed, t.suspect, t.lease_s,
       t.owner_s, t.dead, t.last_error, e.enterprise_number, e.event_type, e.unique_id,
       CASE WHEN t.dead IS NULL THEN e.payload::text END AS payload,
       e.record_url, e.origin, e.received_at,
       extract(epoch FROM now() - e.received_at)::float8 AS stored_s,
       c.ids AS call_ids, c.types AS call_types, c.payloads AS call_payloads,
       c.record_urls AS call_record_urls, c.origins AS call_origins,
       c.received_at AS call_received_at
  FROM taken t
  JOIN crm_events e ON e.id = t.event_id
  LEFT JOIN LATERAL (
       SELECT array_agg(s.id) AS ids, array_agg(s.event_type) AS types,
              array_agg(s.payload::text) AS payloads, array_agg(s.record_url) AS record_urls,
              array_agg(s.origin) AS origins, array_agg(s.received_at) AS received_at
         FROM crm_events s
        WHERE t.dead IS NULL
          AND s.enterprise_number = e.enterprise_number AND s.unique_id = e.unique_id
          AND s.id <> e.id) c ON true
 ORDER BY t.event_id
"""


async def claim(
    db: Executor, integration: str, limit: int, held: Iterable[str], lease_s: float,
    lease: str, *, max_lease_expiries: int, max_attempts: int, instance: str,
    ownership_s: float, takeover_s: float,
) -> list[asyncpg.Record]:
    """Claim up to ``limit`` due deliveries under ``lease`` (see ``CLAIM``): the rows taken,
    each with its call's other events, and those the claim dead-lettered itself (``dead``
    not None, no payload, no call). Only enterprises ``instance`` owns or takes, for
    ``ownership_s``, are claimed."""
    rows: list[asyncpg.Record] = await db.fetch(
        CLAIM, integration, limit, sorted(held), lease_s, lease, max_lease_expiries,
        max_attempts, instance, ownership_s, takeover_s)
    return rows


# Settle a batch and write its log rows, in one statement (one round trip, no explicit
# transaction: a data-modifying CTE runs to completion whether or not its rows are read).
# Each delivery's outcome is fenced by the lease it was claimed under (a row whose lease
# another instance has taken over is left alone). status 'pending' reschedules: delay_s NULL
# keeps next_attempt_at, attempts_delta -1 un-counts an attempt not made. ``steps`` ($14)
# is the delivery's steps done so far, comma-joined (NULL keeps them). The log arrays
# ($8…$13) may be empty.
SETTLE = """
WITH o AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::int[], $6::float8[],
                         $7::text[], $14::text[])
        AS o(event_id, lease, status, attempts_delta, delay_s, last_error, steps)
), logged AS (
    INSERT INTO integration_logs (enterprise_number, integration_type, event_type,
                                  request_data, response_data, status, error_message)
    SELECT l.enterprise_number, $1, l.event_type, l.request_data::jsonb,
           l.response_data::jsonb, l.status, l.error_message
      FROM unnest($8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
        AS l(enterprise_number, event_type, request_data, response_data, status, error_message)
)
UPDATE crm_deliveries d
   SET status = o.status,
       attempts = d.attempts + o.attempts_delta,
       next_attempt_at = CASE WHEN o.delay_s IS NULL THEN d.next_attempt_at
                              ELSE now() + make_interval(secs => o.delay_s) END,
       last_error = coalesce(o.last_error, d.last_error),
       steps_done = CASE WHEN o.steps IS NULL THEN d.steps_done
                         ELSE string_to_array(o.steps, ',') END,
       delivered_at = CASE WHEN o.status = 'done' THEN now() ELSE d.delivered_at END,
       locked_until = NULL,
       locked_by = NULL
  FROM o
 WHERE d.integration_type = $1
   AND d.event_id = o.event_id
   AND d.locked_by = o.lease
   AND d.status = 'pending'
RETURNING d.event_id,
          -- Finished, with the call's next delivery waiting behind it: due now.
          o.status <> 'pending' AND EXISTS (
              SELECT 1 FROM crm_deliveries n
               WHERE n.integration_type = $1
                 AND n.enterprise_number = d.enterprise_number
                 AND n.unique_id = d.unique_id
                 AND n.status = 'pending'
                 AND n.event_id > d.event_id) AS unblocks
"""

# ------------------------------------------------------------------ ownership (sql/005)

# One instance's heartbeat: it is alive for $3 s more, and every enterprise it owns is its
# for $3 s more (rows locked in enterprise order, like the claim takes them: no deadlock
# between the two). Returns the enterprises renewed, each with the live instance it hashes
# to now (the claim's rule): one that hashes elsewhere is handed over. Instances gone for a
# day are forgotten.
HEARTBEAT = """
WITH me AS (
    INSERT INTO crm_instances (integration_type, instance_id, alive_until)
    VALUES ($1, $2, now() + make_interval(secs => $3))
        ON CONFLICT (integration_type, instance_id)
        DO UPDATE SET alive_until = EXCLUDED.alive_until
), gone AS (
    DELETE FROM crm_instances
     WHERE integration_type = $1 AND alive_until < now() - interval '1 day'
), renewed AS (
    UPDATE crm_owners o
       SET until = now() + make_interval(secs => $3)
      FROM (SELECT enterprise_number FROM crm_owners
             WHERE integration_type = $1 AND owner = $2
             ORDER BY enterprise_number
               FOR UPDATE) mine
     WHERE o.integration_type = $1 AND o.enterprise_number = mine.enterprise_number
 RETURNING o.enterprise_number
)
SELECT r.enterprise_number,
       (SELECT i.instance_id FROM crm_instances i
         WHERE i.integration_type = $1 AND (i.alive_until >= now() OR i.instance_id = $2)
         ORDER BY hashtext(r.enterprise_number || '/' || i.instance_id) DESC, i.instance_id
         LIMIT 1) AS preferred
  FROM renewed r
"""

# Hand enterprises over: nobody takes them for $4 s (the CRM's rate window, so the next
# owner's first requests cannot share a window with this one's last).
RELEASE_OWNERSHIP = """
UPDATE crm_owners
   SET owner = '', until = now() + make_interval(secs => $4)
 WHERE integration_type = $1 AND owner = $2 AND enterprise_number = ANY ($3::text[])
"""

# A graceful stop: every enterprise handed over as above, and the instance gone.
RETIRE_INSTANCE = """
WITH released AS (
    UPDATE crm_owners
       SET owner = '', until = now() + make_interval(secs => $3)
     WHERE integration_type = $1 AND owner = $2
)
DELETE FROM crm_instances WHERE integration_type = $1 AND instance_id = $2
"""


async def heartbeat(
    db: Executor, integration: str, instance: str, ownership_s: float
) -> list[tuple[str, str]]:
    """Renew this instance and its enterprises (``HEARTBEAT``); (enterprise, the live
    instance it hashes to) for each one renewed."""
    rows = await db.fetch(HEARTBEAT, integration, instance, ownership_s)
    return [(r["enterprise_number"], r["preferred"]) for r in rows]


async def release_ownership(
    db: Executor, integration: str, instance: str, enterprises: Iterable[str], quiet_s: float
) -> None:
    """Hand ``enterprises`` over (``RELEASE_OWNERSHIP``)."""
    await db.execute(RELEASE_OWNERSHIP, integration, instance, sorted(enterprises), quiet_s)


async def retire_instance(db: Executor, integration: str, instance: str, quiet_s: float) -> None:
    """Hand every enterprise over and leave the live instances (``RETIRE_INSTANCE``)."""
    await db.execute(RETIRE_INSTANCE, integration, instance, quiet_s)


# The payload as text: decoded row by row (``daemon.claims``), so one unreadable sibling
# does not fail the others. (A claim returns the call with the delivery; this reads it
# again for an attempt that starts long after its claim.)
CALL_EVENTS = """
SELECT id, event_type, unique_id, payload::text AS payload, record_url, origin, received_at
  FROM crm_events
 WHERE enterprise_number = $1 AND unique_id = $2
 ORDER BY id
"""

QUEUE_STATS = """
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       coalesce(extract(epoch FROM now() - min(next_attempt_at)
                FILTER (WHERE status = 'pending' AND next_attempt_at <= now()
                          AND (locked_until IS NULL OR locked_until < now()))), 0)::float8
           AS oldest_due_s,
       count(*) FILTER (WHERE status = 'failed') AS failed
  FROM crm_deliveries
 WHERE integration_type = $1 AND status IN ('pending', 'failed')
"""

RING = "SELECT pg_notify('crm_events', '')"

DOORBELL_WINDOW = "SELECT window_ms FROM crm_doorbell WHERE channel = 'crm_events'"


async def doorbell_window_s(db: Executor) -> float:
    """How long the fan-out trigger stays silent after ringing (sql/003)."""
    window_ms = await db.fetchval(DOORBELL_WINDOW)
    return float(window_ms) / 1000.0


async def call_events(db: Executor, enterprise: str, unique_id: str) -> list[asyncpg.Record]:
    """Every stored event of one call, in arrival order; ``payload`` is the stored body as
    JSON text (decode it with ``daemon.db.decode_json``)."""
    rows: list[asyncpg.Record] = await db.fetch(CALL_EVENTS, enterprise, unique_id)
    return rows


# ------------------------------------------------------------------ operations

# Events old enough, none of whose call's deliveries still needs them (pending, or failed
# and so replayable), a small batch at a time.
PURGE_BATCH = """
DELETE FROM crm_events
 WHERE id IN (
       SELECT e.id FROM crm_events e
        WHERE e.received_at < now() - make_interval(secs => $1)
          AND NOT EXISTS (
                SELECT 1 FROM crm_deliveries d
                 WHERE d.enterprise_number = e.enterprise_number
                   AND d.unique_id = e.unique_id
                   AND d.status IN ('pending', 'failed'))
        ORDER BY e.received_at
        LIMIT $2)
"""

REPLAY = """
WITH picked AS (
    UPDATE crm_deliveries d
       SET status = 'pending', attempts = 0, lease_expiries = 0, queued_at = now(),
           next_attempt_at = now(), last_error = NULL, locked_until = NULL, locked_by = NULL,
           steps_done = '{}'
      FROM crm_events e
     WHERE e.id = d.event_id
       AND d.integration_type = $1
       AND d.status = ANY ($2::text[])
       AND ($3::text IS NULL OR d.enterprise_number = $3)
       AND ($4::timestamptz IS NULL OR e.received_at >= $4)
       AND ($5::timestamptz IS NULL OR e.received_at < $5)
       AND ($6::text IS NULL OR d.unique_id = $6)
    RETURNING d.event_id
)
SELECT count(*) FROM picked
"""


async def replay(
    db: Executor, integration: str, *, statuses: Iterable[str] = ("failed",),
    enterprise: str | None = None, since: datetime | None = None,
    until: datetime | None = None, call: str | None = None,
) -> int:
    """Put settled deliveries matching the filters back to pending (fresh attempts and age),
    and ring the doorbell; how many."""
    count: int = await db.fetchval(
        REPLAY, integration, list(statuses), enterprise, since, until, call
    )
    if count:
        await db.execute(RING)
    return count


async def purge(db: Executor, retention_s: float, batch: int) -> int:
    """Delete one batch of expired events (their deliveries go with them); how many."""
    status: str = await db.execute(PURGE_BATCH, retention_s, batch)
    return int(status.split()[-1])


# ------------------------------------------------------------------ platform directory

INTERNAL_NUMBERS = """
SELECT phone_number FROM user_internal_phones WHERE enterprise_number = $1 ORDER BY phone_number
"""


async def internal_numbers(db: Executor, enterprise: str) -> list[str]:
    """The enterprise's internal numbers (extensions)."""
    return [r["phone_number"] for r in await db.fetch(INTERNAL_NUMBERS, enterprise)]


# ------------------------------------------------------------------ integration upkeep
# (registration in the CRM, managers ↔ extensions, reconciliation)

# Like MERGE_INTEGRATION_CONFIG, but keys already present win: sets only what is missing
# (a secret generated once, whichever of two racing writers comes first).
MERGE_INTEGRATION_CONFIG_MISSING = """
UPDATE enterprises
   SET integrations_config = jsonb_set(
           integrations_config, ARRAY[$2::text],
           $3::jsonb || coalesce(integrations_config -> $2::text, '{}'::jsonb), true)
 WHERE number = $1
RETURNING (integrations_config -> $2::text)::text
"""

# The integration's key, with the enterprise row locked against other writers until the
# caller's transaction ends (a read-modify-write of one nested value, such as a map).
LOCK_INTEGRATION_CONFIG = """
SELECT (integrations_config -> $2::text)::text AS config
  FROM enterprises WHERE number = $1
   FOR NO KEY UPDATE
"""

# Internal numbers with their owners' names; one row per number.
INTERNAL_PHONES = """
SELECT DISTINCT ON (p.phone_number)
       p.phone_number, p.user_id, u.first_name, u.last_name
  FROM user_internal_phones p
  LEFT JOIN users u ON u.id = p.user_id
 WHERE p.enterprise_number = $1
 ORDER BY p.phone_number, p.user_id NULLS LAST
"""

# Enterprises of one integration whose registration in the CRM needs redoing: enabled, not
# deactivated by the CRM, and either marked sync_pending or last synced before $2 seconds
# ago (a malformed last_sync counts as never: nothing to refresh).
INTEGRATION_SYNC_DUE = """
SELECT e.number
  FROM enterprises e
 WHERE e.active
   AND e.integrations_config -> $1::text ->> 'enabled' = 'true'
   AND NOT EXISTS (SELECT 1 FROM crm_holds h
                    WHERE h.enterprise_number = e.number AND h.integration_type = $1
                      AND h.reason = 'deactivated')
   AND (e.integrations_config -> $1::text ->> 'sync_pending' = 'true'
        OR (CASE WHEN e.integrations_config -> $1::text ->> 'last_sync'
                      ~ '^[0-9]{4}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]'
                 THEN (e.integrations_config -> $1::text ->> 'last_sync')::timestamptz
            END) < now() - make_interval(secs => $2))
 ORDER BY e.number
 LIMIT $3
"""

INSERT_LOG = """
INSERT INTO integration_logs (enterprise_number, integration_type, event_type, request_data,
                              response_data, status, error_message)
VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)
"""


async def merge_integration_config_missing(
    db: Executor, enterprise: str, integration: str, values: Mapping[str, Any]
) -> dict[str, Any] | None:
    """Set the keys of ``values`` that ``integrations_config[integration]`` lacks; the
    stored value afterwards (None: no such enterprise)."""
    text = await db.fetchval(MERGE_INTEGRATION_CONFIG_MISSING, enterprise, integration,
                             dict(values))
    return _config_object(text, integration)


async def lock_integration_config(
    db: asyncpg.Connection, enterprise: str, integration: str
) -> tuple[bool, dict[str, Any] | None]:
    """Lock the enterprise's row for the rest of the transaction ``db`` is in; (whether the
    enterprise exists, ``integrations_config[integration]`` or None). ``ConfigError`` when
    what is stored cannot be read."""
    row = await db.fetchrow(LOCK_INTEGRATION_CONFIG, enterprise, integration)
    if row is None:
        return False, None
    return True, _config_object(row["config"], integration)


async def internal_phones(db: Executor, enterprise: str) -> list[asyncpg.Record]:
    """The enterprise's internal numbers: ``phone_number``, ``user_id``, ``first_name``,
    ``last_name`` (the owner's, None when unowned or unknown)."""
    rows: list[asyncpg.Record] = await db.fetch(INTERNAL_PHONES, enterprise)
    return rows


async def integration_sync_due(
    db: Executor, integration: str, older_than_s: float, limit: int
) -> list[str]:
    """Enterprises whose registration of ``integration`` should be redone now (see
    ``INTEGRATION_SYNC_DUE``), at most ``limit``."""
    rows = await db.fetch(INTEGRATION_SYNC_DUE, integration, older_than_s, limit)
    return [r["number"] for r in rows]


async def insert_log(
    db: Executor, enterprise: str, integration: str, event_type: str, request: Any,
    response: Any, ok: bool, error: str | None,
) -> None:
    """One ``integration_logs`` row outside the delivery pipeline (request and response
    must already be masked)."""
    await db.execute(INSERT_LOG, enterprise, integration, event_type, request, response,
                     "success" if ok else "error", error)


# ------------------------------------------------------------------ telephony
# (the PBX's credential, managers' statuses, the directory smart redirect answers from)

# The enterprise's credential at the platform's Asterisk service and its internal numbers,
# in one round trip; no row: no such enterprise. Read when a call is placed, never cached.
PBX_LINE = """
SELECT e.secret,
       ARRAY(SELECT DISTINCT p.phone_number FROM user_internal_phones p
              WHERE p.enterprise_number = e.number) AS numbers
  FROM enterprises e
 WHERE e.number = $1
"""

# A manager's status: written only when it changes (no row, no NOTIFY otherwise).
PUT_USER_STATUS = """
INSERT INTO crm_user_status (enterprise_number, integration_type, user_id, status)
VALUES ($1, $2, $3, $4)
ON CONFLICT (enterprise_number, integration_type, user_id)
DO UPDATE SET status = EXCLUDED.status, updated_at = now()
 WHERE crm_user_status.status IS DISTINCT FROM EXCLUDED.status
RETURNING user_id
"""

USER_STATUSES = """
SELECT user_id, status FROM crm_user_status
 WHERE enterprise_number = $1 AND integration_type = $2
"""

# What smart redirect checks an answer against: the enterprise's internal numbers and its
# managers' statuses, in one round trip.
ROUTING_DIRECTORY = """
SELECT ARRAY(SELECT DISTINCT p.phone_number FROM user_internal_phones p
              WHERE p.enterprise_number = $1) AS numbers,
       coalesce((SELECT jsonb_object_agg(s.user_id, s.status) FROM crm_user_status s
                  WHERE s.enterprise_number = $1 AND s.integration_type = $2),
                '{}'::jsonb) AS statuses
"""


# Rows of the live paths' audit log (daemon/auditlog.py), many at once; JSON as text.
INSERT_LOGS = """
INSERT INTO integration_logs (enterprise_number, integration_type, event_type, request_data,
                              response_data, status, error_message)
SELECT l.enterprise_number, l.integration_type, l.event_type, l.request_data::jsonb,
       l.response_data::jsonb, l.status, l.error_message
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
              $7::text[])
    AS l(enterprise_number, integration_type, event_type, request_data, response_data, status,
         error_message)
"""


async def pbx_line(db: Executor, enterprise: str) -> tuple[str | None, list[str]] | None:
    """``(enterprises.secret, internal numbers)`` of ``enterprise``; None: no such one."""
    row = await db.fetchrow(PBX_LINE, enterprise)
    if row is None:
        return None
    return row["secret"], list(row["numbers"])


async def put_user_status(db: Executor, enterprise: str, integration: str, user_id: str,
                          status: str) -> bool:
    """Store a manager's status; True when it changed (and so was NOTIFYed)."""
    changed = await db.fetchval(PUT_USER_STATUS, enterprise, integration, user_id, status)
    return changed is not None


async def user_statuses(db: Executor, enterprise: str, integration: str) -> dict[str, str]:
    """Every stored manager status of ``enterprise``: CRM user id → status."""
    rows = await db.fetch(USER_STATUSES, enterprise, integration)
    return {r["user_id"]: r["status"] for r in rows}


async def routing_directory(db: Executor, enterprise: str, integration: str
                            ) -> tuple[frozenset[str], dict[str, str]]:
    """``(internal numbers, statuses)`` of ``enterprise`` (see ``ROUTING_DIRECTORY``)."""
    row = await db.fetchrow(ROUTING_DIRECTORY, enterprise, integration)
    assert row is not None  # a SELECT without FROM always returns its one row
    return frozenset(row["numbers"]), dict(row["statuses"])


# ------------------------------------------------------------------ admin UI
# (sessions, the journal, one enterprise's diagnostics: sql/007_admin_sessions.sql)

# A new session; expired ones go in the same statement (the table stays small).
CREATE_ADMIN_SESSION = """
WITH gone AS (DELETE FROM crm_admin_sessions WHERE expires_at < now())
INSERT INTO crm_admin_sessions (id_hash, enterprise_number, integration_type, token_version,
                                expires_at)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
"""

# A live session with the integration's token_version as stored now (NULL: not configured,
# or not a plain non-negative integer — such a version voids every session, never an error).
ADMIN_SESSION = """
SELECT s.enterprise_number, s.token_version,
       CASE WHEN jsonb_typeof(e.integrations_config -> s.integration_type -> 'token_version')
                 = 'number'
             AND (e.integrations_config -> s.integration_type ->> 'token_version')
                 ~ '^[0-9]{1,9}$'
            THEN (e.integrations_config -> s.integration_type ->> 'token_version')::int
       END AS current_version
  FROM crm_admin_sessions s
  LEFT JOIN enterprises e ON e.number = s.enterprise_number
 WHERE s.id_hash = $1 AND s.integration_type = $2 AND s.expires_at > now()
"""

DELETE_ADMIN_SESSION = "DELETE FROM crm_admin_sessions WHERE id_hash = $1"

# The platform's own admin session (its ``session_token`` cookie), when its table exists.
PLATFORM_SESSION = """
SELECT enterprise_number FROM sessions WHERE session_token = $1
"""


async def create_admin_session(db: Executor, id_hash: bytes, enterprise: str, integration: str,
                               token_version: int, ttl_s: float) -> None:
    """Store a session by the hash of its id (never the id)."""
    await db.execute(CREATE_ADMIN_SESSION, id_hash, enterprise, integration, token_version,
                     ttl_s)


async def admin_session(db: Executor, id_hash: bytes, integration: str
                        ) -> asyncpg.Record | None:
    """``enterprise_number``, ``token_version``, ``current_version`` of a live session."""
    row: asyncpg.Record | None = await db.fetchrow(ADMIN_SESSION, id_hash, integration)
    return row


async def delete_admin_session(db: Executor, id_hash: bytes) -> None:
    """End a session now."""
    await db.execute(DELETE_ADMIN_SESSION, id_hash)


async def platform_session(db: Executor, token: str) -> str | None:
    """The enterprise of a platform session token (None: no such session)."""
    value: str | None = await db.fetchval(PLATFORM_SESSION, token)
    return value


# One page of an enterprise's deliveries, newest first, after the keyset cursor $3 (the
# last event_id shown). Each filter is NULL when not asked for. crm_deliveries_journal_idx
# makes the unfiltered page a backward index range scan of LIMIT rows, each joined to its
# event by primary key: the LATERAL subquery (OFFSET 0 keeps it from being flattened) holds
# the planner to that nested loop. A merge join it otherwise picks walks every newer event
# of every enterprise: 25 ms instead of 1 on 200,000 events (docs/benchmarks.md).
JOURNAL_PAGE = """
SELECT d.event_id, d.unique_id, d.status, d.attempts, d.last_error, d.next_attempt_at,
       d.delivered_at, e.event_type, e.origin, e.received_at, e.phone, e.call_type
  FROM crm_deliveries d
 CROSS JOIN LATERAL (
       SELECT e.event_type, e.origin, e.received_at, e.payload ->> 'Phone' AS phone,
              e.payload ->> 'CallType' AS call_type
         FROM crm_events e
        WHERE e.id = d.event_id
       OFFSET 0) e
 WHERE d.enterprise_number = $1 AND d.integration_type = $2
   AND ($3::bigint IS NULL OR d.event_id < $3)
   AND ($4::text IS NULL OR d.status = $4)
   AND ($5::text IS NULL OR e.event_type = $5)
   AND ($6::text IS NULL OR d.unique_id = $6)
   AND ($7::text IS NULL
        OR regexp_replace(coalesce(e.phone, ''), '[^0-9]', '', 'g') LIKE $7)
   AND ($8::timestamptz IS NULL OR e.received_at >= $8)
   AND ($9::timestamptz IS NULL OR e.received_at < $9)
 ORDER BY d.event_id DESC
 LIMIT $10
"""

# The same columns for given deliveries of the enterprises being watched (the live view).
JOURNAL_ROWS = """
SELECT d.enterprise_number, d.event_id, d.unique_id, d.status, d.attempts, d.last_error,
       d.next_attempt_at, d.delivered_at, e.event_type, e.origin, e.received_at, e.phone,
       e.call_type
  FROM crm_deliveries d
 CROSS JOIN LATERAL (
       SELECT e.event_type, e.origin, e.received_at, e.payload ->> 'Phone' AS phone,
              e.payload ->> 'CallType' AS call_type
         FROM crm_events e
        WHERE e.id = d.event_id
       OFFSET 0) e
 WHERE d.integration_type = $1 AND d.enterprise_number = ANY ($2::text[])
   AND (d.event_id > $3 OR d.event_id = ANY ($4::bigint[]))
 ORDER BY d.event_id
 LIMIT $5
"""

# The newest delivery of the integration (where a live view starts).
LAST_DELIVERY = """
SELECT coalesce(max(event_id), 0) FROM crm_deliveries WHERE integration_type = $1
"""

DELIVERY_ATTEMPTS = """
SELECT id, event_type, request_data, response_data, status, error_message, created_at
  FROM integration_logs
 WHERE enterprise_number = $1 AND integration_type = $2
   AND request_data ? 'event_id' AND (request_data ->> 'event_id') = $3::bigint::text
 ORDER BY id
 LIMIT $4
"""

REPLAY_DELIVERIES = """
WITH picked AS (
    UPDATE crm_deliveries d
       SET status = 'pending', attempts = 0, lease_expiries = 0, queued_at = now(),
           next_attempt_at = now(), last_error = NULL, locked_until = NULL, locked_by = NULL,
           steps_done = '{}'
     WHERE d.integration_type = $1 AND d.enterprise_number = $2
       AND d.event_id = ANY ($3::bigint[])
       AND d.status IN ('failed', 'skipped')
    RETURNING d.event_id
)
SELECT coalesce(array_agg(event_id ORDER BY event_id), '{}') FROM picked
"""

# One enterprise's queue: pending deliveries, the oldest due one's age, failed ones.
ENTERPRISE_QUEUE = """
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       coalesce(extract(epoch FROM now() - min(next_attempt_at)
                FILTER (WHERE status = 'pending' AND next_attempt_at <= now())), 0)::float8
           AS oldest_due_s,
       count(*) FILTER (WHERE status = 'failed') AS failed
  FROM crm_deliveries
 WHERE integration_type = $1 AND enterprise_number = $2 AND status IN ('pending', 'failed')
"""

LAST_LOG = """
SELECT event_type, error_message, created_at
  FROM integration_logs
 WHERE enterprise_number = $1 AND integration_type = $2 AND status = $3
 ORDER BY id DESC
 LIMIT 1
"""


async def journal_page(
    db: Executor, enterprise: str, integration: str, *, before: int | None,
    status: str | None, event_type: str | None, call: str | None, phone_like: str | None,
    since: datetime | None, until: datetime | None, limit: int,
) -> list[asyncpg.Record]:
    """One page of ``JOURNAL_PAGE`` (``phone_like`` a LIKE pattern of digits)."""
    rows: list[asyncpg.Record] = await db.fetch(
        JOURNAL_PAGE, enterprise, integration, before, status, event_type, call, phone_like,
        since, until, limit)
    return rows


async def journal_rows(db: Executor, integration: str, enterprises: Iterable[str], after: int,
                       event_ids: Iterable[int], limit: int) -> list[asyncpg.Record]:
    """Deliveries of ``enterprises`` newer than ``after`` or among ``event_ids``."""
    rows: list[asyncpg.Record] = await db.fetch(
        JOURNAL_ROWS, integration, list(enterprises), after, list(event_ids), limit)
    return rows


async def last_delivery(db: Executor, integration: str) -> int:
    """The highest event id delivered to ``integration`` (0: none)."""
    value: int = await db.fetchval(LAST_DELIVERY, integration)
    return value


async def delivery_attempts(db: Executor, enterprise: str, integration: str, event_id: int,
                            limit: int) -> list[asyncpg.Record]:
    """The ``integration_logs`` rows of one delivery's attempts, oldest first."""
    rows: list[asyncpg.Record] = await db.fetch(
        DELIVERY_ATTEMPTS, enterprise, integration, event_id, limit)
    return rows


async def replay_deliveries(db: Executor, integration: str, enterprise: str,
                            event_ids: Iterable[int]) -> list[int]:
    """Put the given settled (failed or skipped) deliveries of one enterprise back in the
    queue, and ring the doorbell; the ids that were."""
    ids: list[int] = list(await db.fetchval(REPLAY_DELIVERIES, integration, enterprise,
                                            list(event_ids)))
    if ids:
        await db.execute(RING)
    return ids


async def enterprise_queue(db: Executor, integration: str, enterprise: str) -> asyncpg.Record:
    """``pending``, ``oldest_due_s``, ``failed`` of one enterprise."""
    row: asyncpg.Record = await db.fetchrow(ENTERPRISE_QUEUE, integration, enterprise)
    return row


async def last_log(db: Executor, enterprise: str, integration: str, status: str
                   ) -> asyncpg.Record | None:
    """The newest ``integration_logs`` row of that status (``success`` or ``error``)."""
    row: asyncpg.Record | None = await db.fetchrow(LAST_LOG, enterprise, integration, status)
    return row
