"""The event-loop lag metric: a blocked loop shows, an idle one does not."""

from __future__ import annotations

import asyncio
import time

from daemon import loopwatch
from daemon.metrics import Metrics


def _sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    assert value is not None, name
    return value


def _looks_over_quarter_second(metrics: Metrics) -> float:
    name = "crm_bridge_event_loop_lag_seconds_observed"
    return (_sample(metrics, f"{name}_count")
            - _sample(metrics, f"{name}_bucket", {"le": "0.25"}))


async def test_a_blocked_loop_shows_as_lag() -> None:
    metrics = Metrics("t")
    stopping = asyncio.Event()
    watch = asyncio.create_task(loopwatch.run(metrics, stopping, interval_s=0.02))
    await asyncio.sleep(0.1)
    assert _sample(metrics, "crm_bridge_event_loop_lag_seconds") < 0.2, "on time when idle"
    assert _looks_over_quarter_second(metrics) == 0
    time.sleep(0.3)  # what a CPU-bound stretch does to every task of the process
    await asyncio.sleep(0.01)
    assert _looks_over_quarter_second(metrics) == 1, "the late timer was seen, once"
    stopping.set()
    await asyncio.wait_for(watch, 1)
