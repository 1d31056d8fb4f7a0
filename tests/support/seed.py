"""Test data: enterprises, internal numbers, call-service inserts, notification capture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

# The call services' contract (docs/events.md), verbatim.
CALL_SERVICE_INSERT = """
INSERT INTO crm_events (event_type, payload, record_url, origin)
VALUES ($1, $2::jsonb, $3, coalesce($4, 'live'))
ON CONFLICT DO NOTHING
"""


async def add_enterprise(
    db: asyncpg.Pool | asyncpg.Connection,
    number: str,
    *,
    token: str | None = None,
    config: Mapping[str, Any] | None = None,
    active: bool = True,
) -> None:
    """Insert (or replace) an enterprise with ``integrations_config = config``."""
    await db.execute(
        """INSERT INTO enterprises (number, name, name2, secret, active, integrations_config)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (number) DO UPDATE SET name2 = EXCLUDED.name2,
               active = EXCLUDED.active, integrations_config = EXCLUDED.integrations_config""",
        number, f"Enterprise {number}", token or f"tok{number}", f"secret-{number}", active,
        dict(config or {}),
    )


async def register(db: asyncpg.Pool | asyncpg.Connection, name: str,
                   event_types: tuple[str, ...] = ("dial", "hangup", "download")) -> None:
    """Register an integration as served (what a daemon does at start-up)."""
    await db.execute(
        "INSERT INTO crm_integrations (integration_type, event_types) VALUES ($1, $2) "
        "ON CONFLICT (integration_type) DO UPDATE SET event_types = EXCLUDED.event_types",
        name, list(event_types),
    )


async def insert_event(
    db: asyncpg.Pool | asyncpg.Connection,
    event_type: str,
    body: Mapping[str, Any],
    *,
    record_url: str | None = None,
    origin: str | None = None,
) -> str:
    """Insert like a call service does; returns the command status (``INSERT 0 1``/``0 0``)."""
    status: str = await db.execute(
        CALL_SERVICE_INSERT, event_type, dict(body), record_url, origin
    )
    return status


async def insert_raw_event(
    url: str, event_type: str, body: str, *, record_url: str | None = None
) -> str:
    """Insert a body given as JSON text, on a plain connection (no JSON codec), as a call
    service written in any language would: what PostgreSQL accepts is stored as it is."""
    conn = await asyncpg.connect(url)
    try:
        status: str = await conn.execute(CALL_SERVICE_INSERT, event_type, body, record_url,
                                         None)
    finally:
        await conn.close()
    return status


@asynccontextmanager
async def notifications(url: str, *channels: str) -> AsyncIterator[asyncio.Queue[tuple[str, str]]]:
    """A separate connection LISTENing on ``channels``; yields a queue of (channel, payload)."""
    conn = await asyncpg.connect(url)
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(_c: object, _pid: int, channel: str, payload: str) -> None:
        queue.put_nowait((channel, payload))

    try:
        for channel in channels:
            await conn.add_listener(channel, on_notify)
        yield queue
    finally:
        await conn.close()
