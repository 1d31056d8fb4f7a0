"""The journal: one enterprise's deliveries, what each attempt sent and got, and replays.

What the admin pages' **Журнал**, ``GET /api/journal/{enterprise}`` and
``POST /api/deliveries/{enterprise}/replay`` show and do, in one place:

* :func:`parse_filter` validates the query (``status``, ``event_type``, ``phone``,
  ``call_id``, ``date``, ``before``, ``limit``); a bad value raises ``ConfigError`` naming
  the parameter;
* :func:`page` returns one page, newest first. Paging is by keyset: ``next`` is the last
  event id of the page and the next page asks for deliveries ``before`` it — an index range
  scan (``crm_deliveries_journal_idx``), never an ``OFFSET`` over the rows already seen;
* :func:`attempts` lists a delivery's ``integration_logs`` rows, masked once more on the way
  out (they were masked when written: this is the last line of defence);
* :func:`replay` puts failed (or skipped) deliveries of the enterprise back in the queue.

A row is a plain JSON-able dict (:func:`row`); :meth:`Filter.matches` decides whether a row
the live view receives belongs on a page filtered this way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

from daemon import store
from daemon.errors import ConfigError
from daemon.logs import mask
from daemon.store import Executor

STATUSES: Final = ("pending", "done", "failed", "skipped")
EVENT_TYPES: Final = ("start", "dial", "bridge", "hangup", "download")
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 200
MAX_ATTEMPTS_SHOWN: Final = 100
MAX_REPLAY: Final = 500
_CALL_ID = re.compile(r"^[0-9A-Za-z._-]{1,64}$")
_PHONE_MIN_DIGITS: Final = 3


@dataclass(frozen=True, slots=True)
class Filter:
    """A validated journal query (None: not filtered on that)."""

    status: str | None = None
    event_type: str | None = None
    phone: str | None = None  # digits; matches numbers ending with them
    call_id: str | None = None
    day: date | None = None
    before: int | None = None
    limit: int = DEFAULT_LIMIT

    @property
    def filtered(self) -> bool:
        """Whether any filter (not the paging) is set."""
        return any(v is not None for v in (self.status, self.event_type, self.phone,
                                           self.call_id, self.day))

    def matches(self, item: Mapping[str, Any]) -> bool:
        """Whether a :func:`row` belongs on a page filtered this way (paging aside)."""
        if self.status is not None and item["status"] != self.status:
            return False
        if self.event_type is not None and item["event_type"] != self.event_type:
            return False
        if self.call_id is not None and item["call_id"] != self.call_id:
            return False
        if self.phone is not None and not _digits(item["phone"] or "").endswith(self.phone):
            return False
        return self.day is None or item["received_at"][:10] == self.day.isoformat()

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for links to other pages of it)."""
        values = {"status": self.status, "event_type": self.event_type, "phone": self.phone,
                  "call_id": self.call_id, "date": self.day.isoformat() if self.day else None}
        return {k: v for k, v in values.items() if v is not None}


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def parse_filter(query: Mapping[str, str]) -> Filter:
    """A :class:`Filter` from query parameters; ``ConfigError`` names the bad one. Empty
    values mean "not filtered"."""
    get = {k: v.strip() for k, v in query.items() if isinstance(v, str) and v.strip()}
    status = get.get("status")
    if status is not None and status not in STATUSES:
        raise ConfigError("status", f"expected one of {', '.join(STATUSES)}")
    event_type = get.get("event_type")
    if event_type is not None and event_type not in EVENT_TYPES:
        raise ConfigError("event_type", f"expected one of {', '.join(EVENT_TYPES)}")
    phone = None
    if "phone" in get:
        phone = _digits(get["phone"])
        if len(phone) < _PHONE_MIN_DIGITS or len(phone) > 20:
            raise ConfigError("phone", "expected 3 to 20 digits of the number")
    call_id = get.get("call_id")
    if call_id is not None and not _CALL_ID.match(call_id):
        raise ConfigError("call_id", "expected a call id such as 1757772742.60")
    return Filter(status=status, event_type=event_type, phone=phone, call_id=call_id,
                  day=_day(get.get("date")), before=_int(get, "before", 1, 2**63 - 1),
                  limit=_int(get, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT)


def _day(raw: str | None) -> date | None:
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ConfigError("date", "expected a date as YYYY-MM-DD") from None


def _int(get: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = get.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ConfigError(name, f"expected a whole number from {low} to {high}")
    return int(raw)


def row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One delivery as the journal shows it (JSON-able)."""
    return {
        "event_id": record["event_id"], "call_id": record["unique_id"],
        "event_type": record["event_type"], "status": record["status"],
        "attempts": record["attempts"], "phone": record["phone"] or "",
        "origin": record["origin"], "received_at": _iso(record["received_at"]),
        "delivered_at": _iso(record["delivered_at"]),
        "next_attempt_at": _iso(record["next_attempt_at"])
        if record["status"] == "pending" else None,
        "last_error": record["last_error"],
        "replayable": record["status"] in ("failed", "skipped"),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat(timespec="seconds")


async def page(db: Executor, enterprise: str, integration: str, where: Filter
               ) -> dict[str, Any]:
    """``{"items": [...], "next": cursor or None}``: one page, newest first."""
    since = until = None
    if where.day is not None:
        since = datetime.combine(where.day, time.min, tzinfo=UTC)
        until = since + timedelta(days=1)
    records = await store.journal_page(
        db, enterprise, integration, before=where.before, status=where.status,
        event_type=where.event_type, call=where.call_id,
        phone_like=f"%{where.phone}" if where.phone else None, since=since, until=until,
        limit=where.limit + 1)
    items = [row(r) for r in records[:where.limit]]
    more = len(records) > where.limit
    return {"items": items, "next": str(items[-1]["event_id"]) if more and items else None}


async def attempts(db: Executor, enterprise: str, integration: str, event_id: int,
                   secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """A delivery's attempts (request and response as logged, masked again)."""
    hidden = tuple(secrets)
    records = await store.delivery_attempts(db, enterprise, integration, event_id,
                                            MAX_ATTEMPTS_SHOWN)
    return [{
        "id": r["id"], "event_type": r["event_type"], "status": r["status"],
        "created_at": _iso(r["created_at"]),
        "error": mask(r["error_message"], hidden) if r["error_message"] else None,
        "request": mask(r["request_data"], hidden), "response": mask(r["response_data"], hidden),
    } for r in records]


def parse_replay(body: Any) -> list[int]:
    """The event ids of a replay request ``{"event_ids": [..]}``; ``ConfigError`` names
    the field."""
    if not isinstance(body, Mapping) or "event_ids" not in body:
        raise ConfigError("event_ids", "is required: a list of delivery ids")
    ids = body["event_ids"]
    if not isinstance(ids, list) or not ids or len(ids) > MAX_REPLAY:
        raise ConfigError("event_ids", f"expected a list of 1 to {MAX_REPLAY} delivery ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids):
        raise ConfigError("event_ids", "expected positive whole numbers")
    return sorted(set(ids))


async def replay(db: Executor, enterprise: str, integration: str, event_ids: Iterable[int]
                 ) -> list[int]:
    """Failed or skipped deliveries of this enterprise among ``event_ids``, queued again
    (fresh attempts and age); the ids that were. Others (pending, done, another
    enterprise's) are left alone."""
    return await store.replay_deliveries(db, integration, enterprise, event_ids)
