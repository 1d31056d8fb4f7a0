"""Realistic calls, as the platform's Asterisk hosts report them (docs/events.md). Pure.

A :class:`Call` is the events one call produces, each at its moment after the call began
(:class:`Step`), with the bodies the Asterisk listener really sends: ``CallType`` an int
from the listener and sometimes the string ``"0"`` from the dialplan, callers with or
without ``+`` or in local format, ``Extensions`` on a hangup as ``[""]``, both sides of a
bridge, times as the host's local ``YYYY-MM-DD HH:MM:SS``. The kinds, as a steady stream
mixes them (:data:`MIX`):

* ``incoming`` — start → dial (several extensions ring, now and then a manager's mobile
  too) → bridge (who answered) → hangup ``CallStatus "2"``, with a recording;
* ``missed`` — start → dial → hangup ``CallStatus "0"``, nobody answered;
* ``outgoing`` — dial (the caller's extension) → bridge → hangup (no ``start``); now and
  then unanswered;
* ``internal`` — dial → hangup between two extensions, ``Trunk`` empty;
* ``late_dial`` — a missed call whose dial is stored a second after its hangup;
* ``recovered`` — an answered call whose live hangup was lost: the recovery job sends it
  later as ``download`` (origin ``download``), with the recording.

:class:`CallFactory` makes them for one enterprise (:class:`Line`); the demo replays them
in real time (:mod:`daemon.demo.traffic`), and a test or a benchmark can use them as they
are.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
RECORDINGS_URL: Final = "https://records.example.com/demo"
# How often each kind comes, out of 100 calls.
MIX: Final = (("incoming", 36), ("missed", 16), ("outgoing", 24), ("internal", 8),
              ("late_dial", 8), ("recovered", 8))
KINDS: Final = tuple(kind for kind, _ in MIX)
_OPERATORS: Final = ("25", "29", "33", "44")


@dataclass(frozen=True, slots=True)
class Line:
    """What the calls of one enterprise need: its ``Token`` (``enterprises.name2``), its
    provider line (``Trunk``), its internal numbers, and the zone its Asterisk host keeps
    time in."""

    token: str
    trunk: str
    extensions: tuple[str, ...]
    time_zone: str = "Europe/Minsk"


@dataclass(frozen=True, slots=True)
class Step:
    """One event of a call, ``at_s`` seconds after the call began."""

    at_s: float
    event_type: str
    body: dict[str, Any]
    origin: str = "live"
    record_url: str | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One call's events, in the order they are stored."""

    kind: str
    unique_id: str
    steps: tuple[Step, ...]

    @property
    def duration_s(self) -> float:
        """When its last event is stored, after the call began."""
        return max(step.at_s for step in self.steps)


