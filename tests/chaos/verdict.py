"""What the chaos run proved, read from the simulator's own record (every request it
received: when, with which key, what it met), the database and the daemons' output.

Each rule returns the violations it found (empty: held); ``Verdict.line`` is the one-line
summary the suite prints.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.integrations.retailcrm.simulator import (
    RATE_LIMIT_GENERAL,
    RATE_LIMIT_TELEPHONY,
    TELEPHONY_PREFIX,
    RecordedRequest,
    Simulator,
    key_fingerprint,
)
from tests.chaos.harness import Call, Enterprise

EVENT = "/api/v5/telephony/call/event"
UPLOAD = "/api/v5/telephony/calls/upload"
# A popup the CRM took whose attempt was then cut by a kill: the kill came within the
# attempt's time (and the outcome writer's next flush) after the popup arrived — or just
# before it was recorded: a request already on its way when the sender died is read a
# little later by a busy simulator.
KILL_REACH_S = 2.0 + 3.0
KILL_LAG_S = 1.0


def uids(record: RecordedRequest) -> list[str]:
    """The calls a request was about (its popup's, or each uploaded call's)."""
    event = record.form.get("event")
    if isinstance(event, dict):
        return [str(event.get("callExternalId"))]
    calls = record.form.get("calls")
    if isinstance(calls, list):
        return [str(c.get("externalId")) for c in calls if isinstance(c, dict)]
    return []


def popup_type(record: RecordedRequest) -> str | None:
    event = record.form.get("event")
    return str(event.get("type")) if isinstance(event, dict) else None


@dataclass(slots=True)
class Verdict:
    """The findings; every list must be empty and every flag true for the run to pass."""

    lost: list[str] = field(default_factory=list)
    disorder: list[str] = field(default_factory=list)
    cross_tenant: list[str] = field(default_factory=list)
    over_rate: list[str] = field(default_factory=list)
    unexplained_duplicates: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    breaker_opened: bool = False
    breaker_closed: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    def line(self, extra: Mapping[str, object]) -> str:
        """One line: what was driven, what went wrong on purpose, what came out."""
        shown = {**extra, **self.counts}
        shown["breaker_for_down_enterprise"] = (
            f"{'opened' if self.breaker_opened else 'NOT opened'}+"
            f"{'closed' if self.breaker_closed else 'NOT closed'}")
        for name in ("lost", "disorder", "cross_tenant", "over_rate",
                     "unexplained_duplicates", "unsettled", "leaked"):
            shown[name] = len(getattr(self, name))
        return "chaos: " + " ".join(f"{k}={v}" for k, v in shown.items())


def judge(sim: Simulator, calls: list[Call], firms: list[Enterprise], kills: list[float],
          deliveries: list[Mapping[str, Any]], stale: set[str], lines: list[dict[str, Any]],
          logs_text: str, secrets: Iterable[str], down: Enterprise) -> Verdict:
    """Every rule of the suite (see docs/operations.md, "The chaos suite")."""
    verdict = Verdict()
    records = sim.recorded()
    by_uid: dict[str, list[RecordedRequest]] = defaultdict(list)
    for record in records:
        for uid in uids(record):
            by_uid[uid].append(record)
    verdict.lost = _lost(sim, calls, deliveries, stale)
    verdict.disorder = _disorder(calls, by_uid)
    verdict.cross_tenant = _cross_tenant(calls, firms, records)
    verdict.over_rate, peak = _rates(records)
    kill_dups, stall_dups, verdict.unexplained_duplicates = _duplicates(records, kills)
    verdict.unsettled = [f"{d['unique_id']}/{d['event_type']}: {d['status']}"
                         f"{' leased' if d['locked_until'] else ''}"
                         for d in deliveries
                         if d["status"] not in ("done", "skipped") or d["locked_until"]]
    for line in sorted(lines, key=lambda one: str(one.get("timestamp", ""))):
        if line.get("enterprise") == down.number:
            verdict.breaker_opened |= line.get("event") == "breaker_opened"
            verdict.breaker_closed |= (line.get("event") == "breaker_closed"
                                       and verdict.breaker_opened)
    dumped = json.dumps(lines, ensure_ascii=False) + logs_text
    verdict.leaked = [s[:6] + "…" for s in secrets if s and s in dumped]
    uploads = Counter(uid for r in records if r.path == UPLOAD and r.status == 200
                      for uid in uids(r))
    verdict.counts = {
        "requests": len(records),
        "popups": sum(1 for r in records if r.path == EVENT and r.status == 200),
        "uploads": len(uploads),
        "answered_5xx": sum(1 for r in records if r.status is not None and r.status >= 500),
        "stalled": sum(1 for r in records if r.fault == "latency"),
        "dropped": sum(1 for r in records if r.fault == "outage"),
        "dup_popups_cut_by_kill": kill_dups,
        "dup_popups_cut_by_stall": stall_dups,
        "dup_uploads_deduplicated": sum(n - 1 for n in uploads.values() if n > 1),
        "stale_popups_skipped": len(stale),
        "peak_per_key_1s": peak,
    }
    return verdict


def _lost(sim: Simulator, calls: list[Call], deliveries: list[Mapping[str, Any]],
          stale: set[str]) -> list[str]:
    """Every call in RetailCRM's history; every in-order call's two popups shown, unless
    skipped as stale (older than a popup is worth)."""
    lost = []
    shown = {(e.get("callExternalId"), e.get("type")) for e in sim.state.call_events}
    for one in calls:
        if one.uid not in sim.state.uploaded_calls:
            lost.append(f"{one.uid}: no upload")
        if not one.in_order:
            continue
        for kind in ("in", "hangup"):
            if (one.uid, kind) not in shown and f"{one.uid}/{kind}" not in stale:
                lost.append(f"{one.uid}: no {kind} popup")
    lost += [f"{d['unique_id']}/{d['event_type']}: {d['status']} ({d['last_error']})"
             for d in deliveries if d["status"] == "failed"]
    return lost


def _disorder(calls: list[Call], by_uid: Mapping[str, list[RecordedRequest]]) -> list[str]:
    """A call's dial reaches RetailCRM before anything of its hangup; the hangup's popup
    before its upload (arrival times, every attempt counted)."""
    wrong = []
    for one in calls:
        records = by_uid.get(one.uid, [])
        dial = [r.monotonic for r in records if popup_type(r) == "in"]
        hang = [r.monotonic for r in records if popup_type(r) == "hangup"]
        upload = [r.monotonic for r in records if r.path == UPLOAD]
        if dial and (hang or upload) and max(dial) > min(hang + upload):
            wrong.append(f"{one.uid}: hangup before dial")
        if hang and upload and min(hang) > min(upload):
            wrong.append(f"{one.uid}: upload before the hangup popup")
    return wrong


def _cross_tenant(calls: list[Call], firms: list[Enterprise],
                  records: list[RecordedRequest]) -> list[str]:
    """Each request carries the API key of the enterprise its calls belong to."""
    owner = {one.uid: one.enterprise for one in calls}
    keys = {firm.number: key_fingerprint(firm.key) for firm in firms}
    wrong = []
    for record in records:
        for uid in uids(record):
            if record.key_id != keys.get(owner.get(uid, ""), "?"):
                wrong.append(f"{record.path} for {uid} sent with another key")
    return wrong


def _rates(records: list[RecordedRequest]) -> tuple[list[str], int]:
    """The most requests of one key in any sliding 1 s window, per RetailCRM's buckets."""
    times: dict[tuple[str | None, bool], list[float]] = defaultdict(list)
    for record in records:
        times[(record.key_id, record.path.startswith(TELEPHONY_PREFIX))].append(record.monotonic)
    over, peak = [], 0
    for (key, telephony), moments in times.items():
        moments.sort()
        start = most = 0
        for end, t in enumerate(moments):
            while t - moments[start] >= 1.0:
                start += 1
            most = max(most, end - start + 1)
        limit = RATE_LIMIT_TELEPHONY if telephony else RATE_LIMIT_GENERAL
        peak = max(peak, most)
        if most > limit:
            over.append(f"key {key}: {most} requests in one second (limit {limit})")
    return over, peak


def _duplicates(records: list[RecordedRequest],
                kills: list[float]) -> tuple[int, int, list[str]]:
    """Popups RetailCRM showed twice: each repeat must follow a copy whose attempt was cut,
    by a stall past the attempt timeout or by a kill."""
    shown: dict[tuple[str, str | None], list[RecordedRequest]] = defaultdict(list)
    for record in records:
        if record.path == EVENT and record.status == 200:
            for uid in uids(record):
                shown[(uid, popup_type(record))].append(record)
    by_kill = by_stall = 0
    unexplained = []
    for (uid, kind), copies in shown.items():
        copies.sort(key=lambda r: r.monotonic)
        for before in copies[:-1]:
            if before.fault == "latency":
                by_stall += 1
            elif any(before.monotonic - KILL_LAG_S <= k <= before.monotonic + KILL_REACH_S
                     for k in kills):
                by_kill += 1
            else:
                when = ", ".join(f"{c.monotonic:.2f} ({c.fault or 'no fault'})" for c in copies)
                unexplained.append(f"{uid}/{kind} shown at {when}; kills at "
                                   f"{', '.join(f'{k:.2f}' for k in kills)}")
    return by_kill, by_stall, unexplained
