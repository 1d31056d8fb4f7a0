"""Call-event bodies as the platform's Asterisk listener sends them (docs/events.md)."""

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

# A call whose events disagree (docs/events.md, "When the events of a call disagree"), as the
# platform recorded it: start and dial say incoming (CallType "0" from the dialplan, 0 from
# the listener) with the customer's 12-digit number; the customer's trunk channel and
# extension 151 enter one bridge; 40 s later the hangup says CallType 2 (internal) and
# CallStatus "0" (not answered). It was an incoming call, answered by 151.
SPLIT_UID = "1757841115.60"
SPLIT_START = {"Token": TOKEN, "UniqueId": SPLIT_UID, "CallType": "0", "Phone": "375291112233",
               "Trunk": "0001363"}
SPLIT_DIAL = {"Token": TOKEN, "UniqueId": SPLIT_UID, "CallType": 0, "Phone": "375291112233",
              "Extensions": ["150", "151", "152"], "Trunk": "0001363",
              "ExtPhone": "375291112233"}
SPLIT_BRIDGE_TRUNK = {"Token": TOKEN, "UniqueId": SPLIT_UID, "Channel": "SIP/0001363-00000019",
                      "Exten": "0001363", "CallerIDNum": "375291112233",
                      "CallerIDName": "<unknown>", "ConnectedLineNum": "151",
                      "ConnectedLineName": "<unknown>",
                      "BridgeUniqueid": "2f0c4d1e-7a8b-4c3d-9e0f-5a6b7c8d9e01"}
SPLIT_BRIDGE_151 = {"Token": TOKEN, "UniqueId": SPLIT_UID, "Channel": "SIP/151-0000001a",
                    "Exten": "151", "CallerIDNum": "151", "CallerIDName": "151",
                    "ConnectedLineNum": "375291112233", "ConnectedLineName": "<unknown>",
                    "BridgeUniqueid": "2f0c4d1e-7a8b-4c3d-9e0f-5a6b7c8d9e01"}
SPLIT_HANGUP = {"Token": TOKEN, "UniqueId": SPLIT_UID, "CallType": 2, "Phone": "375291112233",
                "Extensions": [""], "Trunk": "0001363", "DateReceived": "2025-09-14 12:11:55",
                "StartTime": "2025-09-14 12:12:07", "EndTime": "2025-09-14 12:12:47",
                "CallStatus": "0"}
