"""RetailCRM mapping, pure: a platform call event (and its call) → RetailCRM requests.

Owns what RetailCRM sees of each call (docs/events.md, "What RetailCRM receives"; wire
format in docs/retailcrm.md). :func:`plan` turns the event being delivered, with every stored
event of the same call, into a :class:`Plan`: the ``event`` object for ``POST
/api/v5/telephony/call/event`` and/or one ``calls`` item for ``POST
/api/v5/telephony/calls/upload``, or why nothing is sent. No I/O, no clock: the caller reads
the call's events from the database, so a restart loses nothing (the ringing codes and the
answerer are always re-derived from the stored events).

The call's direction (in, out, internal) and whether it was answered are decided from ALL
its stored events, in any arrival order, never from the delivered event alone
(:func:`daemon.calls.direction`, :func:`daemon.calls.answered`): the first start's or
dial's ``CallType`` wins over a hangup's, a call with an outside ``Phone`` is never
internal, and a bridge of the customer with an internal number means answered.

Mapping (the first matching row wins; "call" is the call's direction; the switches are
:class:`MappingOptions` fields):

| event    | condition                                 | call/event                 | upload   |
|----------|-------------------------------------------|----------------------------|----------|
| start    | — (feeds the fold only)                   | skip ``no_request``        | —        |
| bridge   | — (feeds the fold: who answered)          | skip ``no_request``        | —        |
| any      | same content as an earlier event          | skip ``duplicate``         | —        |
| dial     | CallType 2 + ExternalInitiated (c2c leg)  | skip ``click_to_call_leg`` | —        |
| any      | nothing in the call gives a direction     | skip ``no_direction``      | —        |
| any      | call internal + ExternalInitiated         | skip ``click_to_call_leg`` | — always |
| any      | call internal, ``log_internal`` off       | skip ``internal_call``     | —        |
| dial     | the call's hangup was stored before it    | skip ``late_dial``         | —        |
| dial     | call internal, ``log_internal`` on        | ``internal_call_no_popup`` | —        |
| dial     | call incoming, ``popup_incoming``         | ``type=in`` (1)            | —        |
| dial     | call outgoing, ``popup_outgoing``         | ``type=out`` (2)           | —        |
| hangup   | call incoming or outgoing                 | ``type=hangup`` (3)        | item (4) |
| hangup   | call internal, ``log_internal`` on        | —                          | item (5) |
| download | as a hangup                               | — (never a popup)          | item (4) |

``late_dial``: a dial stored after its call's hangup arrives when the call is over; a card
opened now would never be closed (the hangup's ``call/event`` has gone), so none is. The
dial still counts: its ringing extensions are part of the call, so the hangup's history
upload, planned again with every stored event (a settle window after the hangup), names the
ringing manager. ``no_direction`` is not a fault: replaying cannot fix it.

(1) phone = the caller normalised (an outside number before an extension: a transfer's dial
may name the transferring extension), codes = every ringing extension of this dial that is
an internal number (every ringing manager gets the card), userIds = their managers.
(2) phone = the dialled number, codes = the caller's extension (the dial's ``Extensions``).
(3) if ``popup_hangup``: ``hangupStatus``; codes = every internal extension that rang in any
dial, the hangup's own internal ``Extensions``, and the call's owner (see below).
(4) if ``upload_history``: ``date``, ``type`` in/out, ``phone``, ``result``, ``duration``,
``durationWaiting`` (when derivable), ``code``/``userId`` of the owner, ``externalId``,
``recordUrl`` (if ``upload_recordings`` and the call has one), ``externalPhone``. A download
is uploaded even when the live hangup was too: uploads are idempotent by ``externalId``.
(5) a logged internal call is history only, from the caller's side: ``type=out``, ``phone``
= the called extension, ``code``/``userId`` = the calling extension (``Phone``) and its
manager. No popup: a card for a colleague's extension helps nobody.

Every event carries ``callExternalId`` = every upload's ``externalId`` = ``UniqueId``, and
``externalPhone`` when ``external_phones`` has the call's ``Trunk`` (sent as configured, so
it matches the module's registered ``externalPhones``). ``ExtPhone`` is the caller on an
incoming dial, not the line: it is never sent as ``externalPhone``. ``codes`` are strings,
``userIds`` ints. A popup with no internal extension to show it to is not sent
(``no_internal_extension``); a call with no usable phone is not sent (``no_phone``).

Status (the hangup's ``CallStatus``, refined by an Asterisk ``DialStatus``/``Disposition``
when the body has one and the call was not answered):

================  =============================  ================  ==================
CallStatus        DialStatus / Disposition       hangupStatus      upload ``result``
================  =============================  ================  ==================
"2", "5" (talk)   any                            answered          answered
any               — the customer was bridged     answered          answered
                  with an internal number
absent            — and the call has a bridge    answered          answered
other             BUSY                           busy              busy
other             CANCEL                         cancel            no answer
other             NOANSWER / NO ANSWER           no answered       no answer
other             CONGESTION/CHANUNAVAIL/FAILED  failed            failed
"0"               none / other                   no answered       no answer
"1", other        none / other                   failed            unknown
================  =============================  ================  ==================

The upload never says ``no answered`` (that is the hangup event's spelling only).

Who the call belongs to (the upload's ``code``/``userId``; also added to the hangup's codes):
incoming answered → :func:`daemon.calls.answerer` (the internal number last bridged with the
customer, else the last bridged internal extension, else the hangup's
``InternalCode``/``Extensions``), else the only internal extension that rang;
incoming missed → the last ringing internal extension that has a manager, else the last
ringing internal extension, else the hangup's own ``InternalCode``/``Extensions``;
outgoing → the caller's extension (the dial's), else the answerer evidence; internal (logged)
→ the calling extension (``Phone``), the upload's ``phone`` being the called extension.

Times: ``date`` is the hangup's ``StartTime``, else the earliest ``StartTime``/``DateReceived``
of the call's events (host-local, read in ``host_zone``, sent in ``crm_zone`` as
``Y-m-d H:i:s``), else when crm-bridge stored the call's first event
(:attr:`daemon.calls.CallState.started_at`). ``duration`` = seconds from that start to
``EndTime`` when answered, else 0, never negative. Among several dials of one call, "last
ringing" means last stored: dials carry no time. ``durationWaiting`` is only derived from
the hangup's own host clock:
answered → ``StartTime − DateReceived`` (both present, ``StartTime`` taken as the answer);
missed → ``EndTime − start``; omitted when a time is missing or the difference is negative.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from daemon import calls, phones
from daemon.calls import CallEvent, CallState, CallType, answerer, fold_call

T = TypeVar("T")

UPLOAD_BATCH_SIZE = 50  # calls per calls/upload request (docs/retailcrm.md; unconfirmed)
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # RetailCRM's Y-m-d H:i:s

_REFINED: Mapping[str, tuple[str, str]] = {
    "BUSY": ("busy", "busy"),
    "CANCEL": ("cancel", "no answer"),
    "NOANSWER": ("no answered", "no answer"),
    "CONGESTION": ("failed", "failed"),
    "CHANUNAVAIL": ("failed", "failed"),
    "FAILED": ("failed", "failed"),
}


class Skip(StrEnum):
    """Why a part of a plan sends nothing; ``Plan.skipped`` joins them with ``", "``."""

    NO_REQUEST = "no_request"  # start and bridge only feed the fold
    DUPLICATE = "duplicate"  # the same event content was stored earlier
    CLICK_TO_CALL_LEG = "click_to_call_leg"  # an intermediate leg, not a call of its own
    INTERNAL_CALL = "internal_call"  # log_internal is off
    INTERNAL_CALL_NO_POPUP = "internal_call_no_popup"  # logged internal calls: history only
    LATE_DIAL = "late_dial"  # the call's hangup was stored before this dial: no card
    NO_DIRECTION = "no_direction"  # nothing in the call tells incoming, outgoing, internal
    POPUP_INCOMING_OFF = "popup_incoming_off"
    POPUP_OUTGOING_OFF = "popup_outgoing_off"
    POPUP_HANGUP_OFF = "popup_hangup_off"
    UPLOAD_HISTORY_OFF = "upload_history_off"
    NO_INTERNAL_EXTENSION = "no_internal_extension"  # nobody to show the popup to
    NO_PHONE = "no_phone"  # the other party's number is empty (anonymous)


@dataclass(frozen=True, slots=True)
class MappingOptions:
    """One enterprise's RetailCRM settings, as far as the mapping needs them.

    ``user_extensions`` maps a RetailCRM user id (a string) to its internal number;
    ``internal_numbers`` are the enterprise's extensions; ``external_phones`` maps a trunk
    id to the line's own phone. See :meth:`is_internal` for what counts as internal.
    """

    host_zone: ZoneInfo
    crm_zone: ZoneInfo
    region: str = phones.DEFAULT_REGION
    popup_incoming: bool = True
    popup_outgoing: bool = True
    popup_hangup: bool = True
    upload_history: bool = True
    upload_recordings: bool = True
    log_internal: bool = False
    user_extensions: Mapping[str, str] = field(default_factory=dict)
    internal_numbers: frozenset[str] = frozenset()
    external_phones: Mapping[str, str] = field(default_factory=dict)

    def is_internal(self, number: str) -> bool:
        """Whether ``number`` is this enterprise's extension.

        Known extensions are ``internal_numbers`` plus the numbers mapped to managers. When
        the enterprise has none at all (nothing configured yet), a 2–5 digit number counts
        as an extension, as :func:`daemon.phones.is_extension` says.
        """
        mapped = self.user_extensions.values()
        if number in self.internal_numbers or number in mapped:
            return True
        return not self.internal_numbers and not mapped and phones.is_extension(number)

    def user_ids(self, code: str) -> list[int]:
        """The managers (RetailCRM user ids, ascending) mapped to extension ``code``."""
        found = (uid.strip() for uid, number in self.user_extensions.items() if number == code)
        return sorted(int(uid) for uid in found if uid.isdigit())


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send for one event: a ``call/event`` object and/or one ``calls/upload`` item.

    ``skipped`` is set exactly when both are ``None`` (comma-joined :class:`Skip` values).
    ``phone_unparsed`` tells the caller to log that the phone went out as digits only.
    """

    event: dict[str, Any] | None
    upload: dict[str, Any] | None
    skipped: str | None
    phone_unparsed: bool = False

    @classmethod
    def skip(cls, *reasons: Skip) -> Plan:
        """A plan that sends nothing, for these reasons."""
        return cls(None, None, ", ".join(reasons))


