"""The platform's call events, CRM-neutral: parse one stored body, fold a call's events.

Owns the knowledge of what the Asterisk listener really sends (docs/events.md) and turns it
into typed values every CRM adapter can map without looking at a raw body again:

- :func:`parse_event` — one ``crm_events`` row (:class:`StoredEvent`) → :class:`CallEvent`,
  accepting the real bodies as they come (``CallType`` ``0`` or ``"0"``, ``Extensions``
  ``[""]``, an empty ``StartTime``, ``ExternalInitiated`` ``true``/``"true"``/``"1"``, extra
  ``_``-prefixed keys, missing optional fields), and raising :class:`MalformedEvent` naming
  the field when a field the mapping needs has a wrong type.
- :func:`fold_call` — every stored event of one call, in any order, with repeats → one
  :class:`CallState`: the ringing extensions, the bridges, the hangup, the declared
  directions and parties, when the call started. A restart loses nothing: the state is
  rebuilt from the stored rows each time.
- The rules that settle a call whose events disagree (docs/events.md, "When the events of a
  call disagree"), each from the whole call: :func:`direction` (a start's or dial's
  ``CallType`` before a hangup's; never internal with an outside ``Phone``),
  :func:`answered` (``CallStatus`` or a bridge of the customer with an internal number) and
  :func:`answerer` (who answered: the bridges first, then the hangup itself). Which numbers
  are internal is the enterprise's: the caller passes a predicate.

Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any
from urllib.parse import urlsplit

from daemon import errors, phones

EVENT_TYPES = frozenset({"start", "dial", "bridge", "hangup", "download"})
ENDING_TYPES = frozenset({"hangup", "download"})

_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S.%f")
# Asterisk writes an unset time as zeros (CDR ``answer`` of a missed call): that is "empty".
_ZERO_TIME = re.compile(r"0{4}-0{2}-0{2}([ T]0{2}:0{2}:0{2}(\.0+)?)?")
# ``SIP/150-0000001a``, ``PJSIP/150-00000002``, ``Local/150@from-internal-00000001;1``.
_CHANNEL = re.compile(
    r"[A-Za-z0-9_]+/(?P<peer>[^@;/]+?)(?:@[^;]*)?(?:-[0-9a-fA-F]{4,})?(?:;\d+)?"
)
_ASCII_DIGITS = re.compile(r"[0-9]{1,3}")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})
_RECORD_URL_KEYS = ("record_url", "RecordUrl", "RecordURL", "recordUrl")
MAX_RECORD_URL_CHARS = 2000
_DIAL_STATUS_KEYS = ("DialStatus", "DIALSTATUS", "Disposition")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ANSWERED_STATUSES = frozenset({"2", "5"})  # CallStatus: answered, talk
_ANONYMOUS = frozenset({"anonymous", "unknown", "restricted"})
# A number's last nine digits: BY/RU/UA subscriber numbers with the country code, with the
# trunk prefix 8/80 or with neither all end in the same nine.
_SUBSCRIBER_DIGITS = 9


class CallType(IntEnum):
    """The call's direction as the listener's ``CallType`` says it."""

    INCOMING = 0
    OUTGOING = 1
    INTERNAL = 2


class MalformedEvent(errors.Permanent):
    """A stored body the mapping cannot use: dead letter, never retried as it is.

    ``field`` names the culprit (``CallType``, ``Extensions[2]``, ``EndTime``...); the
    message reads ``"CallType: expected 0, 1 or 2, got 'x'"``. It never quotes more than
    the offending value.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(
            f"{field}: {problem}", error_id="malformed", details={"field": field}
        )
        self.field = field


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One row of ``crm_events`` as the store returns it."""

    id: int  # insertion order: the order events of a call are folded in
    event_type: str  # start | dial | bridge | hangup | download
    unique_id: str
    payload: Mapping[str, Any]  # the Asterisk body exactly as received
    record_url: str | None
    origin: str  # 'live' | 'download'
    received_at: datetime  # aware, UTC (server clock)


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One parsed, typed event. Absent text fields are ``""``, absent times ``None``.

    Times (``date_received``, ``start_time``, ``end_time``) are naive local times of the
    Asterisk host, exactly as in the body; ``start_time`` stays ``None`` when the body's is
    empty (:attr:`CallState.started_at` applies the fallback to ``date_received``).
    ``dial_status`` is an Asterisk ``DialStatus``/``Disposition`` when the body carries one,
    upper-cased without spaces (``"NO ANSWER"`` → ``"NOANSWER"``).
    """

    id: int
    event_type: str
    unique_id: str
    call_type: CallType | None = None
    phone: str = ""
    extensions: tuple[str, ...] = ()
    trunk: str = ""
    ext_phone: str = ""
    call_status: str = ""
    dial_status: str = ""
    date_received: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    external_initiated: bool = False
    channel: str = ""
    exten: str = ""
    caller_id_num: str = ""
    caller_id_name: str = ""
    connected_line_num: str = ""
    connected_line_name: str = ""
    bridge_unique_id: str = ""
    internal_code: str = ""
    record_url: str | None = None
    record_url_dropped: bool = False  # one was given, but not a URL a CRM may be sent
    origin: str = "live"
    received_at: datetime = _EPOCH

    @property
    def is_ending(self) -> bool:
        """A hangup, live or recovered (``download``)."""
        return self.event_type in ENDING_TYPES

    @property
    def is_download(self) -> bool:
        """A hangup re-sent by the platform's recovery job: history only, no popup."""
        return self.event_type == "download" or self.origin == "download"

    @property
    def is_click_to_call_leg(self) -> bool:
        """An intermediate leg of a click-to-call (internal, ``ExternalInitiated``)."""
        return self.external_initiated and self.call_type is CallType.INTERNAL


