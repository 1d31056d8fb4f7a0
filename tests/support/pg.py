"""The test suite's PostgreSQL: one server per session, one cloned database per test.

Where the server comes from, first match wins:
1. ``TEST_DATABASE_URL`` (any reachable server; the role needs CREATEDB);
2. a Docker engine, when one answers: testcontainers' ``PostgresContainer``;
3. a throwaway local cluster (``daemon.pgcluster``) in a temporary directory, started as the
   ``postgres`` user when the suite runs as root.

The migrations are applied once into a template database; every test gets
``CREATE DATABASE … TEMPLATE`` of it (milliseconds), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from daemon import db
from daemon.migrate import find_sql_dir, load_migrations, migrate
from daemon.pgcluster import ThrowawayCluster

TEMPLATE = f"crm_template_{os.getpid()}"
_counter = itertools.count(1)


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _docker_available() -> bool:
    if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
        return False
    try:
        import docker  # testcontainers' dependency

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def server() -> Iterator[str]:
    """A superuser-ish URL of a server for this test session (see the module docstring)."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15", driver=None) as container:
            yield container.get_connection_url()
        return
    with tempfile.TemporaryDirectory(prefix="crm-bridge-test-pg-") as tmp:
        if os.geteuid() == 0:
            os.chmod(tmp, 0o755)
        cluster = ThrowawayCluster(os.path.join(tmp, "data"))
        try:
            yield cluster.start()
        finally:
            cluster.destroy()


async def _create_template(url: str) -> None:
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
        await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await admin.close()
    conn = await db.connect(with_database(url, TEMPLATE))
    try:
        await migrate(conn, load_migrations(find_sql_dir()))
    finally:
        await conn.close()


def create_template(url: str) -> None:
    """Migrate a fresh template database on the server (run once per session)."""
    asyncio.run(_create_template(url))


def drop_template(url: str) -> None:
    """Remove the template database (end of session)."""

    async def drop() -> None:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(drop())


async def clone(url: str, *, template: str | None = TEMPLATE) -> tuple[str, str]:
    """A new database (a copy of the template, or empty) → (its name, its URL)."""
    name = f"crm_test_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(url)
    try:
        source = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{source}')
    finally:
        await admin.close()
    return name, with_database(url, name)


async def drop(url: str, name: str) -> None:
    """Drop a test database, disconnecting whoever is still in it."""
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
