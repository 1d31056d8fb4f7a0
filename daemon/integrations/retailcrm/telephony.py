"""What RetailCRM's telephony callbacks do: click-to-call and managers' status changes.

The routes (``http.py``) authenticate the ``clientId`` and apply the click-to-call rate;
these functions do the rest and say what to answer, in RetailCRM's shape
(``{"success": …, "errorMsg": …, "errors": {field: message}}``).

**Click-to-call** (``makeCallUrl``; fields ``clientId``, ``code``, ``phone``, ``userId``,
``externalPhone``). The extension that rings first is ``code`` when given — it must be one
of this enterprise's internal numbers, digits only, or the request is refused naming
``code`` — else the number mapped to ``userId`` in ``user_extensions``, else the request is
refused ("no extension for user N"). The PBX client (:mod:`daemon.pbx`) checks the extension
and the phone again and refuses anything that is not plainly a number before a request
leaves. Answers: 200 when the PBX accepted; 400 naming the bad field; 502 when the PBX
refused or could not be reached; 504 when it did not answer in time. ``externalPhone`` (the
line RetailCRM would call from) is recorded, not sent: the PBX service takes no such value.
Each request leaves one ``integration_logs`` row (``event_type`` ``make_call``) holding what
was asked and what the PBX answered — never the clientId nor the enterprise's PBX
credential; refused values are quoted escaped and cut short.

**Status** (``changeUserStatusUrl``; ``clientId``, ``userId``, ``code``, ``status`` ∈
free/busy/dinner/break): stored per enterprise (``crm_user_status``), which notifies every
instance; an unknown status or a malformed user id is refused naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from daemon import store
from daemon.auditlog import AuditRow
from daemon.integrations.base import CallbackDeps
from daemon.integrations.retailcrm.client import USER_STATUSES
from daemon.integrations.retailcrm.config import KEY, RetailCrmConfig
from daemon.logs import mask
from daemon.pbx import Line, PbxAnswer, PbxError, PbxRefused, PbxTimeout, shown

log = structlog.get_logger(__name__)

MAKE_CALL_EVENT: Final = "make_call"
LOGGED: Final[tuple[str, ...]] = ("code", "phone", "userId", "externalPhone")
_USER_ID: Final = re.compile(r"[0-9]{1,12}")
_CODE: Final = re.compile(r"[0-9]{1,20}")
_PLUS_DECODED: Final = re.compile(r" [0-9]{3,18}")


@dataclass(frozen=True, slots=True)
class Answer:
    """What to answer RetailCRM: HTTP status, body, and the outcome for the metrics."""

    status: int
    body: dict[str, Any]
    outcome: str
    headers: Mapping[str, str] = field(default_factory=dict)


OK: Final = Answer(200, {"success": True}, "ok")


def refusal(status: int, message: str, field_name: str | None = None, *,
            outcome: str = "invalid") -> Answer:
    """An answer in RetailCRM's error shape (``errors`` naming ``field_name``)."""
    body: dict[str, Any] = {"success": False, "errorMsg": message}
    if field_name:
        body["errors"] = {field_name: message}
    return Answer(status, body, outcome)


