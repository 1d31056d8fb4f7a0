"""Migrations: empty database, pre-existing platform tables, re-runs, concurrent migrators."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from daemon import db, store
from daemon.migrate import MigrationError, find_sql_dir, load_migrations, migrate

OUR_TABLES = {"crm_events", "crm_deliveries", "crm_integrations", "crm_doorbell",
              "schema_migrations"}
PLATFORM_TABLES = {"enterprises", "users", "user_internal_phones", "sessions",
                   "integration_logs"}


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    return {r["tablename"] for r in rows}


async def _schema_fingerprint(conn: asyncpg.Connection) -> list[tuple[str, ...]]:
    rows = await conn.fetch(
        """SELECT table_name, column_name, data_type, coalesce(column_default, '')
             FROM information_schema.columns WHERE table_schema = 'public'
            ORDER BY 1, 2"""
    )
    return [tuple(r) for r in rows]


async def test_applies_on_an_empty_database(empty_database_url: str) -> None:
    conn = await db.connect(empty_database_url)
    try:
        applied = await migrate(conn, load_migrations(find_sql_dir()))
        assert [m.version for m in applied] == [m.version for m in load_migrations(find_sql_dir())]
        assert await _tables(conn) >= OUR_TABLES | PLATFORM_TABLES
        assert "call_events" not in await _tables(conn)
        again = await migrate(conn, load_migrations(find_sql_dir()))
        assert again == []
    finally:
        await conn.close()


async def test_keeps_existing_platform_tables_and_rows(empty_database_url: str) -> None:
    conn = await db.connect(empty_database_url)
    try:
        # The platform's own shapes: extra columns, no integrations_config yet, real rows,
        # and its call_events table, which crm-bridge must not touch.
        await conn.execute(
            """
            CREATE TABLE enterprises (number text PRIMARY KEY, name text, name2 text,
                secret text, active boolean DEFAULT true, ip text, host text,
                created_at timestamptz DEFAULT now());
            INSERT INTO enterprises (number, name, name2, secret, ip)
                 VALUES ('0367', 'Demo', '375291234567', 's3cr3t', '10.0.0.7');
            CREATE TABLE users (id serial PRIMARY KEY, first_name text, last_name text,
                email text UNIQUE);
            INSERT INTO users (first_name, last_name, email) VALUES ('Ann', 'Lee', 'a@x.by');
            CREATE TABLE user_internal_phones (id serial PRIMARY KEY,
                enterprise_number text, phone_number text, user_id int, password text);
            INSERT INTO user_internal_phones (enterprise_number, phone_number, user_id, password)
                 VALUES ('0367', '150', 1, 'sip-secret');
            CREATE TABLE call_events (id bigserial PRIMARY KEY, unique_id text, raw jsonb);
            INSERT INTO call_events (unique_id, raw) VALUES ('1.1', '{"a": 1}');
            """
        )
        before = await _schema_fingerprint(conn)
        await migrate(conn, load_migrations(find_sql_dir()))
        after = await _schema_fingerprint(conn)
        added = set(after) - set(before)
        assert not set(before) - set(after), "nothing of the platform's is altered or dropped"
        platform_added = {c for c in added if c[0] in {"enterprises", "users",
                                                        "user_internal_phones", "call_events"}}
        assert {c[:2] for c in platform_added} == {("enterprises", "integrations_config")}
        row = await conn.fetchrow("SELECT * FROM enterprises WHERE number = '0367'")
        assert (row["name"], row["secret"], row["ip"]) == ("Demo", "s3cr3t", "10.0.0.7")
        assert row["integrations_config"] == {}
        assert await conn.fetchval("SELECT count(*) FROM users") == 1
        assert await conn.fetchval("SELECT password FROM user_internal_phones") == "sip-secret"
        assert await conn.fetchval("SELECT raw FROM call_events") == {"a": 1}
        assert await migrate(conn, load_migrations(find_sql_dir())) == []
    finally:
        await conn.close()


async def _phone_indexes(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'user_internal_phones'")
    return {r["indexname"] for r in rows}


async def test_internal_numbers_are_read_by_index(empty_database_url: str) -> None:
    """sql/008: an enterprise's numbers by index, not by a scan of every enterprise's."""
    conn = await db.connect(empty_database_url)
    try:
        await migrate(conn, load_migrations(find_sql_dir()))
        assert "crm_user_internal_phones_enterprise" in await _phone_indexes(conn)
        await conn.execute(
            """INSERT INTO user_internal_phones (enterprise_number, phone_number)
               SELECT lpad((n / 10)::text, 4, '0'), (100 + n % 10)::text
                 FROM generate_series(1, 20000) n;
               ANALYZE user_internal_phones""")
        plan = await conn.fetchval(
            "EXPLAIN " + store.INTERNAL_NUMBERS.strip().replace("$1", "'0367'"))
        assert "crm_user_internal_phones_enterprise" in plan, plan
    finally:
        await conn.close()


async def test_the_platforms_own_index_on_internal_numbers_is_kept_alone(
    empty_database_url: str,
) -> None:
    conn = await db.connect(empty_database_url)
    try:
        await conn.execute(
            """CREATE TABLE user_internal_phones (id serial PRIMARY KEY,
                   enterprise_number text, phone_number text, user_id int);
               CREATE INDEX uip_enterprise ON user_internal_phones (enterprise_number)""")
        await migrate(conn, load_migrations(find_sql_dir()))
        assert await _phone_indexes(conn) == {"user_internal_phones_pkey", "uip_enterprise"}
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused(empty_database_url: str) -> None:
    conn = await db.connect(empty_database_url)
    try:
        migrations = load_migrations(find_sql_dir())
        await migrate(conn, migrations)
        first = migrations[0]
        edited = [type(first)(first.version, first.name, first.sql + "\n-- edited"),
                  *migrations[1:]]
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


def _migrate_process(url: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CRM_BRIDGE_DATABASE_URL=url, CRM_BRIDGE_LOG_FORMAT="json")
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "migrate"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def test_two_concurrent_migrators_end_in_one_schema(empty_database_url: str) -> None:
    procs = [_migrate_process(empty_database_url) for _ in range(2)]
    results = await asyncio.gather(*(asyncio.to_thread(p.communicate) for p in procs))
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    conn = await db.connect(empty_database_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [
            m.version for m in load_migrations(find_sql_dir())
        ]
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'crm_events_fan_out'"
        ) == 1
    finally:
        await conn.close()
