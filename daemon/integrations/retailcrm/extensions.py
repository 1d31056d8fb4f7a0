"""Managers ↔ internal numbers: the backend of the admin pages' extension picker.

Owns the rules of ``user_extensions`` (``{"<RetailCRM user id>": "<internal number>"}``):

* one number ↔ one manager: a manager has at most one number, and a number belongs to at
  most one manager. Assigning a number another manager holds **moves** it (that manager is
  left without one); assigning one number to two managers in one request is refused;
* only this enterprise's internal numbers (``user_internal_phones``) can be assigned; a
  number that is not one of them is refused with an error naming the field
  (``user_extensions.<user id>``), and nothing changes;
* an assignment set is partial: the managers it names get the number given (``None`` or
  ``""`` removes theirs); every other manager keeps what they had;
* the map is stored first (one locked read-modify-write of ``user_extensions``, written
  with ``config.write_keys``), then sent to RetailCRM as the module's ``additionalCodes``
  (the module is re-edited). When RetailCRM cannot take it, the local save stands,
  ``sync_pending`` is stored and the adapter's reconciliation task retries it.

Reading: :func:`managers` lists every active RetailCRM user (not only the free ones) with
their current number — the local map merged with the module's ``additionalCodes``, the
local map winning — their status (the latest one RetailCRM reported to us, else the users
list's), and every disagreement between the two maps; :func:`internal_numbers` lists
the enterprise's numbers with their owners and whether a manager has taken them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from daemon import store
from daemon.errors import ConfigError, Permanent
from daemon.integrations.base import (
    CrmUser,
    ExtensionMismatch,
    ExtensionMove,
    ExtensionsSaved,
    InternalNumber,
    ManagersView,
    RegistrationResult,
)
from daemon.integrations.retailcrm import config as cfg
from daemon.integrations.retailcrm.client import RetailCrmClient

FIELD = "user_extensions"


# The views are the core's (the admin pages and the API show them for any CRM).
Mismatch = ExtensionMismatch
Move = ExtensionMove
SaveResult = ExtensionsSaved


def remote_codes(module: Mapping[str, Any] | None) -> dict[str, str]:
    """``additionalCodes`` of a module read from RetailCRM, as user id → number."""
    if module is None:
        return {}
    telephony = (module.get("integrations") or {}).get("telephony") or {}
    codes: dict[str, str] = {}
    for entry in telephony.get("additionalCodes") or []:
        if isinstance(entry, Mapping) and entry.get("userId") is not None and entry.get("code"):
            codes[str(entry["userId"])] = str(entry["code"])
    return codes


def merge(local: Mapping[str, str], remote: Mapping[str, str]
          ) -> tuple[dict[str, str], list[Mismatch]]:
    """The numbers to show (local wins) and every user id on which the two differ."""
    merged = {**remote, **local}
    mismatches = [Mismatch(uid, local.get(uid), remote.get(uid))
                  for uid in sorted(set(local) | set(remote), key=_user_order)
                  if local.get(uid) != remote.get(uid)]
    return merged, mismatches


async def managers(client: RetailCrmClient, config: cfg.RetailCrmConfig, module_code: str,
                   statuses: Mapping[str, str] | None = None) -> ManagersView:
    """Every active RetailCRM user with their number (see the module docstring) and status:
    the one in ``statuses`` (the latest RetailCRM reported through ``changeUserStatusUrl``)
    where there is one, else the users list's."""
    users = await client.users(active_only=True)
    try:
        module: dict[str, Any] | None = await client.get_module(module_code)
    except Permanent as exc:
        if exc.status != 404:
            raise
        module = None
    merged, mismatches = merge(config.user_extensions, remote_codes(module))
    if module is None:
        mismatches = []  # nothing registered yet: every local number is simply unsent
    listed = tuple(_user(u, merged, statuses or {}) for u in users
                   if isinstance(u, Mapping) and "id" in u)
    return ManagersView(listed, tuple(mismatches), module is not None)


def _user(raw: Mapping[str, Any], numbers: Mapping[str, str],
          statuses: Mapping[str, str]) -> CrmUser:
    uid = str(raw["id"])
    name = " ".join(str(raw.get(k) or "").strip() for k in ("firstName", "lastName")).strip()
    status = statuses.get(uid, raw.get("status"))
    return CrmUser(id=uid, name=name or f"#{uid}", email=str(raw.get("email") or ""),
                   active=bool(raw.get("active", True)),
                   status=status if isinstance(status, str) else None,
                   extension=numbers.get(uid))