def parse_event(stored: StoredEvent) -> CallEvent:
    """Parse one stored row; raise :class:`MalformedEvent` naming the first bad field.

    The payload is the Asterisk body; a body still wrapped in the platform's internal hop
    envelope (``{"token", "uniqueId", "event_type", "raw": <body>, "record_url"?,
    "origin"?}``) is unwrapped, taking ``record_url``/``origin`` from the envelope when the
    row's columns do not have them. The row's ``unique_id`` column wins over the body's
    ``UniqueId`` (it is what the call's events are grouped by).
    """
    if stored.event_type not in EVENT_TYPES:
        expected = ", ".join(sorted(EVENT_TYPES))
        raise MalformedEvent("event_type", f"expected one of {expected}, got {stored.event_type!r}")
    body, record_url, origin = _unwrap(stored)
    unique_id = stored.unique_id or _text(body, "UniqueId")
    if not unique_id:
        raise MalformedEvent("UniqueId", "missing")
    record_url = record_url or _record_url(body)
    recording = record_url if record_url is None or is_recording_url(record_url) else None
    return CallEvent(
        id=stored.id,
        event_type=stored.event_type,
        unique_id=unique_id,
        call_type=_call_type(body),
        phone=_text(body, "Phone"),
        extensions=_extensions(body),
        trunk=_text(body, "Trunk"),
        ext_phone=_text(body, "ExtPhone"),
        call_status=_text(body, "CallStatus"),
        dial_status=_dial_status(body),
        date_received=_time(body, "DateReceived"),
        start_time=_time(body, "StartTime"),
        end_time=_time(body, "EndTime"),
        external_initiated=_flag(body, "ExternalInitiated"),
        internal_code=_text(body, "InternalCode"),
        record_url=recording,
        record_url_dropped=recording != record_url,
        origin=origin,
        received_at=stored.received_at,
        **_bridge_fields(body),
    )


def parse_call(rows: Iterable[StoredEvent]) -> tuple[list[CallEvent], list[MalformedEvent]]:
    """Parse every row of one call; the malformed ones are returned apart, not raised.

    For a caller that folds a call around the event it delivers: one bad sibling row must
    not dead-letter the others (each row's own delivery reports its own error).
    """
    parsed: list[CallEvent] = []
    rejected: list[MalformedEvent] = []
    for row in rows:
        try:
            parsed.append(parse_event(row))
        except MalformedEvent as exc:
            rejected.append(exc)
    return parsed, rejected


