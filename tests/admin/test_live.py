"""The journal's live view: server-sent events fed by the doorbell and the outcome writer.
A call event inserted by a call service reaches an open page, then its new state; another
enterprise's events and rows outside the page's filter do not."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg

from tests.admin.conftest import PREFIX, A, B, Bridge, Browser
from tests.support.seed import insert_event


@asynccontextmanager
async def live(browser: Browser, bridge: Bridge, enterprise: str = A, query: str = ""
               ) -> AsyncIterator[asyncio.Queue[tuple[str, Any]]]:
    """An open live view; yields a queue of (event name, data)."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    response = await browser.http.get(
        f"{bridge.url}{PREFIX}/{enterprise}/journal/live{query}",
        timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")

    async def read() -> None:
        name = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                queue.put_nowait((name, json.loads(line[6:])))
            elif line == ": watching":
                queue.put_nowait(("open", None))

    reader = asyncio.create_task(read())
    try:
        assert (await asyncio.wait_for(queue.get(), 5))[0] == "open"
        yield queue
    finally:
        reader.cancel()
        response.close()


def hangup(enterprise: str, uid: str) -> dict[str, Any]:
    return {"Token": f"tok{enterprise}", "UniqueId": uid, "CallType": 0,
            "Phone": "+375291234567", "Extensions": [""], "CallStatus": "0",
            "DateReceived": "2025-01-09 19:19:50"}


async def test_a_new_call_event_and_its_new_state_reach_an_open_page(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    await browser.sign_in(bridge, A)
    async with live(browser, bridge) as events:
        await insert_event(pool, "hangup", hangup(B, "1757772742.90"))  # not A's
        started = time.monotonic()
        await insert_event(pool, "hangup", hangup(A, "1757772742.91"))
        name, first = await asyncio.wait_for(events.get(), 5)
        assert name == "delivery" and first["call_id"] == "1757772742.91"
        assert time.monotonic() - started < 1.0
        assert "enterprise" not in first and first["status"] in ("pending", "done")
        states = [first["status"]]
        while states[-1] != "done":
            name, item = await asyncio.wait_for(events.get(), 5)
            assert item["call_id"] == "1757772742.91"  # B's never shows
            states.append(item["status"])
        assert states[-1] == "done"


async def test_a_filtered_page_gets_only_matching_rows(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    await browser.sign_in(bridge, A)
    async with live(browser, bridge, query="?call_id=1757772742.93") as events:
        await insert_event(pool, "hangup", hangup(A, "1757772742.92"))
        await insert_event(pool, "hangup", hangup(A, "1757772742.93"))
        _name, item = await asyncio.wait_for(events.get(), 5)
        assert item["call_id"] == "1757772742.93"


async def test_a_live_view_needs_the_enterprises_session(
    bridge: Bridge, browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{B}/journal/live") as response:
        assert response.status == 403
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/journal/live?status=x") as response:
        assert response.status == 400
