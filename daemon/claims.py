"""What a claim hands the dispatcher: each claimed delivery, with its event and its call.

``store.CLAIM`` returns, for every delivery it takes, the event's row and — in the same
statement, so that no delivery costs a round trip more — the call's other stored events
(the ``call_*`` arrays: ids, types, payloads as text, recordings, origins, arrival times).
Payloads are decoded one row at a time (``daemon.db.decode_json``): the delivered event's
at once, where a payload that cannot be read dead-letters that delivery alone
(``malformed``); the call's other events only when the adapter asks for the call
(``DeliveryContext.load_call``), an unreadable one being left out (its own delivery, if it
has one, fails on its own) — an adapter that never asks never pays for them.

The call is as the claim saw it. An attempt that starts more than ``CALL_FRESH_S`` after its
claim — it queued behind its enterprise's other attempts — reads the call again
(``store.call_events``): events of the call stored meanwhile count, as they always did.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from daemon import store
from daemon.calls import StoredEvent
from daemon.db import UnreadableJson, decode_json

log = structlog.get_logger(__name__)

# The call the claim returned is used by an attempt that starts within this time of the
# claim (every attempt that did not wait for a slot: the claim starts them at once).
CALL_FRESH_S = 0.5


@dataclass(slots=True)
class Claimed:
    """One claimed delivery with its event; ``progress`` collects the steps this attempt
    finishes (shared with its ``DeliveryContext``, kept even when the attempt is cut).
    ``row`` is the claimed row itself, holding the call's other events still undecoded."""

    event: StoredEvent
    enterprise: str
    attempt: int
    queued_at: datetime
    lease: str
    lease_deadline: float  # monotonic
    row: Mapping[str, Any]
    suspect: bool = False  # its lease expired twice or more without an outcome
    steps_done: frozenset[str] = frozenset()
    stored_s: float = 0.0  # the event's age at the claim
    claimed_at: float = 0.0  # monotonic
    progress: set[str] = field(default_factory=set)

    def steps(self) -> str | None:
        """Every step done so far, as ``SETTLE`` stores them (None: nothing new)."""
        if not self.progress - self.steps_done:
            return None
        return ",".join(sorted(self.steps_done | self.progress))


def claimed(row: Mapping[str, Any], lease: str, started: float) -> Claimed:
    """A claimed row (not dead-lettered) as a ``Claimed``; ``UnreadableJson`` when its
    payload cannot be read. ``started`` is the monotonic time the claim was sent."""
    event = StoredEvent(
        row["event_id"], row["event_type"], row["unique_id"], decode_json(row["payload"]),
        row["record_url"], row["origin"], row["received_at"],
    )
    return Claimed(
        event, row["enterprise_number"], row["attempts"], row["queued_at"], lease,
        started + row["lease_s"], row, suspect=row["suspect"],
        steps_done=frozenset(row["steps_done"]), stored_s=row["stored_s"], claimed_at=started,
    )


def call_of(item: Claimed) -> list[StoredEvent] | None:
    """Every readable event of the item's call as the claim returned it, in arrival order;
    None when that is older than ``CALL_FRESH_S`` (read it again: ``load_call``)."""
    if time.monotonic() - item.claimed_at > CALL_FRESH_S:
        return None
    row = item.row
    events = [item.event]
    ids: Sequence[int] | None = row["call_ids"]
    if ids:
        unique_id = item.event.unique_id
        for event_id, event_type, text, record_url, origin, received_at in zip(
                ids, row["call_types"], row["call_payloads"], row["call_record_urls"],
                row["call_origins"], row["call_received_at"], strict=True):
            try:
                payload = decode_json(text)
            except UnreadableJson as exc:
                log.info("call_event_unreadable", event_id=event_id, reason=str(exc))
                continue
            events.append(StoredEvent(event_id, event_type, unique_id, payload, record_url,
                                      origin, received_at))
        events.sort(key=_arrival)
    return events


async def load_call(db: asyncpg.Pool, item: Claimed) -> list[StoredEvent]:
    """Every readable stored event of the item's call, read now, in arrival order (an
    unreadable one is left out, as in ``call_of``). Database errors propagate."""
    events = []
    for row in await store.call_events(db, item.enterprise, item.event.unique_id):
        try:
            payload = decode_json(row["payload"])
        except UnreadableJson as exc:
            log.info("call_event_unreadable", event_id=row["id"], reason=str(exc))
            continue
        events.append(StoredEvent(row["id"], row["event_type"], row["unique_id"], payload,
                                  row["record_url"], row["origin"], row["received_at"]))
    return events


def _arrival(event: StoredEvent) -> int:
    return event.id
