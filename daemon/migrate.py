"""Schema migrations: numbered plain-SQL files applied in order, once, under an advisory lock.

Files are ``sql/NNN_name.sql``. ``migrate`` takes a session-level advisory lock (so two
migrators at once are safe: the second waits, then finds nothing to do), applies every file
not yet recorded in ``schema_migrations``, each in its own transaction together with its
record, and refuses to go on when an applied file was edited afterwards (its checksum
changed): a migration, once applied somewhere, is history.

Where the files are: ``CRM_BRIDGE_SQL_DIR`` when set; else ``sql/`` of the checkout this
package runs from; else ``<prefix>/share/crm-bridge/sql`` where ``pip install`` puts them.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# An arbitrary, fixed 64-bit key: every crm-bridge migrator contends for the same lock.
MIGRATION_LOCK_KEY = 0x63726D5F6D696772  # "crm_migr"
_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The migrations cannot be applied as they are (edited, missing, or out of order)."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One file of ``sql/``."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def find_sql_dir(configured: str = "") -> Path:
    """The folder holding the migrations (see the module docstring for the search order)."""
    candidates = [Path(configured)] if configured else []
    candidates += [
        Path(__file__).resolve().parent.parent / "sql",
        Path(sys.prefix) / "share" / "crm-bridge" / "sql",
    ]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise MigrationError(
        "no migrations found; set CRM_BRIDGE_SQL_DIR to the sql/ folder "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def load_migrations(sql_dir: Path) -> list[Migration]:
    """Every migration file of ``sql_dir``, by version; a malformed name is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: expected a name like 001_description.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply what is missing; return the migrations applied by this call (empty: a no-op)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {r["version"]: r for r in rows}
        _check_history(migrations, applied)
        done: list[Migration] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            log.info("migration_applied", version=migration.version, name=migration.name)
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


def _check_history(migrations: list[Migration], applied: dict[int, asyncpg.Record]) -> None:
    known = {m.version: m for m in migrations}
    for version, row in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {version} ({row['name']}) that this version of "
                "crm-bridge does not know: is it older than the database?"
            )
        if migration.checksum != row["checksum"]:
            raise MigrationError(
                f"migration {version} ({row['name']}) was edited after it was applied; "
                "add a new migration instead"
            )


async def pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """The migrations not yet applied (without applying anything)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return list(migrations)
    versions = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m for m in migrations if m.version not in versions]
