"""RetailCRM mapping: whole calls, as the platform really sends them, to exact requests."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from daemon.calls import CallEvent, StoredEvent, parse_event
from daemon.integrations.retailcrm.events import MappingOptions, Plan, Skip, batches, plan
from tests.support.bodies import (
    BRIDGE_TRUNK,
    DIAL_IN,
    SPLIT_BRIDGE_151,
    SPLIT_BRIDGE_TRUNK,
    SPLIT_DIAL,
    SPLIT_HANGUP,
    SPLIT_START,
    SPLIT_UID,
    START,
    TOKEN,
    UID,
)

RECEIVED = datetime(2025, 9, 13, 14, 14, 6, tzinfo=UTC)
LINE = "+375173334455"
REC = "https://records.example.by/2025/09/13/1757772742.60.mp3"
MINSK = ZoneInfo("Europe/Minsk")

OPTIONS = MappingOptions(
    host_zone=MINSK,
    crm_zone=MINSK,
    user_extensions={"11": "150", "12": "151", "13": "152"},
    internal_numbers=frozenset({"150", "151", "152", "153"}),
    external_phones={"0001363": LINE},
)

# ---------------------------------------------------------------- real bodies

BRIDGE_151 = {"Token": TOKEN, "UniqueId": UID, "Channel": "SIP/151-0000001c", "Exten": "151",
              "CallerIDNum": "151", "CallerIDName": "151", "ConnectedLineNum": "375291112233",
              "ConnectedLineName": "<unknown>",
              "BridgeUniqueid": "6d9f0b8e-3c1a-4e53-9a57-2b9a1b7c0d11"}
HANGUP_IN = {"Token": TOKEN, "UniqueId": UID, "CallType": 0, "Phone": "+375291112233",
             "Extensions": [""], "Trunk": "0001363", "DateReceived": "2025-09-13 17:12:22",
             "StartTime": "2025-09-13 17:12:30", "EndTime": "2025-09-13 17:14:05",
             "CallStatus": "2", "_host": "ast-7"}
MISSED_IN = {**HANGUP_IN, "StartTime": "", "EndTime": "2025-09-13 17:12:52", "CallStatus": "0"}

DIAL_OUT = {"Token": TOKEN, "UniqueId": UID, "CallType": 1, "Phone": "80291234567",
            "Extensions": ["150"], "Trunk": "0001363", "ExtPhone": ""}
BRIDGE_OUT = {"Token": TOKEN, "UniqueId": UID, "Channel": "PJSIP/150-00000002", "Exten":
              "80291234567", "CallerIDNum": "150", "CallerIDName": "Иванов",
              "ConnectedLineNum": "80291234567", "ConnectedLineName": "<unknown>",
              "BridgeUniqueid": "0b1c"}
HANGUP_OUT = {"Token": TOKEN, "UniqueId": UID, "CallType": 1, "Phone": "80291234567",
              "Extensions": [""], "Trunk": "0001363", "DateReceived": "2025-09-13 10:00:00",
              "StartTime": "2025-09-13 10:00:12", "EndTime": "2025-09-13 10:03:12",
              "CallStatus": "2"}

DIAL_INTERNAL = {"Token": TOKEN, "UniqueId": UID, "CallType": 2, "Phone": "150",
                 "Extensions": ["151"], "Trunk": "", "ExtPhone": ""}
BRIDGE_INTERNAL = {"Token": TOKEN, "UniqueId": UID, "Channel": "SIP/150-00000031",
                   "CallerIDNum": "150", "ConnectedLineNum": "151",
                   "ConnectedLineName": "<unknown>", "BridgeUniqueid": "b-int"}
HANGUP_INTERNAL = {"Token": TOKEN, "UniqueId": UID, "CallType": 2, "Phone": "150",
                   "Extensions": ["151"], "Trunk": "", "DateReceived": "2025-09-13 11:00:00",
                   "StartTime": "2025-09-13 11:00:04", "EndTime": "2025-09-13 11:01:04",
                   "CallStatus": "2"}


def ev(id: int, event_type: str, body: dict[str, Any], *, record_url: str | None = None,
       origin: str = "live", received_at: datetime = RECEIVED) -> CallEvent:
    return parse_event(StoredEvent(id=id, event_type=event_type, unique_id=str(body["UniqueId"]),
                                   payload=body, record_url=record_url, origin=origin,
                                   received_at=received_at))


def options(**changes: Any) -> MappingOptions:
    return dataclasses.replace(OPTIONS, **changes)


def run(call: list[CallEvent], opts: MappingOptions = OPTIONS) -> dict[int, Plan]:
    """The plan of every event of ``call``, each seen with the whole call, by event id."""
    return {current.id: plan(current, call, opts) for current in call}


def incoming_answered() -> list[CallEvent]:
    return [ev(1, "start", START), ev(2, "dial", DIAL_IN), ev(3, "bridge", BRIDGE_TRUNK),
            ev(4, "bridge", BRIDGE_151), ev(5, "hangup", HANGUP_IN, record_url=REC)]


RING_IN = {"type": "in", "phone": "+375291112233", "codes": ["150", "151", "152"],
           "userIds": [11, 12, 13], "callExternalId": UID, "externalPhone": LINE}
HANGUP_EVENT = {"type": "hangup", "phone": "+375291112233", "codes": ["150", "151", "152"],
                "userIds": [11, 12, 13], "callExternalId": UID, "hangupStatus": "answered",
                "externalPhone": LINE}
UPLOAD_ANSWERED = {"date": "2025-09-13 17:12:30", "type": "in", "phone": "+375291112233",
                   "code": "151", "userId": 12, "result": "answered", "duration": 95,
                   "durationWaiting": 8, "externalId": UID, "recordUrl": REC,
                   "externalPhone": LINE}


# ---------------------------------------------------------------- whole calls


def test_incoming_answered_three_ringing() -> None:
    assert run(incoming_answered()) == {
        1: Plan(None, None, "no_request"),
        2: Plan(RING_IN, None, None),
        3: Plan(None, None, "no_request"),
        4: Plan(None, None, "no_request"),
        5: Plan(HANGUP_EVENT, UPLOAD_ANSWERED, None),
    }


def test_dial_planned_before_anything_else_arrived() -> None:
    dial = ev(2, "dial", DIAL_IN)
    assert plan(dial, [dial], OPTIONS) == Plan(RING_IN, None, None)
    assert plan(dial, [], OPTIONS) == Plan(RING_IN, None, None)  # current need not be in call


def test_answerer_from_trunk_side_only_when_agent_bridge_missing() -> None:
    call = [ev(2, "dial", DIAL_IN), ev(3, "bridge", BRIDGE_TRUNK), ev(5, "hangup", HANGUP_IN)]
    upload = plan(call[-1], call, OPTIONS).upload
    assert upload is not None
    assert (upload["code"], upload["userId"]) == ("151", 12)


def test_incoming_missed() -> None:
    call = [ev(1, "start", START), ev(2, "dial", DIAL_IN), ev(5, "hangup", MISSED_IN)]
    assert run(call)[5] == Plan(
        {**HANGUP_EVENT, "hangupStatus": "no answered"},
        {"date": "2025-09-13 17:12:22", "type": "in", "phone": "+375291112233",
         "code": "152", "userId": 13, "result": "no answer", "duration": 0,
         "durationWaiting": 30, "externalId": UID, "externalPhone": LINE},
        None,
    )


def test_missed_owner_is_the_last_ringing_manager_not_the_last_internal() -> None:
    dial = {**DIAL_IN, "Extensions": ["150", "151", "153", "375297778899"]}  # 153: no manager
    call = [ev(2, "dial", dial), ev(5, "hangup", MISSED_IN)]
    upload = plan(call[-1], call, OPTIONS).upload
    assert upload is not None
    assert (upload["code"], upload["userId"]) == ("151", 12)


def test_incoming_busy() -> None:
    call = [ev(2, "dial", DIAL_IN), ev(5, "hangup", {**MISSED_IN, "DialStatus": "BUSY"})]
    result = plan(call[-1], call, OPTIONS)
    assert result.event is not None
    assert result.event["hangupStatus"] == "busy"
    assert result.upload is not None
    assert result.upload["result"] == "busy"
    assert result.upload["duration"] == 0


@pytest.mark.parametrize(
    ("status", "extra", "hangup_status", "result"),
    [
        ("2", {}, "answered", "answered"),
        ("5", {}, "answered", "answered"),
        ("2", {"DialStatus": "BUSY"}, "answered", "answered"),
        ("0", {}, "no answered", "no answer"),
        ("0", {"DialStatus": "BUSY"}, "busy", "busy"),
        ("0", {"DialStatus": "CANCEL"}, "cancel", "no answer"),
        ("0", {"DialStatus": "NOANSWER"}, "no answered", "no answer"),
        ("0", {"Disposition": "NO ANSWER"}, "no answered", "no answer"),
        ("0", {"DialStatus": "CONGESTION"}, "failed", "failed"),
        ("0", {"DialStatus": "CHANUNAVAIL"}, "failed", "failed"),
        ("0", {"Disposition": "FAILED"}, "failed", "failed"),
        ("0", {"DialStatus": "ANSWER"}, "no answered", "no answer"),
        ("1", {}, "failed", "unknown"),
        ("1", {"DialStatus": "BUSY"}, "busy", "busy"),
        ("7", {}, "failed", "unknown"),
        (None, {}, "failed", "unknown"),
    ],
)
def test_status_mapping_and_upload_never_says_no_answered(
    status: str | None, extra: dict[str, str], hangup_status: str, result: str
) -> None:
    call = [ev(2, "dial", DIAL_IN), ev(5, "hangup", {**HANGUP_IN, "CallStatus": status, **extra})]
    planned = plan(call[-1], call, OPTIONS)
    assert planned.event is not None
    assert planned.upload is not None
    assert (planned.event["hangupStatus"], planned.upload["result"]) == (hangup_status, result)
    assert planned.upload["result"] != "no answered"
    assert planned.upload["duration"] == (95 if result == "answered" else 0)


def test_missing_call_status_with_a_bridge_is_answered() -> None:
    body = {k: v for k, v in HANGUP_IN.items() if k != "CallStatus"}
    call = [ev(2, "dial", DIAL_IN), ev(4, "bridge", BRIDGE_151), ev(5, "hangup", body)]
    upload = plan(call[-1], call, OPTIONS).upload
    assert upload is not None
    assert upload["result"] == "answered"


def test_outgoing() -> None:
    call = [ev(2, "dial", DIAL_OUT), ev(3, "bridge", BRIDGE_OUT), ev(4, "hangup", HANGUP_OUT)]
    assert run(call) == {
        2: Plan({"type": "out", "phone": "+375291234567", "codes": ["150"], "userIds": [11],
                 "callExternalId": UID, "externalPhone": LINE}, None, None),
        3: Plan(None, None, "no_request"),
        4: Plan(
            {"type": "hangup", "phone": "+375291234567", "codes": ["150"], "userIds": [11],
             "callExternalId": UID, "hangupStatus": "answered", "externalPhone": LINE},
            {"date": "2025-09-13 10:00:12", "type": "out", "phone": "+375291234567",
             "code": "150", "userId": 11, "result": "answered", "duration": 180,
             "durationWaiting": 12, "externalId": UID, "externalPhone": LINE},
            None,
        ),
    }


def test_outgoing_not_answered_keeps_the_caller_as_owner() -> None:
    hangup = {**HANGUP_OUT, "StartTime": "", "CallStatus": "0", "DialStatus": "NOANSWER",
              "EndTime": "2025-09-13 10:00:40"}
    call = [ev(2, "dial", DIAL_OUT), ev(4, "hangup", hangup)]
    assert plan(call[-1], call, OPTIONS).upload == {
        "date": "2025-09-13 10:00:00", "type": "out", "phone": "+375291234567", "code": "150",
        "userId": 11, "result": "no answer", "duration": 0, "durationWaiting": 40,
        "externalId": UID, "externalPhone": LINE}


def test_internal_call_skipped() -> None:
    call = [ev(2, "dial", DIAL_INTERNAL), ev(3, "bridge", BRIDGE_INTERNAL),
            ev(4, "hangup", HANGUP_INTERNAL)]
    assert run(call) == {2: Plan(None, None, "internal_call"), 3: Plan(None, None, "no_request"),
                         4: Plan(None, None, "internal_call")}


def test_internal_call_logged_as_history_only() -> None:
    call = [ev(2, "dial", DIAL_INTERNAL), ev(3, "bridge", BRIDGE_INTERNAL),
            ev(4, "hangup", HANGUP_INTERNAL)]
    assert run(call, options(log_internal=True)) == {
        2: Plan(None, None, "internal_call_no_popup"),
        3: Plan(None, None, "no_request"),
        4: Plan(None, {"date": "2025-09-13 11:00:04", "type": "out", "phone": "151",
                       "code": "150", "userId": 11, "result": "answered", "duration": 60,
                       "durationWaiting": 4, "externalId": UID}, None),
    }
    off = plan(call[-1], call, options(log_internal=True, upload_history=False))
    assert off == Plan(None, None, "upload_history_off")


def test_click_to_call_internal_leg_is_never_a_call() -> None:
    leg_id = "1757772800.11"
    leg_dial = {**DIAL_INTERNAL, "UniqueId": leg_id, "ExternalInitiated": True}
    leg_hangup = {**HANGUP_INTERNAL, "UniqueId": leg_id, "ExternalInitiated": "true"}
    leg = [ev(10, "dial", leg_dial), ev(11, "hangup", leg_hangup)]
    for opts in (OPTIONS, options(log_internal=True)):
        assert run(leg, opts) == {10: Plan(None, None, "click_to_call_leg"),
                                  11: Plan(None, None, "click_to_call_leg")}


def test_click_to_call_outside_leg_is_an_outgoing_call() -> None:
    call = [ev(12, "dial", {**DIAL_OUT, "ExternalInitiated": "1"}),
            ev(13, "hangup", {**HANGUP_OUT, "ExternalInitiated": True})]
    planned = run(call)
    assert planned[12].event is not None
    assert planned[12].event["type"] == "out"
    assert planned[13].upload is not None
    assert planned[13].upload["type"] == "out"


def test_click_to_call_leg_sharing_the_unique_id_with_the_outside_leg() -> None:
    # the leg rings 151 here only to prove that a leg's dial does not count as ringing
    leg = ev(2, "dial", {**DIAL_INTERNAL, "ExternalInitiated": True})
    out = ev(3, "dial", {**DIAL_OUT, "ExternalInitiated": True})
    hangup = ev(4, "hangup", {**HANGUP_OUT, "ExternalInitiated": True})
    planned = run([leg, out, hangup])
    assert planned[2] == Plan(None, None, "click_to_call_leg")
    assert planned[3].event is not None
    assert planned[3].event["codes"] == ["150"]
    assert planned[4].event is not None
    assert planned[4].event["codes"] == ["150"]
    assert planned[4].upload is not None
    assert planned[4].upload["code"] == "150"


def test_transfer_last_bridged_internal_names_the_upload() -> None:
    opts = options(user_extensions={**OPTIONS.user_extensions, "14": "153"})
    second_dial = {**DIAL_IN, "Extensions": ["153"], "_transfer_from": "151"}
    bridge_153 = {**BRIDGE_151, "Channel": "SIP/153-0000002f", "Exten": "153",
                  "CallerIDNum": "153", "CallerIDName": "153", "BridgeUniqueid": "b2"}
    hangup = {**HANGUP_IN, "InternalCode": "151"}
    call = [ev(2, "dial", {**DIAL_IN, "Extensions": ["150", "151"]}),
            ev(3, "bridge", BRIDGE_151), ev(4, "dial", second_dial), ev(5, "bridge", bridge_153),
            ev(6, "hangup", hangup, record_url=REC)]
    planned = run(call, opts)
    assert planned[4] == Plan({**RING_IN, "codes": ["153"], "userIds": [14]}, None, None)
    assert planned[6] == Plan(
        {**HANGUP_EVENT, "codes": ["150", "151", "153"], "userIds": [11, 12, 14]},
        {**UPLOAD_ANSWERED, "code": "153", "userId": 14},
        None,
    )


def test_hangup_without_dial_takes_codes_from_itself() -> None:
    answered = ev(5, "hangup", {**HANGUP_IN, "InternalCode": "152"})
    expected_upload = {k: v for k, v in UPLOAD_ANSWERED.items() if k != "recordUrl"}
    assert plan(answered, [answered], OPTIONS) == Plan(
        {**HANGUP_EVENT, "codes": ["152"], "userIds": [13]},
        {**expected_upload, "code": "152", "userId": 13},
        None,
    )
    missed = ev(5, "hangup", {**MISSED_IN, "Extensions": ["", "150"]})
    result = plan(missed, [missed], OPTIONS)
    assert result.event is not None
    assert result.event["codes"] == ["150"]
    assert result.upload is not None
    assert (result.upload["code"], result.upload["userId"]) == (
        "150", 11)


def test_hangup_nobody_to_notify_still_uploads() -> None:
    hangup = ev(5, "hangup", MISSED_IN)
    assert plan(hangup, [hangup], OPTIONS) == Plan(
        None,
        {"date": "2025-09-13 17:12:22", "type": "in", "phone": "+375291112233",
         "result": "no answer", "duration": 0, "durationWaiting": 30, "externalId": UID,
         "externalPhone": LINE},
        None,
    )


@pytest.mark.parametrize(("event_type", "origin"), [("download", "download"),
                                                    ("hangup", "download")])
def test_download_recovery_uploads_only(event_type: str, origin: str) -> None:
    call = [ev(2, "dial", DIAL_IN), ev(3, "bridge", BRIDGE_151),
            ev(9, event_type, HANGUP_IN, record_url=REC, origin=origin)]
    assert plan(call[-1], call, OPTIONS) == Plan(None, UPLOAD_ANSWERED, None)
    assert plan(call[-1], call, options(popup_hangup=False)) == Plan(None, UPLOAD_ANSWERED, None)
    assert plan(call[-1], call, options(upload_history=False)) == Plan(
        None, None, "upload_history_off")


def test_download_after_a_live_hangup_uploads_the_same_item() -> None:
    call = [*incoming_answered(), ev(9, "download", {**HANGUP_IN, "CallStatus": "0"},
                                     origin="download")]
    assert plan(call[-1], call, OPTIONS) == Plan(None, UPLOAD_ANSWERED, None)


def test_duplicated_and_out_of_order_events() -> None:
    hangup = ev(3, "hangup", HANGUP_IN, record_url=REC)
    late_dial = ev(4, "dial", DIAL_IN)
    late_bridge = ev(5, "bridge", BRIDGE_151)
    repeat = ev(6, "dial", {**DIAL_IN, "_retry": 2})  # same body but for an _ key
    call = [late_bridge, repeat, hangup, late_dial, hangup]
    planned = {e.id: plan(e, call, OPTIONS) for e in call}
    assert planned[4] == Plan(None, None, "late_dial")
    assert planned[6] == Plan(None, None, "duplicate")
    assert planned[3] == Plan(HANGUP_EVENT, UPLOAD_ANSWERED, None)  # later rows fold in


def test_repeated_dial_pops_up_once() -> None:
    first, again = ev(2, "dial", DIAL_IN), ev(7, "dial", {**DIAL_IN, "_seq": 8})
    assert plan(first, [first, again], OPTIONS) == Plan(RING_IN, None, None)
    assert plan(again, [first, again], OPTIONS) == Plan(None, None, "duplicate")


def test_call_type_as_string_maps_the_same() -> None:
    bodies: list[dict[str, Any]] = [START, DIAL_IN, BRIDGE_TRUNK, BRIDGE_151, HANGUP_IN]
    as_strings = [
        ev(e.id, e.event_type, {**body, "CallType": "0"} if "CallType" in body else body,
           record_url=e.record_url)
        for e, body in zip(incoming_answered(), bodies, strict=True)
    ]
    assert [e.call_type for e in as_strings] == [e.call_type for e in incoming_answered()]
    assert run(as_strings) == run(incoming_answered())


def test_call_type_taken_from_the_call_when_the_event_lacks_it() -> None:
    hangup = {k: v for k, v in HANGUP_IN.items() if k != "CallType"}
    call = [ev(2, "dial", DIAL_IN), ev(4, "bridge", BRIDGE_151), ev(5, "hangup", hangup)]
    upload = plan(call[-1], call, OPTIONS).upload
    assert upload is not None
    assert upload["type"] == "in"


def test_no_call_type_anywhere_is_skipped_with_a_reason_never_raised() -> None:
    # Until issue 11 this raised MalformedEvent("CallType"): a dead letter nobody could fix
    # by replaying. A call nothing gives a direction is now skipped, and a dial carrying
    # ExtPhone (only incoming dials do) is incoming.
    hangup = ev(5, "hangup", {k: v for k, v in HANGUP_IN.items() if k != "CallType"})
    assert plan(hangup, [hangup], OPTIONS) == Plan(None, None, "no_direction")
    dial = ev(2, "dial", {k: v for k, v in DIAL_IN.items() if k != "CallType"})
    assert plan(dial, [dial], OPTIONS) == Plan(RING_IN, None, None)


# ---------------------------------------------------------------- calls whose events disagree

SPLIT_PHONE = "+375291112233"
SPLIT_HANGUP_EVENT = {"type": "hangup", "phone": SPLIT_PHONE, "codes": ["150", "151", "152"],
                      "userIds": [11, 12, 13], "callExternalId": SPLIT_UID,
                      "hangupStatus": "answered", "externalPhone": LINE}
SPLIT_UPLOAD = {"date": "2025-09-14 12:12:07", "type": "in", "phone": SPLIT_PHONE,
                "code": "151", "userId": 12, "result": "answered", "duration": 40,
                "durationWaiting": 12, "externalId": SPLIT_UID, "externalPhone": LINE}
SPLIT = [(1, "start", SPLIT_START), (2, "dial", SPLIT_DIAL), (3, "bridge", SPLIT_BRIDGE_TRUNK),
         (4, "bridge", SPLIT_BRIDGE_151), (5, "hangup", SPLIT_HANGUP)]
BRIDGE_153 = {**BRIDGE_151, "Channel": "SIP/153-0000002f", "Exten": "153", "CallerIDNum": "153",
              "CallerIDName": "153", "BridgeUniqueid": "b2"}
CONSULT_151_153 = {**BRIDGE_151, "ConnectedLineNum": "153", "BridgeUniqueid": "b3"}
MISSED_EVENT = {**HANGUP_EVENT, "hangupStatus": "no answered"}
MISSED_UPLOAD = {"date": "2025-09-13 17:12:22", "type": "in", "phone": "+375291112233",
                 "code": "152", "userId": 13, "result": "no answer", "duration": 0,
                 "durationWaiting": 30, "externalId": UID, "externalPhone": LINE}
LATER = datetime(2025, 9, 13, 14, 20, 0, tzinfo=UTC)
NO_TIMES = {"DateReceived": "", "StartTime": "", "EndTime": ""}


def no(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


Row = tuple[int, str, dict[str, Any]] | tuple[int, str, dict[str, Any], dict[str, Any]]


@pytest.mark.parametrize(
    ("rows", "current", "expected"),
    [
        # Direction: the first start's or dial's CallType wins; the hangup's CallType 2 on an
        # incoming call with the customer's number is ignored. Answered: CallStatus "0", but
        # the customer was bridged with 151 for 40 s.
        pytest.param(SPLIT, 5, Plan(SPLIT_HANGUP_EVENT, SPLIT_UPLOAD, None),
                     id="hangup-says-internal-and-not-answered-after-a-bridge-with-151"),
        pytest.param([(5, "hangup", {**HANGUP_OUT, "Extensions": ["150"]})], 5, Plan(
            {"type": "hangup", "phone": "+375291234567", "codes": ["150"], "userIds": [11],
             "callExternalId": UID, "hangupStatus": "answered", "externalPhone": LINE},
            {"date": "2025-09-13 10:00:12", "type": "out", "phone": "+375291234567",
             "code": "150", "userId": 11, "result": "answered", "duration": 180,
             "durationWaiting": 12, "externalId": UID, "externalPhone": LINE}, None),
            id="direction-from-the-hangup-when-no-start-or-dial-says-it"),
        pytest.param([(2, "dial", {**DIAL_IN, "CallType": 2})], 2, Plan(RING_IN, None, None),
                     id="direction-an-outside-phone-is-never-internal"),
        pytest.param([(2, "dial", DIAL_INTERNAL), (4, "hangup", HANGUP_INTERNAL)], 4,
                     Plan(None, None, "internal_call"),
                     id="direction-an-internal-phone-keeps-an-internal-call-internal"),
        pytest.param([(5, "hangup", no(HANGUP_IN, "CallType"))], 5,
                     Plan(None, None, "no_direction"),
                     id="no-direction-at-all-is-skipped-with-a-reason"),
        pytest.param([(1, "start", no(START, "CallType")), (5, "hangup", no(MISSED_IN,
                                                                           "CallType"))],
                     5, Plan(None, no(MISSED_UPLOAD, "code", "userId"), None),
                     id="no-call-type-anywhere-but-a-start-means-incoming"),
        pytest.param([(2, "dial", DIAL_IN), (4, "bridge", BRIDGE_151),
                       (5, "hangup", {**HANGUP_IN, "CallStatus": "0"})], 5,
                     Plan(HANGUP_EVENT, no(UPLOAD_ANSWERED, "recordUrl"), None),
                     id="answered-the-customer-bridged-with-151-whatever-call-status-says"),
        pytest.param([(2, "dial", DIAL_IN), (4, "bridge", CONSULT_151_153),
                       (5, "hangup", MISSED_IN)], 5, Plan(MISSED_EVENT, MISSED_UPLOAD, None),
                     id="not-answered-a-bridge-of-two-extensions-without-the-customer"),
        pytest.param([(2, "dial", DIAL_IN), (3, "bridge", BRIDGE_151),
                       (4, "bridge", CONSULT_151_153), (6, "bridge", BRIDGE_153),
                       (7, "hangup", {**HANGUP_IN, "CallStatus": "0"})], 7,
                     Plan({**HANGUP_EVENT, "codes": ["150", "151", "152", "153"]},
                          {**no(UPLOAD_ANSWERED, "recordUrl", "userId"), "code": "153"}, None),
                     id="answered-the-last-extension-bridged-with-the-customer-after-a-transfer"),
        pytest.param([(3, "hangup", MISSED_IN), (4, "dial", DIAL_IN)], 3,
                     Plan(MISSED_EVENT, MISSED_UPLOAD, None),
                     id="out-of-order-a-hangup-stored-before-its-dial-names-the-manager"),
        pytest.param([(3, "hangup", HANGUP_IN), (4, "dial", DIAL_IN), (5, "bridge", BRIDGE_151)],
                     3, Plan(HANGUP_EVENT, no(UPLOAD_ANSWERED, "recordUrl"), None),
                     id="out-of-order-an-answered-hangup-stored-before-dial-and-bridge"),
        pytest.param([(3, "hangup", MISSED_IN), (4, "dial", DIAL_IN)], 4,
                     Plan(None, None, "late_dial"),
                     id="out-of-order-the-late-dial-opens-no-card"),
        pytest.param([(1, "start", {**START, "DateReceived": "2025-09-13 17:12:20"}),
                       (2, "dial", DIAL_IN), (4, "bridge", BRIDGE_151), (5, "hangup", HANGUP_IN)],
                     5, Plan(HANGUP_EVENT, no(UPLOAD_ANSWERED, "recordUrl"), None),
                     id="date-the-hangups-start-time-first"),
        pytest.param([(1, "start", {**START, "DateReceived": "2025-09-13 17:12:20"}),
                       (2, "dial", DIAL_IN), (5, "hangup", {**MISSED_IN, **NO_TIMES})], 5,
                     Plan(MISSED_EVENT, {**no(MISSED_UPLOAD, "durationWaiting"),
                                         "date": "2025-09-13 17:12:20"}, None),
                     id="date-the-earliest-time-any-event-of-the-call-carries"),
        pytest.param([(1, "start", START), (2, "dial", DIAL_IN),
                       (5, "hangup", {**MISSED_IN, **NO_TIMES}, {"received_at": LATER})], 5,
                     Plan(MISSED_EVENT, {**no(MISSED_UPLOAD, "durationWaiting"),
                                         "date": "2025-09-13 17:14:06"}, None),
                     id="date-when-the-calls-first-event-was-stored"),
    ],
)
def test_calls_whose_events_disagree(rows: list[Row], current: int, expected: Plan) -> None:
    call = [ev(r[0], r[1], r[2], **(r[3] if len(r) == 4 else {})) for r in rows]
    assert plan(next(e for e in call if e.id == current), call, OPTIONS) == expected


def test_the_split_call_maps_the_same_whatever_order_its_events_were_stored_in() -> None:
    for ids in itertools.permutations(range(1, len(SPLIT) + 1)):
        call = [ev(i, kind, body) for i, (_n, kind, body) in zip(ids, SPLIT, strict=True)]
        hangup = next(e for e in call if e.event_type == "hangup")
        planned = plan(hangup, call, OPTIONS)
        assert planned.upload == SPLIT_UPLOAD, ids
        assert planned.event is not None
        assert sorted(planned.event["codes"]) == ["150", "151", "152"], ids
        assert {**planned.event, "codes": None} == {**SPLIT_HANGUP_EVENT, "codes": None}, ids
        dial = next(e for e in call if e.event_type == "dial")
        expected = "late_dial" if hangup.id < dial.id else None
        assert plan(dial, call, OPTIONS).skipped == expected, ids


def test_a_transfer_dial_naming_the_transferring_extension_shows_the_customer() -> None:
    transfer = {**DIAL_IN, "CallType": 2, "Phone": "151", "Extensions": ["153"], "ExtPhone": ""}
    call = [ev(1, "start", START), ev(2, "dial", DIAL_IN), ev(3, "bridge", BRIDGE_151),
            ev(4, "dial", transfer)]
    assert plan(call[-1], call, OPTIONS) == Plan({**RING_IN, "codes": ["153"], "userIds": []},
                                                 None, None)


# ---------------------------------------------------------------- dates and durations


@pytest.mark.parametrize(
    ("host", "crm", "start", "end", "date", "duration"),
    [
        ("Europe/Minsk", "Europe/Minsk", "2025-09-13 17:12:30", "2025-09-13 17:14:05",
         "2025-09-13 17:12:30", 95),
        ("Europe/Minsk", "Europe/Moscow", "2025-09-13 17:12:30", "2025-09-13 17:14:05",
         "2025-09-13 17:12:30", 95),
        ("Europe/Minsk", "UTC", "2025-09-13 17:12:30", "2025-09-13 17:14:05",
         "2025-09-13 14:12:30", 95),
        ("Europe/Minsk", "UTC", "2025-09-13 01:30:00", "2025-09-13 01:31:00",
         "2025-09-12 22:30:00", 60),  # across midnight
        # 2010: Minsk still kept summer time (+3) while Moscow kept +4
        ("Europe/Minsk", "Europe/Moscow", "2010-07-01 12:00:00", "2010-07-01 12:00:10",
         "2010-07-01 13:00:00", 10),
        # the host's clock jumps 02:00 → 03:00 during the call: 2 real minutes
        ("Europe/Berlin", "Europe/Minsk", "2025-03-30 01:59:00", "2025-03-30 03:01:00",
         "2025-03-30 03:59:00", 120),
        ("Europe/Minsk", "Europe/Minsk", "2025-09-13 17:12:30", "2025-09-13 17:12:00",
         "2025-09-13 17:12:30", 0),  # EndTime before StartTime: never negative
    ],
)
def test_dates_across_zones(
    host: str, crm: str, start: str, end: str, date: str, duration: int
) -> None:
    hangup = ev(5, "hangup", {**HANGUP_IN, "DateReceived": start, "StartTime": start,
                              "EndTime": end})
    opts = options(host_zone=ZoneInfo(host), crm_zone=ZoneInfo(crm))
    upload = plan(hangup, [hangup], opts).upload
    assert upload is not None
    assert (upload["date"], upload["duration"]) == (date, duration)


def test_date_falls_back_to_date_received_then_to_the_server_clock() -> None:
    no_start = ev(5, "hangup", {**HANGUP_IN, "StartTime": ""})
    upload = plan(no_start, [no_start], OPTIONS).upload
    assert upload is not None
    assert (upload["date"], upload["duration"]) == ("2025-09-13 17:12:22", 103)
    assert "durationWaiting" not in upload  # no answer time to wait for
    bare = ev(5, "hangup", {"UniqueId": UID, "CallType": 0, "Phone": "+375291112233",
                            "CallStatus": "2"})
    upload = plan(bare, [bare], options(crm_zone=ZoneInfo("Europe/Moscow"))).upload
    assert upload is not None
    assert (upload["date"], upload["duration"]) == ("2025-09-13 17:14:06", 0)
    assert "durationWaiting" not in upload


# ---------------------------------------------------------------- switches and edge cases


def test_switches() -> None:
    call = incoming_answered()
    dial, hangup = call[1], call[4]
    assert plan(dial, call, options(popup_incoming=False)) == Plan(None, None,
                                                                   "popup_incoming_off")
    assert plan(dial, call, options(popup_outgoing=False)) == Plan(RING_IN, None, None)
    assert plan(hangup, call, options(popup_hangup=False)) == Plan(None, UPLOAD_ANSWERED, None)
    assert plan(hangup, call, options(upload_history=False)) == Plan(HANGUP_EVENT, None, None)
    assert plan(hangup, call, options(popup_hangup=False, upload_history=False)) == Plan(
        None, None, "popup_hangup_off, upload_history_off")
    no_rec = {k: v for k, v in UPLOAD_ANSWERED.items() if k != "recordUrl"}
    assert plan(hangup, call, options(upload_recordings=False)) == Plan(HANGUP_EVENT, no_rec,
                                                                        None)
    out = ev(2, "dial", DIAL_OUT)
    assert plan(out, [out], options(popup_outgoing=False)) == Plan(None, None,
                                                                   "popup_outgoing_off")


def test_no_internal_extension_rings() -> None:
    dial = ev(2, "dial", {**DIAL_IN, "Extensions": ["375297778899", ""]})
    assert plan(dial, [dial], OPTIONS) == Plan(None, None, "no_internal_extension")


def test_anonymous_caller() -> None:
    dial = ev(2, "dial", {**DIAL_IN, "Phone": "", "ExtPhone": ""})
    assert plan(dial, [dial], OPTIONS) == Plan(None, None, "no_phone")
    hangup = ev(5, "hangup", {**HANGUP_IN, "Phone": ""})
    assert plan(hangup, [dial, hangup], OPTIONS) == Plan(None, None, "no_phone")


def test_local_and_unparsable_phones() -> None:
    local = ev(2, "dial", {**DIAL_IN, "Phone": "8 (029) 111-22-33"})
    assert plan(local, [local], OPTIONS) == Plan(RING_IN, None, None)
    odd = ev(2, "dial", {**DIAL_IN, "Phone": "+12"})
    assert plan(odd, [odd], OPTIONS) == Plan({**RING_IN, "phone": "12"}, None, None,
                                             phone_unparsed=True)


def test_no_external_phone_for_an_unknown_line() -> None:
    dial = ev(2, "dial", {**DIAL_IN, "Trunk": "0009999"})
    expected = {k: v for k, v in RING_IN.items() if k != "externalPhone"}
    assert plan(dial, [dial], OPTIONS) == Plan(expected, None, None)


def test_code_without_a_manager_has_no_user_id() -> None:
    call = [ev(2, "dial", {**DIAL_IN, "Extensions": ["153"]}),
            ev(3, "bridge", {**BRIDGE_151, "Channel": "SIP/153-00000001", "CallerIDNum": "153"}),
            ev(5, "hangup", HANGUP_IN)]
    planned = run(call)
    assert planned[2] == Plan({**RING_IN, "codes": ["153"], "userIds": []}, None, None)
    upload = planned[5].upload
    assert upload is not None
    assert upload["code"] == "153"
    assert "userId" not in upload


def test_without_configured_extensions_short_numbers_are_internal() -> None:
    bare = options(user_extensions={}, internal_numbers=frozenset())
    dial = ev(2, "dial", DIAL_IN)
    assert plan(dial, [dial], bare) == Plan({**RING_IN, "userIds": []}, None, None)


def test_mapped_numbers_count_as_internal() -> None:
    opts = options(internal_numbers=frozenset({"150"}))
    assert opts.is_internal("151")
    assert opts.is_internal("150")
    assert not opts.is_internal("153")
    assert not opts.is_internal("375297778899")


def test_user_ids_ascending_non_numeric_ids_ignored() -> None:
    opts = options(user_extensions={"21": "150", "3": "150", "admin": "150", "12": "151"})
    assert opts.user_ids("150") == [3, 21]
    assert opts.user_ids("999") == []


def test_skip_values_are_stable() -> None:
    assert {s.value for s in Skip} == {
        "no_request", "duplicate", "click_to_call_leg", "internal_call",
        "internal_call_no_popup", "late_dial", "no_direction", "popup_incoming_off",
        "popup_outgoing_off",
        "popup_hangup_off", "upload_history_off", "no_internal_extension", "no_phone"}


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize(
    ("count", "size", "sizes"),
    [(0, 50, []), (1, 50, [1]), (50, 50, [50]), (51, 50, [50, 1]), (120, 50, [50, 50, 20]),
     (5, 2, [2, 2, 1])],
)
def test_batches(count: int, size: int, sizes: list[int]) -> None:
    items = list(range(count))
    cut = batches(items, size)
    assert [len(b) for b in cut] == sizes
    assert [x for b in cut for x in b] == items


def test_batches_default_is_fifty_and_rejects_zero() -> None:
    assert [len(b) for b in batches(list(range(101)))] == [50, 50, 1]
    with pytest.raises(ValueError, match="at least 1"):
        batches([1], 0)