async def internal_numbers(db: store.Executor, enterprise: str,
                           user_extensions: Mapping[str, str]) -> list[InternalNumber]:
    """The enterprise's internal numbers, shortest first, with owners and managers."""
    by_number = {number: uid for uid, number in user_extensions.items()}
    rows = await store.internal_phones(db, enterprise)
    numbers = []
    for row in rows:
        names = [row["first_name"], row["last_name"]]
        owner = " ".join(n.strip() for n in names if n and n.strip()) or None
        number = row["phone_number"]
        numbers.append(InternalNumber(number, owner, by_number.get(number)))
    return sorted(numbers, key=lambda n: (len(n.number), n.number))


def apply(current: Mapping[str, str], assignments: Mapping[str, str | None],
          allowed: frozenset[str]) -> tuple[dict[str, str], list[Move]]:
    """The new map after ``assignments`` (pure); ``ConfigError`` naming the first bad entry.

    See the module docstring for the rules.
    """
    wanted: dict[str, str] = {}
    for raw_uid, raw_number in assignments.items():
        uid = str(raw_uid).strip()
        where = f"{FIELD}.{uid[:20]}"
        if not uid.isdigit() or len(uid) > 12:
            raise ConfigError(where, "expected a RetailCRM user id (digits)")
        number = "" if raw_number is None else str(raw_number).strip()
        if number and number not in allowed:
            raise ConfigError(where, f"{number[:20]!r} is not an internal number of this "
                              "enterprise")
        if number and number in wanted.values():
            raise ConfigError(where, f"{number!r} is assigned to two managers at once")
        wanted[uid] = number
    new = {uid: number for uid, number in current.items() if uid not in wanted}
    moves: list[Move] = []
    for uid, number in wanted.items():
        if not number:
            continue
        holder = next((u for u, n in new.items() if n == number), None)
        if holder is not None:
            del new[holder]
            moves.append(Move(number, holder, uid))
        new[uid] = number
    return dict(sorted(new.items(), key=lambda kv: _user_order(kv[0]))), moves


async def save(pool: asyncpg.Pool, enterprise: str,
               assignments: Mapping[str, str | None]) -> tuple[dict[str, str], list[Move]]:
    """Apply ``assignments`` to the stored map and store it (the row locked meanwhile, so
    concurrent saves serialise); ``ConfigError`` changes nothing."""
    async with pool.acquire() as conn, conn.transaction():
        exists, raw = await store.lock_integration_config(conn, enterprise, cfg.KEY)
        if not exists:
            raise ConfigError("enterprise", f"there is no enterprise {enterprise[:20]!r}")
        current = stored_map(raw)
        allowed = frozenset(r["phone_number"] for r in await store.internal_phones(conn,
                                                                                   enterprise))
        new, moves = apply(current, assignments, allowed)
        await cfg.write_keys(conn, enterprise, {FIELD: new})
    return new, moves


async def save_and_sync(
    pool: asyncpg.Pool, enterprise: str, assignments: Mapping[str, str | None],
    sync: Callable[[str], Awaitable[RegistrationResult]],
) -> SaveResult:
    """:func:`save`, then ``sync`` (the module re-edit, which keeps ``sync_pending``)."""
    new, moves = await save(pool, enterprise, assignments)
    result = await sync(enterprise)
    moved = "".join(f" Number {m.number} moved from manager {m.from_user} to manager "
                    f"{m.to_user}." for m in moves)
    if result.ok:
        return SaveResult(new, tuple(moves), synced=True, sync_pending=False,
                          message=f"Saved {len(new)} manager number(s); RetailCRM is "
                          f"up to date.{moved}", warnings=result.warnings)
    if result.error_id == "not_connected":
        return SaveResult(new, tuple(moves), synced=False, sync_pending=False,
                          message=f"Saved {len(new)} manager number(s). {result.message}"
                          f"{moved}")
    return SaveResult(new, tuple(moves), synced=False, sync_pending=True,
                      message=f"Saved {len(new)} manager number(s), but RetailCRM was not "
                      f"updated: {result.message} The sync is pending and is retried within "
                      f"a few minutes.{moved}")


def stored_map(raw: Mapping[str, Any] | None) -> dict[str, str]:
    """``user_extensions`` of a stored (raw) configuration; {} when absent or malformed."""
    value = (raw or {}).get(FIELD) or {}
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str | int)}


def _user_order(uid: str) -> tuple[int, str]:
    return (int(uid) if uid.isdigit() else 1 << 62, uid)
