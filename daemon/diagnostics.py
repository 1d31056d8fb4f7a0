"""One enterprise's health, as its administrator's **Диагностика** page shows it.

Gathers, for one enterprise and this process's integration: its queue (pending deliveries,
the oldest due one's age, failed ones), the guards (circuit breaker, deliveries in flight,
whether the rate limit holds it back now), its holds and configuration state from the
config cache, the last success and the last error recorded in ``integration_logs``, and
the listener. Three cheap, index-backed queries; everything else is read from memory.
Nothing here is a secret: error texts were masked when they were stored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from daemon import store
from daemon.runtime import Runtime


async def enterprise(rt: Runtime, number: str) -> dict[str, Any]:
    """The diagnostics of one enterprise (JSON-able; see the module docstring)."""
    name = rt.adapter.name
    queue = await store.enterprise_queue(rt.pool, name, number)
    last_ok = await store.last_log(rt.pool, number, name, "success")
    last_error = await store.last_log(rt.pool, number, name, "error")
    entry = rt.cache.get(number)
    guards = rt.guards.stats()
    breaker = guards["breakers"].get(number) if isinstance(guards["breakers"], dict) else None
    busy = guards["busy_enterprises"]
    in_flight = busy.get(number, 0) if isinstance(busy, dict) else 0
    blocked = number in rt.guards.blocked()
    return {
        "enterprise": number,
        "integration": name,
        "queue": {"pending": queue["pending"], "oldest_due_s": round(queue["oldest_due_s"], 1),
                  "failed": queue["failed"]},
        "breaker": breaker or {"state": "closed"},
        "in_flight": in_flight,
        "rate_limited": blocked and breaker is None and in_flight == 0,
        "rate_limits": guards["rate_limits"],
        "holds": dict(entry.holds) if entry is not None else {},
        "config": {
            "cached": entry is not None,
            "serving": entry.serves if entry is not None else False,
            "invalid": entry.invalid if entry is not None else None,
            "held": entry.held if entry is not None else None,
        },
        "last_success": _log(last_ok),
        "last_error": _log(last_error),
        "listener": ({"mode": "listen", **rt.listener.stats()} if rt.listener is not None
                     else {"mode": "poll-only"}),
        "cache": {"last_full_refresh_at": _epoch(rt.cache.last_full_refresh_at)},
    }


def _log(record: Any) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"event_type": record["event_type"], "error": record["error_message"],
            "at": record["created_at"].astimezone(UTC).isoformat(timespec="seconds")}


def _epoch(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
