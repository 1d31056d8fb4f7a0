"""How late the event loop runs: the one figure that says the process is out of CPU.

Every ``interval_s`` a timer is set and its lateness measured: how long ready work waited
for the loop. A few milliseconds is normal. Sustained lag near the attempt timeout means
attempts time out while they queue inside the process (and are retried: duplicates at the
CRM) — the sign to add an instance or lower ``CRM_BRIDGE_CONCURRENCY``. Exported as
``crm_bridge_event_loop_lag_seconds`` (the last look) and a histogram of every look.
"""

from __future__ import annotations

import asyncio

from daemon.metrics import Metrics

INTERVAL_S = 0.25


async def run(metrics: Metrics, stopping: asyncio.Event, interval_s: float = INTERVAL_S) -> None:
    """Measure the loop's lag every ``interval_s`` until ``stopping``."""
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        planned = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        lag = max(0.0, loop.time() - planned)
        metrics.loop_lag.set(lag)
        metrics.loop_lag_seconds.observe(lag)