def batches(items: Sequence[T], size: int = UPLOAD_BATCH_SIZE) -> list[list[T]]:
    """``items`` in order, cut into lists of at most ``size`` (uploads: 50 per request)."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def plan(current: CallEvent, call: Sequence[CallEvent], options: MappingOptions) -> Plan:
    """Decide what RetailCRM gets for ``current`` (see the module's tables).

    ``call`` is every stored event of the same call (it may or may not include ``current``,
    and may include events stored after it). The call's direction and outcome are decided
    from all of them (:func:`daemon.calls.direction`, :func:`daemon.calls.answered`), never
    from ``current`` alone; a call nothing gives a direction is skipped (``no_direction``).
    ``Plan.event`` and ``Plan.upload`` are each meaningful alone: a caller may send one now
    and plan the event again later for the other.
    """
    if current.event_type in ("start", "bridge"):
        return Plan.skip(Skip.NO_REQUEST)
    state = fold_call([*call, current])
    if current.id not in {e.id for e in state.events}:
        return Plan.skip(Skip.DUPLICATE)
    if current.event_type == "dial" and current.is_click_to_call_leg:
        return Plan.skip(Skip.CLICK_TO_CALL_LEG)
    direction = calls.direction(state, options.is_internal)
    if direction is None:
        return Plan.skip(Skip.NO_DIRECTION)
    if direction is CallType.INTERNAL:
        if state.external_initiated:
            return Plan.skip(Skip.CLICK_TO_CALL_LEG)
        if not options.log_internal:
            return Plan.skip(Skip.INTERNAL_CALL)
    if current.event_type == "dial":
        return _plan_dial(current, state, direction, options)
    return _plan_ending(current, state, direction, options)


def _plan_dial(
    dial: CallEvent, state: CallState, direction: CallType, options: MappingOptions
) -> Plan:
    if any(e.is_ending and e.id < dial.id for e in state.events):
        return Plan.skip(Skip.LATE_DIAL)
    if direction is CallType.INTERNAL:
        return Plan.skip(Skip.INTERNAL_CALL_NO_POPUP)
    incoming = direction is CallType.INCOMING
    if not (options.popup_incoming if incoming else options.popup_outgoing):
        return Plan.skip(Skip.POPUP_INCOMING_OFF if incoming else Skip.POPUP_OUTGOING_OFF)
    codes = [x for x in dict.fromkeys(dial.extensions) if options.is_internal(x)]
    if not codes:
        return Plan.skip(Skip.NO_INTERNAL_EXTENSION)
    phone, parsed = phones.normalize_ex(_dial_phone(dial, state, incoming, options),
                                        options.region)
    if not phone:
        return Plan.skip(Skip.NO_PHONE)
    event = {
        "type": "in" if incoming else "out",
        "phone": phone,
        "codes": codes,
        "userIds": _user_ids(codes, options),
        "callExternalId": state.unique_id,
    }
    _add_external_phone(event, dial.trunk or state.trunk, options)
    return Plan(event, None, None, phone_unparsed=not parsed)


def _dial_phone(dial: CallEvent, state: CallState, incoming: bool, options: MappingOptions) -> str:
    """The other party a dial's card shows: the dial's ``Phone`` (incoming: else its
    ``ExtPhone``), else the call's; an outside number before an extension, since a
    transfer's dial may name the transferring extension rather than the customer."""
    found = [x for x in (dial.phone, dial.ext_phone if incoming else "", state.phone) if x]
    return next((x for x in found if not options.is_internal(x)), found[0] if found else "")


@dataclass(frozen=True, slots=True)
class _Ending:
    """What a hangup's popup and upload share."""

    hangup: CallEvent
    direction: CallType
    phone: str
    status: str  # hangupStatus
    result: str  # the upload's result
    answered: bool
    owner: str | None


def _plan_ending(
    current: CallEvent, state: CallState, direction: CallType, options: MappingOptions
) -> Plan:
    """A hangup (live: popup + upload) or a download (upload only)."""
    hangup = state.hangup or current
    status, result, answered = _outcome(hangup, state, options)
    raw = _internal_callee(state, options) if direction is CallType.INTERNAL else state.phone
    phone, parsed = phones.normalize_ex(raw, options.region)
    owner = _owner(state, direction, answered, options)
    ending = _Ending(hangup, direction, phone, status, result, answered, owner)
    reasons: list[Skip] = []
    event: dict[str, Any] | None = None
    if current.is_download or direction is CallType.INTERNAL:
        pass  # a recovered hangup never pops up; a logged internal call is history only
    elif not options.popup_hangup:
        reasons.append(Skip.POPUP_HANGUP_OFF)
    else:
        event = _hangup_event(state, ending, options, reasons)
    upload: dict[str, Any] | None = None
    if not options.upload_history:
        reasons.append(Skip.UPLOAD_HISTORY_OFF)
    elif not phone:
        reasons.append(Skip.NO_PHONE)
    else:
        upload = _upload(state, ending, options)
    if event is None and upload is None:
        return Plan.skip(*dict.fromkeys(reasons))
    return Plan(event, upload, None, phone_unparsed=bool(phone) and not parsed)


def _outcome(
    hangup: CallEvent, state: CallState, options: MappingOptions
) -> tuple[str, str, bool]:
    """``(hangupStatus, upload result, answered)`` per the module's status table."""
    if calls.answered(state, options.is_internal):
        return "answered", "answered", True
    refined = _REFINED.get(hangup.dial_status)
    if refined is not None:
        return refined[0], refined[1], False
    if hangup.call_status == "0":
        return "no answered", "no answer", False
    return "failed", "unknown", False


def _owner(
    state: CallState, direction: CallType, answered: bool, options: MappingOptions
) -> str | None:
    """The extension the call belongs to (module docstring: "Who the call belongs to")."""
    rang = [x for x in state.ringing if options.is_internal(x)]
    if direction is CallType.INTERNAL:
        return state.phone or None
    if direction is CallType.OUTGOING:
        return rang[0] if rang else answerer(state, options.is_internal)
    if answered:
        who = answerer(state, options.is_internal)
        return who if who is not None else (rang[0] if len(rang) == 1 else None)
    managed = [x for x in rang if options.user_ids(x)]
    if managed or rang:
        return (managed or rang)[-1]
    return answerer(state, options.is_internal)


def _internal_callee(state: CallState, options: MappingOptions) -> str:
    """On a logged internal call: the called extension (the upload's ``phone``)."""
    who = answerer(state, options.is_internal)
    if who and who != state.phone:
        return who
    targets = [x for x in state.ringing if x != state.phone]
    return targets[0] if targets else ""


def _hangup_event(
    state: CallState, ending: _Ending, options: MappingOptions, reasons: list[Skip]
) -> dict[str, Any] | None:
    """The ``type=hangup`` event for everyone whose card opened, plus the call's owner."""
    if not ending.phone:
        reasons.append(Skip.NO_PHONE)
        return None
    owner = ending.owner
    candidates = [*state.ringing, *ending.hangup.extensions, *([owner] if owner else [])]
    codes = [x for x in dict.fromkeys(candidates) if x == owner or options.is_internal(x)]
    if not codes:
        reasons.append(Skip.NO_INTERNAL_EXTENSION)
        return None
    event = {
        "type": "hangup",
        "phone": ending.phone,
        "codes": codes,
        "userIds": _user_ids(codes, options),
        "callExternalId": state.unique_id,
        "hangupStatus": ending.status,
    }
    _add_external_phone(event, state.trunk, options)
    return event


def _upload(state: CallState, ending: _Ending, options: MappingOptions) -> dict[str, Any]:
    """One ``calls`` item: history, result, times, owner and recording."""
    started = _aware(state.started_at, options)
    ended = _aware(ending.hangup.end_time, options)
    date = started or state.first_stored_at
    item: dict[str, Any] = {
        "date": date.astimezone(options.crm_zone).strftime(DATE_FORMAT),
        "type": "in" if ending.direction is CallType.INCOMING else "out",
        "phone": ending.phone,
        "result": ending.result,
        "duration": max(0, _seconds(started, ended) or 0) if ending.answered else 0,
        "externalId": state.unique_id,
    }
    if ending.owner:
        item["code"] = ending.owner
        user_ids = options.user_ids(ending.owner)
        if user_ids:
            item["userId"] = user_ids[0]
    waiting = _waiting(ending, started, ended, options)
    if waiting is not None:
        item["durationWaiting"] = waiting
    if state.record_url and options.upload_recordings:
        item["recordUrl"] = state.record_url
    _add_external_phone(item, state.trunk, options)
    return item


def _aware(moment: datetime | None, options: MappingOptions) -> datetime | None:
    """A host-local time (naive, as in the bodies) made aware in ``host_zone``."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=options.host_zone)


def _seconds(since: datetime | None, until: datetime | None) -> int | None:
    """Whole seconds between two aware times (through UTC: right across DST changes)."""
    if since is None or until is None:
        return None
    return round((until.astimezone(UTC) - since.astimezone(UTC)).total_seconds())


def _waiting(
    ending: _Ending, started: datetime | None, ended: datetime | None, options: MappingOptions
) -> int | None:
    """Answered: ``StartTime − DateReceived``; missed: ``EndTime − start``; else ``None``."""
    if ending.answered:
        if ending.hangup.start_time is None:
            return None
        waited = _seconds(_aware(ending.hangup.date_received, options), started)
    else:
        waited = _seconds(started, ended)
    return waited if waited is not None and waited >= 0 else None


def _user_ids(codes: Sequence[str], options: MappingOptions) -> list[int]:
    return list(dict.fromkeys(uid for code in codes for uid in options.user_ids(code)))


def _add_external_phone(target: dict[str, Any], trunk: str, options: MappingOptions) -> None:
    line = options.external_phones.get(trunk) if trunk else None
    if line:
        target["externalPhone"] = line
