"""daemon.calls: the platform's real call bodies parsed, a call's events folded."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from daemon import errors
from daemon.calls import (
    CallEvent,
    CallType,
    MalformedEvent,
    StoredEvent,
    answered,
    answerer,
    bridged_answerer,
    channel_extension,
    direction,
    fold_call,
    parse_call,
    parse_event,
)
from tests.support.bodies import (
    BRIDGE_TRUNK,
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
from tests.support.bodies import DIAL_IN as DIAL

RECEIVED = datetime(2025, 9, 13, 14, 12, 22, tzinfo=UTC)
INTERNAL = frozenset({"150", "151", "152", "153"})

BRIDGE_AGENT = {"Token": TOKEN, "UniqueId": UID, "Channel": "SIP/151-0000001c", "Exten": "151",
                "CallerIDNum": "151", "CallerIDName": "Оператор 151",
                "ConnectedLineNum": "375291112233", "ConnectedLineName": "<unknown>",
                "BridgeUniqueid": "6d9f0b8e-3c1a-4e53-9a57-2b9a1b7c0d11"}
HANGUP = {"Token": TOKEN, "UniqueId": UID, "CallType": 0, "Phone": "+375291112233",
          "Extensions": [""], "Trunk": "0001363", "DateReceived": "2025-09-13 17:12:22",
          "StartTime": "2025-09-13 17:12:30", "EndTime": "2025-09-13 17:14:05",
          "CallStatus": "2", "_received_by": "ast-7", "_seq": 41}


def stored(
    id: int,
    event_type: str,
    body: Any,
    *,
    record_url: str | None = None,
    origin: str = "live",
    unique_id: str = UID,
) -> StoredEvent:
    return StoredEvent(id=id, event_type=event_type, unique_id=unique_id, payload=body,
                       record_url=record_url, origin=origin, received_at=RECEIVED)


def event(id: int, event_type: str, body: dict[str, Any], **kwargs: Any) -> CallEvent:
    return parse_event(stored(id, event_type, body, **kwargs))


def is_internal(number: str) -> bool:
    return number in INTERNAL


# ---------------------------------------------------------------- parse_event


def test_parse_dial_exactly() -> None:
    assert event(2, "dial", DIAL) == CallEvent(
        id=2, event_type="dial", unique_id=UID, call_type=CallType.INCOMING,
        phone="+375291112233", extensions=("150", "151", "152", "375297778899"),
        trunk="0001363", ext_phone="+375291112233", origin="live", received_at=RECEIVED,
    )


def test_parse_hangup_exactly() -> None:
    assert event(5, "hangup", HANGUP, record_url="https://rec.example/1757772742.60.mp3") == (
        CallEvent(
            id=5, event_type="hangup", unique_id=UID, call_type=CallType.INCOMING,
            phone="+375291112233", extensions=(), trunk="0001363", call_status="2",
            date_received=datetime(2025, 9, 13, 17, 12, 22),
            start_time=datetime(2025, 9, 13, 17, 12, 30),
            end_time=datetime(2025, 9, 13, 17, 14, 5),
            record_url="https://rec.example/1757772742.60.mp3", received_at=RECEIVED,
        )
    )


def test_parse_bridge_exactly() -> None:
    assert event(3, "bridge", BRIDGE_AGENT) == CallEvent(
        id=3, event_type="bridge", unique_id=UID, channel="SIP/151-0000001c", exten="151",
        caller_id_num="151", caller_id_name="Оператор 151", connected_line_num="375291112233",
        connected_line_name="<unknown>", bridge_unique_id="6d9f0b8e-3c1a-4e53-9a57-2b9a1b7c0d11",
        received_at=RECEIVED,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, CallType.INCOMING), ("0", CallType.INCOMING), (1, CallType.OUTGOING),
     ("1", CallType.OUTGOING), (2, CallType.INTERNAL), (" 2 ", CallType.INTERNAL),
     (None, None), ("", None)],
)
def test_call_type_int_or_string(value: object, expected: CallType | None) -> None:
    assert event(1, "dial", {**DIAL, "CallType": value}).call_type is expected


def test_call_type_missing_is_none() -> None:
    body = {k: v for k, v in DIAL.items() if k != "CallType"}
    assert event(1, "dial", body).call_type is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [([""], ()), (["150", "", "151"], ("150", "151")), ([], ()), (None, ()),
     ([150, "375297778899"], ("150", "375297778899")), ([" 150 "], ("150",))],
)
def test_extensions(value: object, expected: tuple[str, ...]) -> None:
    assert event(1, "dial", {**DIAL, "Extensions": value}).extensions == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("TRUE", True), ("1", True), (1, True),
     ("false", False), ("0", False), ("", False), (0, False), (None, False)],
)
def test_external_initiated(value: object, expected: bool) -> None:
    assert event(1, "dial", {**DIAL, "ExternalInitiated": value}).external_initiated is expected


def test_empty_start_time_is_none_and_the_fold_falls_back_to_date_received() -> None:
    hangup = event(1, "hangup", {**HANGUP, "StartTime": "", "CallStatus": "0"})
    assert hangup.start_time is None
    assert fold_call([hangup]).started_at == datetime(2025, 9, 13, 17, 12, 22)


@pytest.mark.parametrize("value", ["0000-00-00 00:00:00", "", "   ", None])
def test_unset_times_are_none(value: object) -> None:
    assert event(1, "hangup", {**HANGUP, "StartTime": value}).start_time is None


def test_iso_t_separator_accepted() -> None:
    parsed = event(1, "hangup", {**HANGUP, "EndTime": "2025-09-13T17:14:05"})
    assert parsed.end_time == datetime(2025, 9, 13, 17, 14, 5)


def test_internal_code_and_underscore_keys() -> None:
    parsed = event(1, "hangup", {**HANGUP, "InternalCode": "151", "_trace": {"x": [1]}})
    assert parsed.internal_code == "151"


def test_numbers_as_json_numbers_are_taken_as_text() -> None:
    parsed = event(1, "hangup", {**HANGUP, "Phone": 375291112233, "CallStatus": 2,
                                 "InternalCode": 151})
    assert (parsed.phone, parsed.call_status, parsed.internal_code) == (
        "375291112233", "2", "151")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("DialStatus", "BUSY", "BUSY"), ("Disposition", "NO ANSWER", "NOANSWER"),
     ("DialStatus", "chanunavail", "CHANUNAVAIL"), ("DIALSTATUS", "CANCEL", "CANCEL")],
)
def test_dial_status(key: str, value: str, expected: str) -> None:
    assert event(1, "hangup", {**HANGUP, key: value}).dial_status == expected


def test_missing_optional_fields_are_fine() -> None:
    parsed = event(1, "hangup", {"UniqueId": UID, "CallType": "1", "Phone": "80291234567"})
    assert parsed == CallEvent(id=1, event_type="hangup", unique_id=UID,
                               call_type=CallType.OUTGOING, phone="80291234567",
                               received_at=RECEIVED)


def test_record_url_from_column_then_body() -> None:
    body = {**HANGUP, "record_url": "https://rec.example/body.mp3"}
    assert event(1, "hangup", body).record_url == "https://rec.example/body.mp3"
    column = event(1, "hangup", body, record_url="https://rec.example/col.mp3")
    assert column.record_url == "https://rec.example/col.mp3"
    assert event(1, "hangup", {**HANGUP, "RecordUrl": ""}).record_url is None


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JaVaScRiPt:alert(document.cookie)", "data:audio/mp3;base64,AAAA",
    "file:///etc/passwd", "ftp://rec.example/a.mp3", "//rec.example/a.mp3", "/records/a.mp3",
    "https://", "http:///a.mp3", "https://rec.example:99999/a.mp3",
    "https://rec.example/a b.mp3", "https://rec.example/a.mp3\n<script>",
    "https://rec.example/\x00.mp3", "https://rec.example/" + "a" * 2000 + ".mp3",
])
def test_a_record_url_a_crm_must_not_get_is_dropped_on_every_path(url: str) -> None:
    envelope = {"token": TOKEN, "uniqueId": UID, "event_type": "hangup", "raw": HANGUP,
                "record_url": url}
    for parsed in (event(1, "hangup", HANGUP, record_url=url),  # the SQL column
                   event(1, "hangup", envelope),  # the envelope
                   *(event(1, "hangup", {**HANGUP, key: url})  # the raw body
                     for key in ("RecordUrl", "record_url", "RecordURL", "recordUrl"))):
        assert parsed.record_url is None, url
        assert parsed.record_url_dropped
    state = fold_call([event(1, "dial", DIAL), event(2, "hangup", HANGUP, record_url=url)])
    assert state.record_url is None


@pytest.mark.parametrize("url", [
    "https://rec.example/1757772742.60.mp3", "http://10.0.0.5:8080/rec?id=60&fmt=mp3",
    "HTTPS://REC.EXAMPLE/A.MP3", "https://records.example.by/" + "a" * 1900 + ".mp3",
])
def test_a_recording_url_is_kept_as_given(url: str) -> None:
    parsed = event(1, "hangup", {**HANGUP, "RecordUrl": url})
    assert (parsed.record_url, parsed.record_url_dropped) == (url, False)
    assert event(1, "hangup", HANGUP).record_url_dropped is False  # none given: none dropped


def test_unique_id_column_wins_and_body_fills_in() -> None:
    assert event(1, "dial", {**DIAL, "UniqueId": "other"}).unique_id == UID
    assert event(1, "dial", DIAL, unique_id="").unique_id == UID


def test_envelope_is_unwrapped() -> None:
    envelope = {"token": TOKEN, "uniqueId": UID, "event_type": "hangup", "raw": HANGUP,
                "record_url": "https://rec.example/a.mp3", "origin": "download"}
    parsed = event(7, "hangup", envelope)
    assert (parsed.call_status, parsed.record_url, parsed.origin, parsed.is_download) == (
        "2", "https://rec.example/a.mp3", "download", True)


def test_download_event_type_and_origin() -> None:
    assert event(1, "download", HANGUP).is_download
    assert event(1, "hangup", HANGUP, origin="download").is_download
    assert not event(1, "hangup", HANGUP).is_download
    assert event(1, "download", HANGUP).is_ending


@pytest.mark.parametrize(
    ("event_type", "body", "field", "message"),
    [
        ("dial", {**DIAL, "CallType": "x"}, "CallType", "CallType: expected 0, 1 or 2, got 'x'"),
        ("dial", {**DIAL, "CallType": 3}, "CallType", "CallType: expected 0, 1 or 2, got 3"),
        ("dial", {**DIAL, "CallType": True}, "CallType",
         "CallType: expected 0, 1 or 2, got True"),
        ("dial", {**DIAL, "CallType": [0]}, "CallType",
         "CallType: expected 0, 1 or 2, got [0]"),
        # Digits that are not ASCII: str.isdigit takes them, int() refuses "²" (a ValueError
        # would be classed a bug and retried) and reads "١" as 1.
        ("dial", {**DIAL, "CallType": "²"}, "CallType", "CallType: expected 0, 1 or 2, got '²'"),
        ("dial", {**DIAL, "CallType": "١"}, "CallType", "CallType: expected 0, 1 or 2, got '١'"),
        ("dial", {**DIAL, "CallType": "1" * 5000}, "CallType",
         "CallType: expected 0, 1 or 2, got '" + "1" * 39),
        ("dial", {**DIAL, "Extensions": "150"}, "Extensions",
         "Extensions: expected a list of strings, got 'str'"),
        ("dial", {**DIAL, "Extensions": ["150", None]}, "Extensions[1]",
         "Extensions[1]: expected a string, got null"),
        ("dial", {**DIAL, "Extensions": ["150", {"n": 1}]}, "Extensions[1]",
         "Extensions[1]: expected a string, got 'dict'"),
        ("dial", {**DIAL, "Phone": ["+375291112233"]}, "Phone",
         "Phone: expected a string, got 'list'"),
        ("dial", {**DIAL, "Trunk": True}, "Trunk", "Trunk: expected a string, got 'bool'"),
        ("dial", {**DIAL, "ExternalInitiated": "maybe"}, "ExternalInitiated",
         "ExternalInitiated: expected true or false, got 'maybe'"),
        ("hangup", {**HANGUP, "EndTime": "13.09.2025 17:14"}, "EndTime",
         "EndTime: expected 'YYYY-MM-DD HH:MM:SS', got '13.09.2025 17:14'"),
        ("hangup", {**HANGUP, "StartTime": 1757772750}, "StartTime",
         "StartTime: expected 'YYYY-MM-DD HH:MM:SS', got 'int'"),
        ("hangup", {**HANGUP, "CallStatus": 2.0}, "CallStatus",
         "CallStatus: expected a string, got 'float'"),
        ("bridge", {**BRIDGE_AGENT, "Channel": {"name": "SIP/151"}}, "Channel",
         "Channel: expected a string, got 'dict'"),
        ("bridge", {**BRIDGE_AGENT, "CallerIDNum": 1.5}, "CallerIDNum",
         "CallerIDNum: expected a string, got 'float'"),
        ("call", DIAL, "event_type",
         "event_type: expected one of bridge, dial, download, hangup, start, got 'call'"),
        ("dial", ["not", "an", "object"], "payload", "payload: expected a JSON object, got 'list'"),
    ],
)
def test_malformed_bodies_name_the_field(
    event_type: str, body: Any, field: str, message: str
) -> None:
    with pytest.raises(MalformedEvent) as caught:
        parse_event(stored(1, event_type, body))
    assert caught.value.field == field
    assert str(caught.value) == message
    assert caught.value.details == {"field": field}
    assert caught.value.error_id == "malformed"
    assert isinstance(caught.value, errors.Permanent)


def test_missing_unique_id_everywhere() -> None:
    body = {k: v for k, v in DIAL.items() if k != "UniqueId"}
    with pytest.raises(MalformedEvent, match=r"^UniqueId: missing$"):
        parse_event(stored(1, "dial", body, unique_id=""))


def test_parse_call_keeps_the_good_rows() -> None:
    rows = [stored(1, "dial", DIAL), stored(2, "bridge", {**BRIDGE_AGENT, "Channel": 5.5}),
            stored(3, "hangup", HANGUP)]
    parsed, rejected = parse_call(rows)
    assert [e.id for e in parsed] == [1, 3]
    assert [e.field for e in rejected] == ["Channel"]


# ---------------------------------------------------------------- fold_call


def test_fold_full_incoming_call() -> None:
    events = [event(1, "start", START), event(2, "dial", DIAL),
              event(3, "bridge", BRIDGE_TRUNK), event(4, "bridge", BRIDGE_AGENT),
              event(5, "hangup", HANGUP, record_url="https://rec.example/x.mp3")]
    state = fold_call(events)
    assert state.unique_id == UID
    assert state.call_type is CallType.INCOMING
    assert (state.phone, state.trunk) == ("+375291112233", "0001363")
    assert state.ringing == ("150", "151", "152", "375297778899")
    assert [e.id for e in state.bridges] == [3, 4]
    assert [e.id for e in state.dials] == [2]
    assert state.start is not None
    assert state.start.id == 1
    assert state.hangup is not None
    assert state.hangup.id == 5
    assert state.record_url == "https://rec.example/x.mp3"
    assert state.started_at == datetime(2025, 9, 13, 17, 12, 30)
    assert not state.external_initiated
    assert answerer(state, is_internal) == "151"


def test_fold_is_order_and_repeat_insensitive() -> None:
    events = [event(1, "start", START), event(2, "dial", DIAL),
              event(3, "bridge", BRIDGE_AGENT), event(4, "hangup", HANGUP)]
    shuffled = [events[3], events[1], events[3], events[0], events[2], events[1]]
    assert fold_call(shuffled) == fold_call(events)


def test_same_content_under_another_id_counts_once() -> None:
    first = event(2, "dial", DIAL)
    again = event(9, "dial", {**DIAL, "_retry": 1})  # the listener retried: extra _ key
    state = fold_call([again, first])
    assert [e.id for e in state.dials] == [2]
    assert [e.id for e in state.events] == [2]


def test_ringing_across_dials_first_seen_order() -> None:
    follow_me = {**DIAL, "Extensions": ["152", "153", "375297778899", "150"]}
    state = fold_call([event(4, "dial", follow_me), event(2, "dial", DIAL)])
    assert state.ringing == ("150", "151", "152", "375297778899", "153")


def test_call_types_start_then_dials_then_hangup_phone_and_trunk_hangup_first() -> None:
    # Until issue 11 the hangup's CallType came first (this test expected INTERNAL from the
    # dial over the start): a start's or dial's CallType now wins over a hangup's.
    start = event(1, "start", {**START, "CallType": 1, "Phone": "s", "Trunk": "T1"})
    dial = event(2, "dial", {**DIAL, "CallType": "2", "Phone": "d", "Trunk": ""})
    hangup = event(3, "hangup", {**HANGUP, "CallType": 0, "Phone": "h", "Trunk": ""})
    state = fold_call([hangup, dial, start])
    assert state.call_types == (CallType.OUTGOING, CallType.INTERNAL, CallType.INCOMING)
    assert (state.call_type, state.phone, state.trunk) == (CallType.OUTGOING, "h", "T1")
    assert fold_call([dial, hangup]).call_type is CallType.INTERNAL
    assert fold_call([hangup]).call_type is CallType.INCOMING
    assert fold_call([event(3, "hangup", {**HANGUP, "CallType": None})]).call_types == ()


def test_call_types_dials_earliest_stored_first_click_to_call_legs_last() -> None:
    leg = event(2, "dial", {**DIAL, "CallType": 2, "ExternalInitiated": True})
    outside = event(3, "dial", {**DIAL, "CallType": 1, "ExternalInitiated": True})
    transfer = event(4, "dial", {**DIAL, "CallType": 0})
    state = fold_call([transfer, outside, leg])
    assert state.call_types == (CallType.OUTGOING, CallType.INCOMING, CallType.INTERNAL)


def test_started_at_hangup_start_time_else_the_earliest_time_of_the_call() -> None:
    start = event(1, "start", {**START, "DateReceived": "2025-09-13 17:12:20"})
    no_start_time = event(5, "hangup", {**HANGUP, "StartTime": ""})
    assert fold_call([start, event(5, "hangup", HANGUP)]).started_at == datetime(
        2025, 9, 13, 17, 12, 30)
    assert fold_call([start, no_start_time]).started_at == datetime(2025, 9, 13, 17, 12, 20)
    assert fold_call([no_start_time]).started_at == datetime(2025, 9, 13, 17, 12, 22)
    download = event(6, "download", {**HANGUP, "StartTime": "", "DateReceived":
                                     "2025-09-13 17:12:21"}, origin="download")
    bare = event(5, "hangup", {**HANGUP, "StartTime": "", "DateReceived": ""})
    assert fold_call([bare, download]).started_at == datetime(2025, 9, 13, 17, 12, 21)
    assert fold_call([bare, event(2, "dial", DIAL)]).started_at is None


def test_first_stored_at_is_the_earliest_receipt_of_the_call() -> None:
    later = datetime(2025, 9, 13, 14, 13, 0, tzinfo=UTC)
    hangup = parse_event(StoredEvent(id=5, event_type="hangup", unique_id=UID, payload=HANGUP,
                                     record_url=None, origin="live", received_at=later))
    dial = event(2, "dial", DIAL)
    assert fold_call([hangup]).first_stored_at == later
    assert fold_call([hangup, dial]).first_stored_at == RECEIVED


def test_live_hangup_preferred_over_download() -> None:
    download = event(6, "download", {**HANGUP, "CallStatus": "0"}, origin="download",
                     record_url="https://rec.example/late.mp3")
    live = event(7, "hangup", HANGUP)
    state = fold_call([download, live])
    assert state.hangup is live
    assert state.record_url == "https://rec.example/late.mp3"  # the hangup has none
    assert fold_call([download]).hangup is download


def test_hangup_without_dial() -> None:
    state = fold_call([event(5, "hangup", {**HANGUP, "InternalCode": "152"})])
    assert state.ringing == ()
    assert state.dials == ()
    assert answerer(state, is_internal) == "152"


def test_external_initiated_on_any_event() -> None:
    dial = event(2, "dial", {**DIAL, "ExternalInitiated": "true"})
    assert fold_call([dial, event(3, "hangup", HANGUP)]).external_initiated


def test_fold_rejects_nothing_and_mixed_calls() -> None:
    with pytest.raises(ValueError, match="at least one"):
        fold_call([])
    with pytest.raises(ValueError, match="more than one call"):
        fold_call([event(1, "dial", DIAL), event(2, "hangup", HANGUP, unique_id="1.2")])


# ---------------------------------------------------------------- answerer


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("SIP/150-0000001a", "150"), ("PJSIP/150-00000002", "150"),
     ("Local/150@from-internal-00000001;1", "150"), ("Local/375297778899@fm-0000a1;2",
                                                      "375297778899"),
     ("SIP/0001363-0000001b", "0001363"), ("PJSIP/my-trunk-0000abcd", "my-trunk"),
     ("IAX2/151-1234", "151"), ("PJSIP/150", "150"), ("", ""), ("garbage", "")],
)
def test_channel_extension(channel: str, expected: str) -> None:
    assert channel_extension(channel) == expected


def test_answerer_from_trunk_side_connected_line() -> None:
    state = fold_call([event(2, "dial", DIAL), event(3, "bridge", BRIDGE_TRUNK)])
    assert answerer(state, is_internal) == "151"


def test_answerer_from_channel_when_caller_id_is_not_internal() -> None:
    bridge = {**BRIDGE_AGENT, "Channel": "PJSIP/152-00000002", "CallerIDNum": "<unknown>",
              "ConnectedLineNum": "<unknown>"}
    state = fold_call([event(3, "bridge", bridge)])
    assert answerer(state, is_internal) == "152"


def test_transfer_last_bridged_internal_wins() -> None:
    transfer = {**BRIDGE_AGENT, "Channel": "SIP/153-0000002f", "Exten": "153",
                "CallerIDNum": "153", "BridgeUniqueid": "b2"}
    trunk_again = {**BRIDGE_TRUNK, "ConnectedLineNum": "375291112233", "BridgeUniqueid": "b2"}
    events = [event(2, "dial", DIAL), event(3, "bridge", BRIDGE_AGENT),
              event(8, "bridge", transfer), event(9, "bridge", trunk_again),
              event(10, "hangup", {**HANGUP, "InternalCode": "151"})]
    assert answerer(fold_call(events), is_internal) == "153"


def test_internal_call_answerer_is_the_callee_not_the_caller() -> None:
    internal_dial = {"UniqueId": UID, "CallType": 2, "Phone": "150", "Extensions": ["151"],
                     "Trunk": ""}
    caller_side = {"UniqueId": UID, "Channel": "SIP/150-00000031", "CallerIDNum": "150",
                   "ConnectedLineNum": "151"}
    callee_side = {"UniqueId": UID, "Channel": "SIP/151-00000032", "CallerIDNum": "151",
                   "ConnectedLineNum": "150"}
    for order in ((3, 4), (4, 3)):
        events = [event(2, "dial", internal_dial), event(order[0], "bridge", caller_side),
                  event(order[1], "bridge", callee_side)]
        assert answerer(fold_call(events), is_internal) == "151"


def test_answerer_fallbacks_on_the_hangup() -> None:
    no_code = fold_call([event(5, "hangup", {**HANGUP, "Extensions": ["", "375297778899",
                                                                      "152"]})])
    assert answerer(no_code, is_internal) == "152"
    nothing = fold_call([event(5, "hangup", HANGUP)])
    assert answerer(nothing, is_internal) is None
    only_dial = fold_call([event(2, "dial", DIAL)])
    assert answerer(only_dial, is_internal) is None


def test_click_to_call_leg_dials_do_not_ring() -> None:
    leg = event(2, "dial", {**DIAL, "CallType": 2, "Extensions": ["153"],
                            "ExternalInitiated": True})
    outside = event(3, "dial", {**DIAL, "CallType": 1, "Extensions": ["150"],
                                "ExternalInitiated": True})
    assert leg.is_click_to_call_leg
    assert not outside.is_click_to_call_leg
    state = fold_call([leg, outside])
    assert state.ringing == ("150",)
    assert [e.id for e in state.dials] == [2, 3]


# ---------------------------------------------------------------- direction


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in keys}


INTERNAL_DIAL = {"Token": TOKEN, "UniqueId": UID, "CallType": 2, "Phone": "150",
                 "Extensions": ["151"], "Trunk": "", "ExtPhone": ""}
INTERNAL_HANGUP = {**INTERNAL_DIAL, "Extensions": [""], "CallStatus": "2",
                   "StartTime": "2025-09-13 11:00:04", "EndTime": "2025-09-13 11:01:04"}
BRIDGE_150_151 = {"Token": TOKEN, "UniqueId": UID, "Channel": "SIP/150-00000031",
                  "CallerIDNum": "150", "ConnectedLineNum": "151",
                  "ConnectedLineName": "<unknown>", "BridgeUniqueid": "b-int"}
NO_TYPE_HANGUP = _without(HANGUP, "CallType")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        pytest.param([(1, "start", START), (2, "dial", DIAL), (5, "hangup",
                                                               {**HANGUP, "CallType": 2})],
                     CallType.INCOMING, id="start-and-dial-win-over-the-hangup"),
        pytest.param([(5, "hangup", {**HANGUP, "CallType": "1", "Phone": "80291234567"})],
                     CallType.OUTGOING, id="the-hangup-counts-without-start-or-dial"),
        pytest.param([(5, "hangup", {**HANGUP, "CallType": 2})], None,
                     id="outside-phone-is-never-internal-and-nothing-else-decides"),
        pytest.param([(2, "dial", {**DIAL, "CallType": 2}), (5, "hangup", HANGUP)],
                     CallType.INCOMING, id="an-internal-dial-with-outside-phone-yields"),
        pytest.param([(2, "dial", INTERNAL_DIAL), (3, "bridge", BRIDGE_150_151),
                       (5, "hangup", INTERNAL_HANGUP)], CallType.INTERNAL,
                     id="internal-phone-internal-call"),
        pytest.param([(2, "dial", {**INTERNAL_DIAL, "Phone": "160"}),
                       (5, "hangup", {**INTERNAL_HANGUP, "Phone": "160"})], CallType.INTERNAL,
                     id="an-extension-the-enterprise-has-not-listed-does-not-contradict"),
        pytest.param([(2, "dial", {**INTERNAL_DIAL, "Phone": ""}),
                       (3, "bridge", BRIDGE_150_151)], CallType.INTERNAL,
                     id="no-phone-every-party-internal"),
        pytest.param([(1, "start", _without(START, "CallType", "Phone")),
                       (2, "dial", {**INTERNAL_DIAL, "Phone": ""}),
                       (3, "bridge", {**BRIDGE_TRUNK, "CallerIDNum": "<unknown>"})],
                     CallType.INCOMING, id="no-phone-a-party-outside-the-start-decides"),
        pytest.param([(5, "hangup", {**HANGUP, "CallType": 2, "Phone": "",
                                     "Extensions": [""]})],
                     CallType.INTERNAL, id="no-phone-no-party-nothing-contradicts-internal"),
        pytest.param([(2, "dial", {**DIAL, "CallType": 2, "ExternalInitiated": True,
                                   "Extensions": ["150"]})],
                     CallType.INTERNAL, id="a-click-to-call-leg-stays-internal"),
        pytest.param([(1, "start", _without(START, "CallType")), (5, "hangup", NO_TYPE_HANGUP)],
                     CallType.INCOMING, id="no-call-type-a-start-means-incoming"),
        pytest.param([(2, "dial", _without(DIAL, "CallType")), (5, "hangup", NO_TYPE_HANGUP)],
                     CallType.INCOMING, id="no-call-type-ext-phone-means-incoming"),
        pytest.param([(2, "dial", _without(INTERNAL_DIAL, "CallType")),
                       (5, "hangup", _without(INTERNAL_HANGUP, "CallType"))],
                     CallType.INTERNAL, id="no-call-type-internal-phone-means-internal"),
        pytest.param([(2, "dial", {**_without(DIAL, "CallType"), "ExtPhone": "",
                                   "ExternalInitiated": "true"})],
                     CallType.OUTGOING, id="no-call-type-click-to-call-means-outgoing"),
        pytest.param([(5, "hangup", NO_TYPE_HANGUP)], None,
                     id="no-call-type-a-lone-hangup-has-no-direction"),
    ],
)
def test_direction(call: list[tuple[int, str, dict[str, Any]]], expected: CallType | None) -> None:
    state = fold_call([event(*row) for row in call])
    assert direction(state, is_internal) is expected


# ---------------------------------------------------------------- answered


def split_call() -> list[CallEvent]:
    bodies = [("start", SPLIT_START), ("dial", SPLIT_DIAL), ("bridge", SPLIT_BRIDGE_TRUNK),
              ("bridge", SPLIT_BRIDGE_151), ("hangup", SPLIT_HANGUP)]
    return [event(i, kind, body, unique_id=SPLIT_UID)
            for i, (kind, body) in enumerate(bodies, start=1)]


def test_a_bridge_of_the_customer_with_an_internal_number_answers_the_call() -> None:
    state = fold_call(split_call())
    assert state.hangup is not None
    assert state.hangup.call_status == "0"
    assert answered(state, is_internal)
    assert bridged_answerer(state, is_internal) == "151"
    assert answerer(state, is_internal) == "151"
    trunk_side_only = fold_call([e for e in split_call() if e.id != 4])
    assert bridged_answerer(trunk_side_only, is_internal) == "151"


@pytest.mark.parametrize(
    ("bridge", "status", "expected"),
    [
        pytest.param(None, "2", True, id="call-status-2"),
        pytest.param(None, "5", True, id="call-status-5-talk"),
        pytest.param(None, "0", False, id="call-status-0-no-bridge"),
        pytest.param({**BRIDGE_150_151, "Channel": "SIP/151-00000040", "CallerIDNum": "151",
                      "ConnectedLineNum": "153"}, "0", False,
                     id="a-consult-bridge-without-the-customer"),
        pytest.param({**BRIDGE_TRUNK, "ConnectedLineNum": "375297778899",
                      "Channel": "Local/375297778899@fm-0000a1;2"}, "0", False,
                     id="the-customer-bridged-with-a-mobile-only"),
        pytest.param({**BRIDGE_150_151, "Channel": "SIP/151-00000040", "CallerIDNum": "151",
                      "ConnectedLineNum": "153"}, None, True,
                     id="no-call-status-any-bridge"),
        pytest.param({**BRIDGE_TRUNK, "CallerIDNum": "80291112233"}, "0", True,
                     id="the-customer-in-local-format"),
        pytest.param({**BRIDGE_TRUNK, "CallerIDNum": "anonymous"}, "1", True,
                     id="the-trunk-channel-with-an-anonymous-caller"),
    ],
)
def test_answered(bridge: dict[str, Any] | None, status: str | None, expected: bool) -> None:
    call = [event(2, "dial", DIAL), event(5, "hangup", {**HANGUP, "CallStatus": status})]
    if bridge is not None:
        call.append(event(3, "bridge", {**bridge, "UniqueId": UID}))
    assert answered(fold_call(call), is_internal) is expected


def test_the_last_bridge_with_the_customer_names_the_answerer() -> None:
    to_153 = {**SPLIT_BRIDGE_151, "Channel": "SIP/153-0000002f", "Exten": "153",
              "CallerIDNum": "153", "BridgeUniqueid": "b2"}
    consult = {**SPLIT_BRIDGE_151, "ConnectedLineNum": "152", "BridgeUniqueid": "b3"}
    call = [*split_call(), event(6, "bridge", to_153, unique_id=SPLIT_UID),
            event(7, "bridge", consult, unique_id=SPLIT_UID)]
    state = fold_call(call)
    assert bridged_answerer(state, is_internal) == "153"
    assert answerer(state, is_internal) == "153"  # the consult leg is not the customer's


def test_an_outgoing_call_is_answered_when_its_caller_meets_the_dialled_number() -> None:
    dial = {**DIAL, "CallType": 1, "Phone": "80291234567", "Extensions": ["150"],
            "ExtPhone": ""}
    bridge = {"Token": TOKEN, "UniqueId": UID, "Channel": "PJSIP/150-00000002",
              "Exten": "80291234567", "CallerIDNum": "150", "ConnectedLineNum": "+375291234567",
              "ConnectedLineName": "<unknown>"}
    hangup = {**HANGUP, "CallType": 1, "Phone": "80291234567", "CallStatus": "0"}
    state = fold_call([event(2, "dial", dial), event(3, "bridge", bridge),
                       event(4, "hangup", hangup)])
    assert answered(state, is_internal)
    assert bridged_answerer(state, is_internal) == "150"


def test_the_rules_do_not_depend_on_the_order_the_events_were_stored_in() -> None:
    call = split_call()
    reference = fold_call(call)
    decided = (direction(reference, is_internal), answered(reference, is_internal),
               answerer(reference, is_internal), set(reference.ringing), reference.started_at,
               reference.call_type, reference.phone, reference.trunk)
    assert decided == (CallType.INCOMING, True, "151", {"150", "151", "152"},
                       datetime(2025, 9, 14, 12, 12, 7), CallType.INCOMING, "375291112233",
                       "0001363")
    for ids in itertools.permutations(range(1, len(call) + 1)):
        state = fold_call([dataclasses.replace(e, id=i) for e, i in zip(call, ids, strict=True)])
        assert (direction(state, is_internal), answered(state, is_internal),
                answerer(state, is_internal), set(state.ringing), state.started_at,
                state.call_type, state.phone, state.trunk) == decided, ids
