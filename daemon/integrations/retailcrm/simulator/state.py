"""What one simulated RetailCRM account holds: its users, and what it received.

Plain data and the constants the rest of the simulator shares: the rate limits, the
request log (:class:`RecordedRequest`, an API key kept only as its fingerprint), what the
account received (:class:`SimulatorState`), and plausible managers (:func:`make_users`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

RATE_WINDOW_S: Final = 1.0
RATE_LIMIT_GENERAL: Final = 10
RATE_LIMIT_TELEPHONY: Final = 40
TELEPHONY_PREFIX: Final = "/api/v5/telephony"
MAX_UPLOAD_BATCH: Final = 50
PAGE_LIMITS: Final = (20, 50, 100)
MAX_RECORDED_REQUESTS: Final = 200_000
DEFAULT_SCOPES: Final = (
    "integration_read", "integration_write", "telephony_read", "telephony_write",
    "user_read", "user_write",
)
WRONG_KEY_MSG: Final = 'Wrong "apiKey" value.'
RATE_LIMIT_MSG: Final = "Rate limit exceeded"
FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
USER_STATUSES: Final = frozenset({"free", "busy", "dinner", "break"})
CUSTOMER_NAME_KEYS: Final = frozenset({"firstName", "lastName", "nickName"})

_FIRST_NAMES: Final = ("Анна", "Иван", "Мария", "Олег", "Елена", "Сергей", "Ольга", "Павел")
_LAST_NAMES: Final = ("Иванова", "Петров", "Сидорова", "Козлов", "Новикова", "Морозов")


def key_fingerprint(key: str) -> str:
    """What the request log keeps of an API key: enough to tell keys apart, nothing more."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class RecordedRequest:
    """One API request received. The key itself is never kept: whether it was valid, and
    its fingerprint (``key_fingerprint``). ``fault`` names the fault it met, if any."""

    time: float
    monotonic: float
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, Any] = field(default_factory=dict)
    status: int | None = None
    key_ok: bool = False
    key_source: Literal["header", "query"] | None = None
    key_id: str | None = None
    fault: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request as ``GET /_requests`` lists it."""
        return {
            "time": self.time, "method": self.method, "path": self.path, "query": self.query,
            "form": self.form, "status": self.status, "key_ok": self.key_ok,
            "key_source": self.key_source, "key_id": self.key_id, "fault": self.fault,
        }


@dataclass(slots=True)
class SimulatorState:
    """What the account received; ``POST /_reset`` clears all of it."""

    requests: deque[RecordedRequest] = field(
        default_factory=lambda: deque(maxlen=MAX_RECORDED_REQUESTS)
    )
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_module_code: str | None = None
    call_events: list[dict[str, Any]] = field(default_factory=list)
    uploaded_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    statuses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def module(self) -> dict[str, Any] | None:
        """The module edited last (the usual case: one module per account)."""
        return self.modules.get(self.last_module_code) if self.last_module_code else None

    def to_json(self) -> dict[str, Any]:
        """Everything but the request log, as ``GET /_state`` shows it."""
        return {
            "module": self.module, "modules": self.modules, "call_events": self.call_events,
            "uploaded_calls": list(self.uploaded_calls.values()), "statuses": self.statuses,
        }

    def known_codes(self) -> dict[str, int]:
        """Every extension in the registered modules' ``additionalCodes``: code → user id."""
        codes: dict[str, int] = {}
        for module in self.modules.values():
            telephony = (module.get("integrations") or {}).get("telephony") or {}
            for entry in telephony.get("additionalCodes", []):
                codes[entry["code"]] = int(entry["userId"])
        return codes

    def code_of(self, user_id: int) -> str | None:
        """The extension a registered module gives ``user_id``, if any."""
        return next((c for c, uid in self.known_codes().items() if uid == user_id), None)


def make_users(count: int, *, start_id: int = 1) -> list[dict[str, Any]]:
    """``count`` plausible active managers with ids from ``start_id``, all free and online."""
    users = []
    for user_id in range(start_id, start_id + count):
        users.append({
            "id": user_id,
            "firstName": _FIRST_NAMES[user_id % len(_FIRST_NAMES)],
            "lastName": _LAST_NAMES[user_id % len(_LAST_NAMES)],
            "email": f"manager{user_id}@example.test",
            "phone": f"+7900{user_id:07d}",
        })
    return [normalize_user(user) for user in users]


def normalize_user(user: Mapping[str, Any]) -> dict[str, Any]:
    """A full user object from a partial one (``id`` required); ``ValueError`` if unusable."""
    user_id = user.get("id")
    if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
        raise ValueError(f"a user needs a positive int id, got {user_id!r}")
    status = user.get("status", "free")
    if status not in USER_STATUSES:
        raise ValueError(f"user {user_id}: status must be one of {sorted(USER_STATUSES)}")
    return {
        "id": user_id,
        "active": bool(user.get("active", True)),
        "email": str(user.get("email", f"user{user_id}@example.test")),
        "firstName": str(user.get("firstName", "User")),
        "lastName": str(user.get("lastName", str(user_id))),
        "patronymic": str(user.get("patronymic", "")),
        "phone": str(user.get("phone", "")),
        "status": status,
        "online": bool(user.get("online", True)),
        "isManager": bool(user.get("isManager", True)),
        "groups": list(user.get("groups", [])),
    }


def phone_digits(phone: str) -> str:
    """The digits of a phone number: the manager map matches on these alone."""
    return "".join(ch for ch in phone if ch.isdigit())