def _unwrap(stored: StoredEvent) -> tuple[Mapping[str, Any], str | None, str]:
    payload = stored.payload
    if not isinstance(payload, Mapping):
        raise MalformedEvent("payload", f"expected a JSON object, got {_kind(payload)}")
    record_url, origin = stored.record_url or None, stored.origin or "live"
    raw = payload.get("raw")
    if "UniqueId" not in payload and isinstance(raw, Mapping):
        envelope_url = payload.get("record_url")
        if record_url is None and isinstance(envelope_url, str) and envelope_url.strip():
            record_url = envelope_url.strip()
        if payload.get("origin") == "download":
            origin = "download"
        payload = raw
    return payload, record_url, origin


def _kind(value: object) -> str:
    return "null" if value is None else repr(type(value).__name__)


def _text(body: Mapping[str, Any], key: str) -> str:
    """A text field: absent or null → ``""``; a JSON number is taken as its digits."""
    value = body.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MalformedEvent(key, f"expected a string, got {_kind(value)}")


def _call_type(body: Mapping[str, Any]) -> CallType | None:
    value = body.get("CallType")
    if value is None or value == "":
        return None
    number: object = value
    # ASCII digits only: ``str.isdigit`` also takes "²" or "٣", which ``int`` then refuses
    # (a ValueError, classed as a bug and retried, where bad input is a dead letter).
    if isinstance(value, str) and _ASCII_DIGITS.fullmatch(value.strip()):
        number = int(value.strip())
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= 2:
        return CallType(number)
    raise MalformedEvent("CallType", f"expected 0, 1 or 2, got {value!r:.40}")


def _extensions(body: Mapping[str, Any]) -> tuple[str, ...]:
    """``Extensions``: a list of strings (numbers accepted); ``""`` entries dropped."""
    value = body.get("Extensions")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MalformedEvent("Extensions", f"expected a list of strings, got {_kind(value)}")
    found: list[str] = []
    for index, entry in enumerate(value):
        if isinstance(entry, int) and not isinstance(entry, bool):
            entry = str(entry)
        if not isinstance(entry, str):
            raise MalformedEvent(f"Extensions[{index}]", f"expected a string, got {_kind(entry)}")
        if entry.strip():
            found.append(entry.strip())
    return tuple(found)


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise MalformedEvent(key, f"expected true or false, got {value!r}")


