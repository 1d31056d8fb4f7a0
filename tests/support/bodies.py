"""Call-event bodies as the platform's Asterisk listener sends them (EVENTS.md)."""

from __future__ import annotations

from typing import Any


def dial(n: int | str, token: str = "tok0367", **extra: Any) -> dict[str, Any]:
    """An incoming dial of call ``1757772742.<n>`` ringing extension 150."""
    return {"Token": token, "UniqueId": f"1757772742.{n}", "CallType": 0,
            "Phone": "+375291112233", "Extensions": ["150"], "Trunk": "0001363", **extra}


def hangup(n: int | str, token: str = "tok0367") -> dict[str, Any]:
    """The answered hangup of call ``1757772742.<n>`` (``Extensions`` is ``[""]``, as often)."""
    return {"Token": token, "UniqueId": f"1757772742.{n}", "CallType": 0,
            "Phone": "+375291112233", "Extensions": [""], "CallStatus": "2",
            "StartTime": "2025-01-09 19:20:00", "EndTime": "2025-01-09 19:21:00"}
