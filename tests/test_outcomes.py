"""The outcome writer on its own: one statement settles and logs, fenced by lease; a batch
whose log rows the database refuses still settles; finishing a call's earlier delivery
signals that its next one is due."""

from __future__ import annotations

import asyncio

import asyncpg

from daemon import store
from daemon.logs import LogRow, OutcomeWriter, Settlement
from daemon.metrics import Metrics
from tests.support.bodies import dial, hangup
from tests.support.seed import add_enterprise, insert_event, register

INTEGRATION = "fakecrm"


async def _leased(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """A dial and a hangup of one call, the dial claimed under a lease."""
    await register(pool, INTEGRATION)
    await add_enterprise(pool, "0367", config={INTEGRATION: {"enabled": True}})
    await insert_event(pool, "dial", dial(1))
    await insert_event(pool, "hangup", hangup(1))
    return await store.claim(pool, INTEGRATION, 10, [], 30.0, "i:1", max_lease_expiries=3,
                             max_attempts=12, instance="i", ownership_s=15.0, takeover_s=0.0)


async def _write(pool: asyncpg.Pool, *settlements: Settlement) -> tuple[OutcomeWriter, int]:
    writer = OutcomeWriter(pool, INTEGRATION, Metrics(INTEGRATION))
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    writer.on_settled(wake)
    stopping = asyncio.Event()
    task = asyncio.create_task(writer.run(stopping))
    for settlement in settlements:
        writer.put(settlement)
    await asyncio.wait_for(writer.flushed(), 10)
    stopping.set()
    await asyncio.wait_for(task, 10)
    return writer, woken


def _row(request: object) -> LogRow:
    return LogRow(enterprise="0367", event_type="dial", request=request, response=[],
                  ok=True, error=None)


async def test_settles_logs_and_signals_the_next_delivery_of_the_call(
    pool: asyncpg.Pool,
) -> None:
    (claimed,) = await _leased(pool)  # the hangup waits behind its dial: not claimed
    writer, woken = await _write(
        pool,
        Settlement(claimed["event_id"], "i:1", "done", log=_row({"n": 1})),
        Settlement(claimed["event_id"], "someone-else:9", "failed", last_error="fenced"),
    )
    statuses = await pool.fetch(
        "SELECT e.event_type, d.status, d.locked_by FROM crm_deliveries d "
        "JOIN crm_events e ON e.id = d.event_id ORDER BY e.id")
    assert [tuple(r) for r in statuses] == [("dial", "done", None), ("hangup", "pending", None)]
    assert writer.fenced == 1, "a settlement under a lease it does not hold changes nothing"
    assert woken == 1, "the hangup is due now: the dispatcher is told"
    logs = await pool.fetch("SELECT request_data, status FROM integration_logs")
    assert [(r["request_data"], r["status"]) for r in logs] == [({"n": 1}, "success")]


async def test_a_log_row_the_database_refuses_does_not_stop_the_settlement(
    pool: asyncpg.Pool,
) -> None:
    (claimed,) = await _leased(pool)
    # jsonb has no NUL character: PostgreSQL refuses the row (a DataError).
    _writer, _woken = await _write(
        pool, Settlement(claimed["event_id"], "i:1", "done", log=_row({"x": "a\u0000b"})))
    assert await pool.fetchval(
        "SELECT status FROM crm_deliveries WHERE event_id = $1", claimed["event_id"]) == "done"
    assert await pool.fetchval("SELECT count(*) FROM integration_logs") == 0