def _time(body: Mapping[str, Any], key: str) -> datetime | None:
    """A host-local ``YYYY-MM-DD HH:MM:SS``; empty or all zeros → ``None``."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedEvent(key, f"expected 'YYYY-MM-DD HH:MM:SS', got {_kind(value)}")
    text = value.strip()
    if not text or _ZERO_TIME.fullmatch(text):
        return None
    try:
        # The usual shape, parsed in C: ten times cheaper than strptime, and every event
        # carries several times. Naive: host-local by contract.
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    for layout in _TIME_FORMATS:  # what strptime also takes: "2025-1-9 9:20:00"
        try:
            return datetime.strptime(text, layout)
        except ValueError:
            continue
    raise MalformedEvent(key, f"expected 'YYYY-MM-DD HH:MM:SS', got {value!r}")


def _dial_status(body: Mapping[str, Any]) -> str:
    for key in _DIAL_STATUS_KEYS:
        if body.get(key) is not None:
            return _text(body, key).upper().replace(" ", "").replace("_", "")
    return ""


def _record_url(body: Mapping[str, Any]) -> str | None:
    for key in _RECORD_URL_KEYS:
        if body.get(key) is not None:
            return _text(body, key) or None
    return None


def is_recording_url(value: str) -> bool:
    """Whether ``value`` may go to a CRM as a recording's URL: an absolute ``http(s)`` URL
    with a host, at most ``MAX_RECORD_URL_CHARS`` long, without spaces or control
    characters (``javascript:alert(1)`` and ``file:///etc/passwd`` are not)."""
    if len(value) > MAX_RECORD_URL_CHARS or not value.isprintable() or " " in value:
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (a malformed port raises here)
    except ValueError:
        return False
    return parts.scheme.lower() in {"http", "https"} and bool(parts.hostname)


def _bridge_fields(body: Mapping[str, Any]) -> dict[str, str]:
    return {
        "channel": _text(body, "Channel"),
        "exten": _text(body, "Exten"),
        "caller_id_num": _text(body, "CallerIDNum"),
        "caller_id_name": _text(body, "CallerIDName"),
        "connected_line_num": _text(body, "ConnectedLineNum"),
        "connected_line_name": _text(body, "ConnectedLineName"),
        "bridge_unique_id": _text(body, "BridgeUniqueid") or _text(body, "BridgeUniqueId"),
    }


@dataclass(frozen=True, slots=True)
class CallState:
    """Everything a mapping needs from all of a call's events seen so far.

    ``events`` are the distinct events in id (insertion) order. ``call_types`` are the
    ``CallType`` values the call's events declare, strongest first, without repeats: its
    starts, then its dials (earliest stored first), then its hangup (the live one before a
    recovered one), then the dials of click-to-call intermediate legs (they are not the
    call). :func:`direction` decides from them. ``phone`` and ``trunk`` come from the first
    event that has them, looking at the hangup first, then the dials, then the start, then
    the click-to-call legs' dials. ``ringing`` is every extension of every dial, first seen
    first, without repeats (internal or not: the mapping filters), except the dials of
    click-to-call intermediate legs: they ring the clicking manager, not the call's targets.
    ``hangup`` is the live hangup when there is one, else the recovered one (``download``),
    else ``None``; ``record_url`` is the hangup's, else the latest one any event carried.
    """

    unique_id: str
    events: tuple[CallEvent, ...]
    call_types: tuple[CallType, ...]
    phone: str
    trunk: str
    external_initiated: bool
    ringing: tuple[str, ...]
    dials: tuple[CallEvent, ...]
    bridges: tuple[CallEvent, ...]
    start: CallEvent | None
    hangup: CallEvent | None
    record_url: str | None

    @property
    def call_type(self) -> CallType | None:
        """The strongest declared ``CallType`` (first start or dial, else the hangup's)."""
        return self.call_types[0] if self.call_types else None

    @property
    def started_at(self) -> datetime | None:
        """When the call started, host-local: the hangup's ``StartTime``, else the earliest
        ``StartTime``/``DateReceived`` of any of the call's events, else ``None``."""
        if self.hangup is not None and self.hangup.start_time is not None:
            return self.hangup.start_time
        times = (t for e in self.events for t in (e.start_time, e.date_received)
                 if t is not None)
        return min(times, default=None)

    @property
    def first_stored_at(self) -> datetime:
        """When crm-bridge stored the call's first event (aware, its own clock)."""
        return min(e.received_at for e in self.events)


def fold_call(events: Sequence[CallEvent]) -> CallState:
    """Fold one call's events, in any order and with repeats, into its :class:`CallState`.

    Events are ordered by ``id``; an event seen twice (the same id, or the same content
    under another id) counts once, at its first position. Raises ``ValueError`` for no
    events or events of several calls: both are caller bugs, not bad data.
    """
    ordered = _distinct(events)
    if not ordered:
        raise ValueError("fold_call needs at least one event")
    if len({e.unique_id for e in ordered}) > 1:
        raise ValueError("fold_call got events of more than one call")
    dials = tuple(e for e in ordered if e.event_type == "dial")
    own_dials = [d for d in dials if not d.is_click_to_call_leg]
    legs = [d for d in dials if d.is_click_to_call_leg]
    starts = [e for e in ordered if e.event_type == "start"]
    hangup = _ending(ordered)
    endings = sorted((e for e in ordered if e.is_ending), key=lambda e: e is not hangup)
    declaring = [*starts, *own_dials, *endings, *legs]
    sources = [e for e in (hangup, *own_dials, *starts[:1], *legs) if e is not None]
    return CallState(
        unique_id=ordered[0].unique_id,
        events=ordered,
        call_types=tuple(dict.fromkeys(e.call_type for e in declaring if e.call_type is not None)),
        phone=next((e.phone for e in sources if e.phone), ""),
        trunk=next((e.trunk for e in sources if e.trunk), ""),
        external_initiated=any(e.external_initiated for e in ordered),
        ringing=tuple(dict.fromkeys(x for d in own_dials for x in d.extensions)),
        dials=dials,
        bridges=tuple(e for e in ordered if e.event_type == "bridge"),
        start=starts[0] if starts else None,
        hangup=hangup,
        record_url=_record_url_of(ordered, hangup),
    )


def _distinct(events: Sequence[CallEvent]) -> tuple[CallEvent, ...]:
    seen_ids: set[int] = set()
    seen_content: set[tuple[Any, ...]] = set()
    kept: list[CallEvent] = []
    for event in sorted(events, key=lambda e: e.id):
        content = _content(event)
        if event.id in seen_ids or content in seen_content:
            continue
        seen_ids.add(event.id)
        seen_content.add(content)
        kept.append(event)
    return tuple(kept)


# What makes two events the same content: every field but where and when it was stored.
_content = operator.attrgetter(*(
    f.name for f in dataclasses.fields(CallEvent) if f.name not in {"id", "received_at", "origin"}
))


def _ending(ordered: Sequence[CallEvent]) -> CallEvent | None:
    endings = [e for e in ordered if e.is_ending]
    live = [e for e in endings if not e.is_download]
    return next(iter(live or endings), None)


def _record_url_of(ordered: Sequence[CallEvent], hangup: CallEvent | None) -> str | None:
    if hangup is not None and hangup.record_url:
        return hangup.record_url
    return next((e.record_url for e in reversed(ordered) if e.record_url), None)


def channel_extension(channel: str) -> str:
    """The peer of an Asterisk channel name: ``SIP/150-0000001a`` → ``150``; ``""`` if none.

    Handles ``SIP/``, ``PJSIP/``, ``IAX2/`` and the like (``-<hex>`` suffix dropped) and
    ``Local/150@context-00000001;1`` (the part before ``@``).
    """
    match = _CHANNEL.fullmatch(channel.strip())
    return match.group("peer") if match else ""


def direction(state: CallState, is_internal: Callable[[str], bool]) -> CallType | None:
    """The call's direction, decided from all its events; ``None`` when nothing decides it.

    ``is_internal`` tells the enterprise's internal numbers. The rules (docs/events.md,
    "When the events of a call disagree"):

    1. The strongest declared ``CallType`` wins (:attr:`CallState.call_types`): a start's
       or a dial's, a hangup's only when no start or dial carries one.
    2. ``INTERNAL`` counts only when the call can be internal: its ``Phone`` is an internal
       number, or it has none and every party of the call is one (an internal number is
       one ``is_internal`` accepts, or one shaped like an extension, 2–5 digits, that the
       enterprise has not listed). A declared ``INTERNAL`` on a call with an outside
       ``Phone`` is ignored and the next declared type decides. Click-to-call legs
       (``ExternalInitiated``) are exempt: they stay internal legs.
    3. With no declared type left, the events decide: internal as in 2 (with at least one
       party); incoming when the call has a ``start`` (outgoing calls have none) or a dial
       with ``ExtPhone`` (only incoming dials carry it); outgoing when click-to-call
       started it. Otherwise ``None``.
    """
    verdict = _internal_parties(state, is_internal)
    may_be_internal = state.external_initiated or verdict is not False
    for declared in state.call_types:
        if declared is not CallType.INTERNAL or may_be_internal:
            return declared
    if verdict:
        return CallType.INTERNAL
    if state.start is not None or any(d.ext_phone for d in state.dials):
        return CallType.INCOMING
    if state.external_initiated:
        return CallType.OUTGOING
    return None


def _internal_parties(state: CallState, is_internal: Callable[[str], bool]) -> bool | None:
    """Whether the call is between internal numbers; ``None`` when it names no party.

    An extension-shaped number (2–5 digits) the enterprise has not listed counts as
    internal here: only a number that cannot be an extension contradicts ``CallType`` 2.
    """
    def internal(number: str) -> bool:
        return is_internal(number) or phones.is_extension(number)

    if state.phone:
        return internal(state.phone)
    parties = _parties(state)
    return all(internal(x) for x in parties) if parties else None


def _parties(state: CallState) -> set[str]:
    """Every number the call's events name: dialled, on the hangup, in a bridge."""
    found = {x for d in state.dials for x in d.extensions}
    if state.hangup is not None:
        found.update(state.hangup.extensions, [state.hangup.internal_code])
    found.update(x for b in state.bridges for x in _sides(b))
    return {x for x in found if _is_party(x)}


def answered(state: CallState, is_internal: Callable[[str], bool]) -> bool:
    """Whether the call was answered, whatever its hangup's ``CallStatus`` claims.

    Answered: the hangup says ``CallStatus`` ``"2"`` (or ``"5"``, talk); or a bridge
    joined the call's outside party with an internal number (:func:`bridged_answerer`);
    or the hangup carries no ``CallStatus`` at all and the call has any bridge.
    """
    status = state.hangup.call_status if state.hangup is not None else ""
    if status in ANSWERED_STATUSES or bridged_answerer(state, is_internal) is not None:
        return True
    return not status and bool(state.bridges)


def bridged_answerer(state: CallState, is_internal: Callable[[str], bool]) -> str | None:
    """The internal number the call's outside party was last bridged with, or ``None``.

    A bridge joins the outside party when one of its sides (the peer of ``Channel``,
    ``CallerIDNum``, ``ConnectedLineNum``) is not internal and is the call's ``Trunk`` or
    its ``Phone`` (by digits; with nine digits or more, by the last nine, so
    ``+375291112233``, ``375291112233`` and ``80291112233`` are one number), and another
    side is internal. The last such bridge (in id order) wins: after a transfer it names
    the extension that took the call over.
    """
    customer = phones.digits(state.phone)
    found: str | None = None
    for bridge in state.bridges:
        sides = [x for x in _sides(bridge) if _is_party(x)]
        internal = [x for x in sides if is_internal(x)]
        outside = (x for x in sides if x not in internal)
        if internal and any(x == state.trunk or _same_number(x, customer) for x in outside):
            found = next((x for x in internal if x != state.phone), internal[0])
    return found


def answerer(state: CallState, is_internal: Callable[[str], bool]) -> str | None:
    """The internal extension that answered the call, or ``None`` when nothing says so.

    :func:`bridged_answerer` first. Else from any bridge, the LAST bridged internal
    extension winning; in each bridge the internal side is the first internal one of: the
    extension in ``Channel``, ``CallerIDNum``, ``ConnectedLineNum`` — preferring one other
    than the call's own ``Phone`` (on an internal call that is the caller, not the
    answerer). Without a bridge: the hangup's ``InternalCode`` (set by the platform,
    trusted as it is), else the hangup's first internal ``Extensions`` entry.
    """
    found = bridged_answerer(state, is_internal)
    if found is None:
        for bridge in state.bridges:
            found = _internal_side(bridge, state.phone, is_internal) or found
    if found is not None or state.hangup is None:
        return found
    if state.hangup.internal_code:
        return state.hangup.internal_code
    return next((x for x in state.hangup.extensions if is_internal(x)), None)


def _sides(bridge: CallEvent) -> tuple[str, str, str]:
    return channel_extension(bridge.channel), bridge.caller_id_num, bridge.connected_line_num


def _is_party(number: str) -> bool:
    """A real number, not a placeholder (``""``, ``<unknown>``, ``anonymous``)."""
    return bool(number) and not number.startswith("<") and number.lower() not in _ANONYMOUS


def _same_number(number: str, digits: str) -> bool:
    """``number`` is ``digits`` written another way: the same digits, or the same last nine."""
    own = phones.digits(number)
    if len(own) >= _SUBSCRIBER_DIGITS and len(digits) >= _SUBSCRIBER_DIGITS:
        return own[-_SUBSCRIBER_DIGITS:] == digits[-_SUBSCRIBER_DIGITS:]
    return bool(own) and own == digits


def _internal_side(
    bridge: CallEvent, caller: str, is_internal: Callable[[str], bool]
) -> str | None:
    internal = [x for x in _sides(bridge) if x and is_internal(x)]
    return next((x for x in internal if x != caller), internal[0] if internal else None)