async def make_call(deps: CallbackDeps, enterprise: str, config: RetailCrmConfig,
                    params: Mapping[str, str]) -> Answer:
    """Place the call RetailCRM asked for (see the module docstring); logs one row."""
    # A secret pasted into a field must not reach the row or an answer, even cut short.
    fields = _masked(params, config.secrets())
    phone = fields.get("phone", "")
    if _PLUS_DECODED.fullmatch(phone):  # "+375…" sent unencoded in a query reads " 375…"
        fields["phone"] = "+" + phone[1:]
    request: dict[str, Any] = {k: shown(fields[k]) for k in LOGGED if k in fields}
    extension: str | None = None
    try:
        line = await deps.pbx.line(enterprise)
        if any(line.secret in v for v in fields.values()):
            fields = _masked(fields, (line.secret,))
            request = {k: shown(fields[k]) for k in LOGGED if k in fields}
        extension = _extension(line, config, fields)
        request["extension"] = extension
        answer = await deps.pbx.originate(line, extension, fields.get("phone", ""),
                                          region=config.region)
    except PbxError as exc:
        result = _failure(exc)
        _log(deps, enterprise, request, None, result.body["errorMsg"])
        log.info("make_call_refused" if isinstance(exc, PbxRefused) else "make_call_failed",
                 enterprise=enterprise, error=exc.error_id, extension=extension,
                 field=getattr(exc, "field", None))
        return result
    _log(deps, enterprise, request, answer, None)
    log.info("make_call_placed", enterprise=enterprise, extension=extension,
             duration_ms=round(answer.duration_s * 1000, 1))
    return OK


def _masked(params: Mapping[str, str], hidden: tuple[str, ...]) -> dict[str, str]:
    return {k: mask(v, hidden) for k, v in params.items() if k != "clientId"}


def _extension(line: Line, config: RetailCrmConfig, params: Mapping[str, str]) -> str:
    """The extension to ring first (see the module docstring); ``PbxRefused`` naming the
    field otherwise."""
    code = params.get("code", "")
    if code:
        if not _CODE.fullmatch(code) or code not in line.extensions:
            raise PbxRefused("code", f"{shown(code)!r} is not an internal number of this "
                             "enterprise")
        return code
    user_id = params.get("userId", "")
    if not _USER_ID.fullmatch(user_id):
        raise PbxRefused("userId", "expected a RetailCRM user id (digits) when code is empty")
    mapped = config.user_extensions.get(user_id)
    if mapped is None:
        raise PbxRefused("userId", f"no extension for user {user_id}")
    if mapped not in line.extensions:
        raise PbxRefused("userId", f"the extension {mapped} of user {user_id} is not an "
                         "internal number of this enterprise")
    return mapped


def _failure(exc: PbxError) -> Answer:
    if isinstance(exc, PbxRefused):
        if exc.field == "enterprise":  # the platform's data, not the caller's request
            return refusal(502, f"the call cannot be placed: {exc.reason}",
                           outcome="pbx_not_configured")
        return refusal(400, exc.reason, exc.field)
    outcome = "pbx_timeout" if isinstance(exc, PbxTimeout) else "pbx_failed"
    return refusal(exc.status, exc.message, outcome=outcome)


def _log(deps: CallbackDeps, enterprise: str, request: dict[str, Any],
         answer: PbxAnswer | None, error: str | None) -> None:
    response = None if answer is None else {
        "status": answer.status, "body": answer.body,
        "duration_ms": round(answer.duration_s * 1000, 1)}
    deps.audit.put(AuditRow(enterprise, deps.integration, MAKE_CALL_EVENT, request, response,
                            error is None, error))


async def set_status(deps: CallbackDeps, enterprise: str,
                     params: Mapping[str, str]) -> Answer:
    """Store a manager's status (see the module docstring)."""
    status = params.get("status", "")
    if status not in USER_STATUSES:
        return refusal(400, f"expected one of {', '.join(sorted(USER_STATUSES))}, got "
                       f"{shown(status)!r}", "status")
    user_id = params.get("userId", "")
    if not _USER_ID.fullmatch(user_id):
        return refusal(400, "expected a RetailCRM user id (digits)", "userId")
    code = params.get("code", "")
    if code and not _CODE.fullmatch(code):
        return refusal(400, f"{shown(code)!r} is not an extension (digits only)", "code")
    changed = await store.put_user_status(deps.pool, enterprise, KEY, user_id, status)
    if changed:
        deps.statuses_changed(enterprise)
    log.info("user_status_changed" if changed else "user_status_unchanged",
             enterprise=enterprise, user_id=user_id, status=status)
    return OK if changed else Answer(200, {"success": True}, "unchanged")