class CallFactory:
    """Calls of one enterprise: ``make(kind, now, seq)``, or ``next(now, seq)`` for one of
    the mix. ``seq`` makes the ``UniqueId`` (``"<epoch>.<seq>"``, a string as Asterisk's)."""

    def __init__(self, line: Line, rng: random.Random) -> None:
        if len(line.extensions) < 2:
            raise ValueError("a line needs at least two internal numbers")
        self.line = line
        self.rng = rng
        self._zone = ZoneInfo(line.time_zone)

    def next(self, now: datetime, seq: int) -> Call:
        """A call of a kind drawn from :data:`MIX`."""
        kind = self.rng.choices(KINDS, weights=[w for _, w in MIX])[0]
        return self.make(kind, now, seq)

    def make(self, kind: str, now: datetime, seq: int) -> Call:
        """A call of ``kind`` (one of :data:`KINDS`) beginning at ``now``."""
        uid = f"{int(now.timestamp())}.{seq}"
        build = {"incoming": self._incoming, "missed": self._missed,
                 "outgoing": self._outgoing, "internal": self._internal,
                 "late_dial": self._late_dial, "recovered": self._recovered}[kind]
        return Call(kind, uid, tuple(build(uid, now)))

    # ------------------------------------------------------------------ the kinds

    def _incoming(self, uid: str, now: datetime) -> list[Step]:
        phone, ringing = self._caller(), self._ringing()
        ring, talk = self._uniform(2, 6), self._uniform(4, 20)
        answerer = self.rng.choice([r for r in ringing if r in self.line.extensions])
        end = 0.3 + ring + talk
        return [
            Step(0.0, "start", self._start(uid, phone)),
            Step(0.3, "dial", self._dial_in(uid, phone, ringing)),
            *self._bridge(uid, 0.3 + ring, phone, answerer),
            Step(end, "hangup", self._hangup(uid, 0, phone, now, end, "2"),
                 record_url=self._recording(uid)),
        ]

    def _missed(self, uid: str, now: datetime) -> list[Step]:
        phone, ringing = self._caller(), self._ringing()
        end = 0.3 + self._uniform(6, 12)
        return [
            Step(0.0, "start", self._start(uid, phone)),
            Step(0.3, "dial", self._dial_in(uid, phone, ringing)),
            Step(end, "hangup", self._hangup(uid, 0, phone, now, end, "0")),
        ]

    def _outgoing(self, uid: str, now: datetime) -> list[Step]:
        caller = self.rng.choice(self.line.extensions)
        number = self._caller(local=True)
        dial = {"Token": self.line.token, "UniqueId": uid, "CallType": 1, "Phone": number,
                "Extensions": [caller], "Trunk": self.line.trunk, "ExtPhone": ""}
        ring = self._uniform(2, 5)
        if self.rng.random() < 0.2:  # nobody picked up
            end = ring + self._uniform(4, 8)
            return [Step(0.0, "dial", dial),
                    Step(end, "hangup", self._hangup(uid, 1, number, now, end, "0"))]
        end = ring + self._uniform(4, 20)
        return [
            Step(0.0, "dial", dial),
            *self._bridge(uid, ring, number, caller),
            Step(end, "hangup", self._hangup(uid, 1, number, now, end, "2"),
                 record_url=self._recording(uid)),
        ]

    def _internal(self, uid: str, now: datetime) -> list[Step]:
        caller, callee = self.rng.sample(self.line.extensions, 2)
        dial = {"Token": self.line.token, "UniqueId": uid, "CallType": 2, "Phone": caller,
                "Extensions": [callee], "Trunk": "", "ExtPhone": ""}
        end = self._uniform(5, 15)
        hangup = self._hangup(uid, 2, caller, now, end, "2")
        hangup["Trunk"] = ""
        return [Step(0.0, "dial", dial), Step(end, "hangup", hangup)]

    def _late_dial(self, uid: str, now: datetime) -> list[Step]:
        phone, ringing = self._caller(), self._ringing()
        end = self._uniform(5, 9)
        return [
            Step(0.0, "start", self._start(uid, phone)),
            Step(end, "hangup", self._hangup(uid, 0, phone, now, end, "0")),
            Step(end + 1.0, "dial", self._dial_in(uid, phone, ringing)),
        ]

    def _recovered(self, uid: str, now: datetime) -> list[Step]:
        steps = self._incoming(uid, now)
        lost = steps[-1]
        return [*steps[:-1], Step(lost.at_s + self._uniform(4, 8), "download", lost.body,
                                  origin="download", record_url=lost.record_url)]

    # ------------------------------------------------------------------ bodies

    def _start(self, uid: str, phone: str) -> dict[str, Any]:
        # The dialplan sends CallType as a string, the listener as an int: both happen.
        call_type: int | str = "0" if self.rng.random() < 0.3 else 0
        return {"Token": self.line.token, "UniqueId": uid, "CallType": call_type,
                "Phone": phone, "Trunk": self.line.trunk}

    def _dial_in(self, uid: str, phone: str, ringing: Sequence[str]) -> dict[str, Any]:
        return {"Token": self.line.token, "UniqueId": uid, "CallType": 0, "Phone": phone,
                "Extensions": list(ringing), "Trunk": self.line.trunk, "ExtPhone": phone}

    def _bridge(self, uid: str, at_s: float, phone: str, extension: str) -> list[Step]:
        """Both channels entering one bridge: the provider line's and the extension's."""
        bridge_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        digits = phone.lstrip("+")
        channel = self.rng.getrandbits(24)
        outside = {"Token": self.line.token, "UniqueId": uid,
                   "Channel": f"SIP/{self.line.trunk}-{channel:08x}", "Exten": self.line.trunk,
                   "CallerIDNum": digits, "CallerIDName": "<unknown>",
                   "ConnectedLineNum": extension, "ConnectedLineName": "<unknown>",
                   "BridgeUniqueid": bridge_id}
        inside = {"Token": self.line.token, "UniqueId": uid,
                  "Channel": f"SIP/{extension}-{channel + 1:08x}", "Exten": extension,
                  "CallerIDNum": extension, "CallerIDName": extension,
                  "ConnectedLineNum": digits, "ConnectedLineName": "<unknown>",
                  "BridgeUniqueid": bridge_id}
        return [Step(at_s, "bridge", outside), Step(at_s + 0.05, "bridge", inside)]

    def _hangup(self, uid: str, call_type: int, phone: str, now: datetime, end_s: float,
                status: str) -> dict[str, Any]:
        local = now.astimezone(self._zone)
        started = local.strftime(TIME_FORMAT)
        if self.rng.random() < 0.1:  # seen: a hangup whose StartTime is empty
            started = ""
        return {"Token": self.line.token, "UniqueId": uid, "CallType": call_type,
                "Phone": phone, "Extensions": [""], "Trunk": self.line.trunk,
                "DateReceived": local.strftime(TIME_FORMAT),
                "StartTime": started,
                "EndTime": (local + timedelta(seconds=end_s)).strftime(TIME_FORMAT),
                "CallStatus": status}

    # ------------------------------------------------------------------ values

    def _caller(self, *, local: bool = False) -> str:
        """A Belarusian mobile number, as callers' numbers come: ``+375…``, ``375…``, or
        ``80…`` (local format; what a manager dials)."""
        number = f"{self.rng.choice(_OPERATORS)}{self.rng.randrange(10**6, 10**7)}"
        shape = self.rng.random()
        if local or shape < 0.2:
            return "80" + number
        return ("+375" if shape < 0.7 else "375") + number

    def _ringing(self) -> list[str]:
        """The extensions an incoming call rings: two or more, now and then a mobile."""
        count = self.rng.randint(2, len(self.line.extensions))
        ringing = self.rng.sample(self.line.extensions, count)
        if self.rng.random() < 0.2:  # follow-me: a manager's mobile rings too
            ringing.append(f"37529{self.rng.randrange(10**6, 10**7)}")
        return ringing

    def _recording(self, uid: str) -> str:
        return f"{RECORDINGS_URL}/{uid}.mp3"

    def _uniform(self, low: float, high: float) -> float:
        return round(self.rng.uniform(low, high), 2)
