"""Events posted over HTTP: the platform's envelope and raw Asterisk bodies, validated and stored.

Two shapes are accepted (docs/events.md):

* the platform's envelope ``{"token", "uniqueId", "event_type", "raw", "record_url"?,
  "origin"?}`` — what its internal hop sends today;
* a raw Asterisk listener body (with ``Token`` and ``UniqueId``) posted to
  ``/api/events/{event_type}``.

Validation names the offending field (``FieldError``) and stores nothing. The body goes
into ``crm_events.payload`` exactly as received (the envelope's ``raw``). Event types the
platform sends but crm-bridge does not use are acknowledged and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from daemon import store
from daemon.cache import EnablementMatrix

STORED_TYPES = frozenset({"start", "dial", "bridge", "hangup", "download"})
IGNORED_TYPES = frozenset({"bridge_create", "bridge_leave", "bridge_destroy", "new_callerid"})
MAX_ID_LENGTH = 200
MAX_URL_LENGTH = 2000


class FieldError(ValueError):
    """A body field is missing or malformed; ``field`` names it (JSON-pointer-ish)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    """One validated event, ready to store."""

    token: str
    unique_id: str
    event_type: str
    payload: Mapping[str, Any]
    record_url: str | None
    origin: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """What happened to a posted event (the 202 answer's body)."""

    stored: bool
    event_id: int | None = None
    reason: str | None = None

    def body(self) -> dict[str, Any]:
        """The JSON answer."""
        out: dict[str, Any] = {"accepted": True, "stored": self.stored}
        if self.event_id is not None:
            out["event_id"] = self.event_id
        if self.reason:
            out["reason"] = self.reason
        return out


def _text(body: Mapping[str, Any], key: str, field: str, *, required: bool = True,
          numbers: bool = True) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise FieldError(field, "is required")
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not numbers:
            # 1796099999.60 as a JSON number is 1796099999.6: another call's id.
            raise FieldError(field, "must be a string (a call id as a JSON number loses "
                             "its trailing zeros)")
        value = str(value)  # Asterisk tokens sometimes arrive as numbers
    if not isinstance(value, str):
        raise FieldError(field, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH:
        raise FieldError(field, f"longer than {MAX_ID_LENGTH} characters")
    return value


def _event_type(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(field, "is required (one of: " + ", ".join(sorted(STORED_TYPES)) + ")")
    if value not in STORED_TYPES | IGNORED_TYPES:
        raise FieldError(field, f"unknown event type {value[:40]!r}")
    return value


def _record_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH:
        raise FieldError("record_url", "expected a URL string")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise FieldError("record_url", "expected an absolute http(s) URL")
    return value


def _origin(value: Any, event_type: str) -> str:
    if value is None or value == "":
        return "download" if event_type == "download" else "live"
    if not isinstance(value, str) or value not in {"live", "download"}:
        raise FieldError("origin", "expected 'live' or 'download'")
    return str(value)


def parse_envelope(body: Any) -> IncomingEvent | str:
    """Validate the platform's envelope; an ignored type comes back as its name (a str)."""
    if not isinstance(body, Mapping):
        raise FieldError("body", "expected a JSON object")
    event_type = _event_type(body.get("event_type"), "event_type")
    if event_type in IGNORED_TYPES:
        return event_type
    raw = body.get("raw")
    if not isinstance(raw, Mapping):
        raise FieldError("raw", "expected the Asterisk body as a JSON object")
    token = _text(body, "token", "token")
    unique_id = _text(body, "uniqueId", "uniqueId", numbers=False)
    assert token is not None and unique_id is not None
    return IncomingEvent(token, unique_id, event_type, dict(raw),
                         _record_url(body.get("record_url")),
                         _origin(body.get("origin"), event_type))


def parse_raw(event_type: str, body: Any) -> IncomingEvent | str:
    """Validate a raw Asterisk body posted to ``/api/events/{event_type}``."""
    event_type = _event_type(event_type, "event_type")
    if event_type in IGNORED_TYPES:
        return event_type
    if not isinstance(body, Mapping):
        raise FieldError("body", "expected a JSON object")
    token = _text(body, "Token", "Token")
    unique_id = _text(body, "UniqueId", "UniqueId", numbers=False)
    assert token is not None and unique_id is not None
    return IncomingEvent(token, unique_id, event_type, dict(body), None,
                         _origin(None, event_type))


class UnknownToken(LookupError):
    """No active enterprise has this Token."""


async def accept(pool: asyncpg.Pool, matrix: EnablementMatrix, event: IncomingEvent) -> Accepted:
    """Store ``event`` unless its enterprise has nothing enabled (decided without the DB).

    The Token names the enterprise by the rule of docs/events.md (``matrix.by_token``).
    Raises ``UnknownToken``, or ``AmbiguousToken`` when it names several active
    enterprises (nothing is stored). The insert is committed when this returns.
    """
    enterprise = matrix.by_token(event.token)
    if enterprise is None:
        raise UnknownToken(event.token)
    if not matrix.enabled(enterprise):
        return Accepted(stored=False, reason="no integration is enabled for this enterprise")
    event_id = await store.insert_event(
        pool, enterprise, event.event_type, event.unique_id, event.payload,
        event.record_url, event.origin,
    )
    if event_id is None:
        return Accepted(stored=False, reason="duplicate, or not used by any served integration")
    return Accepted(stored=True, event_id=event_id)
