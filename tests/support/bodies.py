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


# One real answered incoming call of docs/events.md (1757772742.60): its start, its dial to
# three managers and a mobile, and the bridge of its trunk leg. Both the parser's tests and
# the RetailCRM mapping's tests build their call sequences from these.
UID = "1757772742.60"
TOKEN = "375291234567"
START = {"Token": TOKEN, "UniqueId": UID, "CallType": 0, "Phone": "+375291112233",
         "Trunk": "0001363"}
DIAL_IN = {"Token": TOKEN, "UniqueId": UID, "CallType": 0, "Phone": "+375291112233",
           "Extensions": ["150", "151", "152", "375297778899"], "Trunk": "0001363",
           "ExtPhone": "+375291112233"}
BRIDGE_TRUNK = {"Token": TOKEN, "UniqueId": UID, "Channel": "SIP/0001363-0000001b",
                "Exten": "0001363", "CallerIDNum": "375291112233", "CallerIDName": "<unknown>",
                "ConnectedLineNum": "151", "ConnectedLineName": "<unknown>",
                "BridgeUniqueid": "6d9f0b8e-3c1a-4e53-9a57-2b9a1b7c0d11"}
