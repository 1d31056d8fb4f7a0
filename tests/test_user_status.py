"""Managers' statuses (sql/006): stored per enterprise, written only when they change, and
every change notifies ``crm_config`` for that enterprise."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from daemon import store
from tests.support.seed import add_enterprise, notifications


async def test_a_change_is_stored_and_notified_a_repeat_is_not(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await add_enterprise(pool, "0367")
    async with notifications(database_url, "crm_config") as heard:
        assert await store.put_user_status(pool, "0367", "retailcrm", "2", "break")
        channel, payload = await asyncio.wait_for(heard.get(), 5)
        assert channel == "crm_config"
        assert json.loads(payload) == {"enterprise": "0367", "keys": ["retailcrm"],
                                       "fields": ["user_status"]}
        assert not await store.put_user_status(pool, "0367", "retailcrm", "2", "break")
        assert await store.put_user_status(pool, "0367", "retailcrm", "2", "free")
        _, payload = await asyncio.wait_for(heard.get(), 5)
        assert json.loads(payload)["enterprise"] == "0367"
        await asyncio.sleep(0.1)
        assert heard.empty()  # the repeated "break" sent nothing
    await store.put_user_status(pool, "0368", "retailcrm", "2", "dinner")
    await store.put_user_status(pool, "0367", "amocrm", "2", "away")
    assert await store.user_statuses(pool, "0367", "retailcrm") == {"2": "free"}
    numbers, statuses = await store.routing_directory(pool, "0367", "retailcrm")
    assert (numbers, statuses) == (frozenset(), {"2": "free"})


async def test_the_table_keeps_words_short_and_plain(pool: asyncpg.Pool) -> None:
    for status in ("Free; DROP TABLE x", "", "x" * 40):
        with pytest.raises(asyncpg.CheckViolationError):
            await store.put_user_status(pool, "0367", "retailcrm", "2", status)
