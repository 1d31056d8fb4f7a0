"""How strictly the simulated account reads what it is sent, and how it says no.

RetailCRM answers a request it refuses with ``{"success": false, "errorMsg", "errors"}``,
``errors`` naming each field (``event[phone]``, ``calls[0][date]``,
``integrations[telephony][additionalCodes]``). This module holds that shape
(:class:`ApiError`) and the checks behind it: the form fields that hold JSON, the query
parameters, a call event, an uploaded call, an integration module. Each check returns every
problem it finds (an empty dict: valid), so a test sees all of them at once. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from aiohttp import web

EVENT_TYPES: Final = frozenset({"in", "out", "hangup"})
HANGUP_STATUSES: Final = frozenset({"answered", "busy", "cancel", "failed", "no answered"})
UPLOAD_TYPES: Final = frozenset({"in", "out"})
UPLOAD_RESULTS: Final = frozenset(
    {"answered", "busy", "failed", "no answer", "not allowed", "unknown"}
)
EVENT_KEYS: Final = frozenset(
    {"phone", "type", "codes", "userIds", "site", "externalPhone", "callExternalId",
     "hangupStatus"}
)
UPLOAD_KEYS: Final = frozenset(
    {"date", "type", "phone", "code", "userId", "result", "duration", "durationWaiting",
     "externalId", "recordUrl", "externalPhone", "site", "clientId"}
)
MODULE_KEYS: Final = frozenset(
    {"code", "integrationCode", "active", "freeze", "native", "name", "logo", "baseUrl",
     "clientId", "accountUrl", "actions", "availableCountries", "integrations"}
)
MODULE_ACTIONS: Final = frozenset({"activity"})
INTEGRATION_KINDS: Final = frozenset({"telephony", "delivery", "store", "mgTransport", "mgBot"})
TELEPHONY_KEYS: Final = frozenset(
    {"makeCallUrl", "changeUserStatusUrl", "allowEdit", "inputEventSupported",
     "outputEventSupported", "hangupEventSupported", "additionalCodes", "externalPhones"}
)
TELEPHONY_FLAGS: Final = (
    "allowEdit", "inputEventSupported", "outputEventSupported", "hangupEventSupported"
)
JSON_FIELDS: Final = frozenset({"event", "calls", "integrationModule"})
EXTRA: Final = "This form should not contain extra fields."
BLANK: Final = "This value should not be blank."

# The decoded form of a POST request, put on the request by the API middleware.
FORM: Final = web.RequestKey("retailcrm_sim_form", dict)

_DATE_RE: Final = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_BOOLS: Final = {"1": True, "true": True, "0": False, "false": False}


class ApiError(Exception):
    """An answer in RetailCRM's error shape: ``{success: false, errorMsg, errors?}``."""

    def __init__(self, status: int, error_msg: str, errors: Any = None) -> None:
        super().__init__(error_msg)
        self.status = status
        self.error_msg = error_msg
        self.errors = errors

    def response(self) -> web.Response:
        """The JSON answer RetailCRM would give."""
        body: dict[str, Any] = {"success": False, "errorMsg": self.error_msg}
        if self.errors:
            body["errors"] = self.errors
        return web.json_response(body, status=self.status)


def listed(values: Iterable[Any]) -> str:
    """``"a", "b"``: allowed values as an error message lists them."""
    return ", ".join(f'"{v}"' for v in sorted(values))


def try_json(value: str) -> Any:
    """``value`` decoded when it is JSON, else as it is (the request log shows both)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def json_field(request: web.Request, name: str, kind: type[Any]) -> Any:
    """The JSON-string form field ``name`` decoded, or RetailCRM's 400 naming the field."""
    raw = request[FORM].get(name)
    if raw is None or raw == "":
        raise ApiError(400, f"Parameter '{name}' is missing", {name: BLANK})
    try:
        value = json.loads(raw)
    except ValueError:
        raise ApiError(400, f"Parameter '{name}' must be a JSON string",
                       {name: "This value is not valid JSON."}) from None
    if not isinstance(value, kind):
        shape = "object" if kind is dict else "array"
        raise ApiError(400, f"Parameter '{name}' must be a JSON {shape}",
                       {name: f"This value should be of type {shape}."})
    return value


def query_bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    """A ``0``/``1`` (``true``/``false``) query parameter, or a 400 naming it."""
    raw = query.get(name)
    if raw is None:
        return default
    value = _BOOLS.get(raw.lower())
    if value is None:
        raise ApiError(400, "Errors in the input parameters", {name: "Use 0 or 1."})
    return value


def query_int(query: Mapping[str, str], name: str, default: int) -> int:
    """A non-negative integer query parameter, or a 400 naming it."""
    raw = query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ApiError(400, "Errors in the input parameters",
                       {name: "This value should be a positive integer."})
    return int(raw)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://")) and len(value) > 8


def event_errors(event: Mapping[str, Any]) -> dict[str, str]:
    """RetailCRM-style field errors for a call event; empty when it is valid."""
    errors = {f"event[{k}]": EXTRA for k in event if k not in EVENT_KEYS}
    if event.get("type") not in EVENT_TYPES:
        errors["event[type]"] = f"The value must be one of: {listed(EVENT_TYPES)}."
    if not _is_text(event.get("phone")):
        errors["event[phone]"] = BLANK
    codes = event.get("codes", [])
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        errors["event[codes]"] = "This value should be a list of strings."
    user_ids = event.get("userIds", [])
    if not isinstance(user_ids, list) or not all(_is_int(u) for u in user_ids):
        errors["event[userIds]"] = "This value should be a list of integers."
    hangup_status = event.get("hangupStatus")
    if event.get("type") == "hangup" and hangup_status is None:
        errors["event[hangupStatus]"] = "A hangup event needs a hangupStatus."
    elif hangup_status is not None and hangup_status not in HANGUP_STATUSES:
        errors["event[hangupStatus]"] = f"The value must be one of: {listed(HANGUP_STATUSES)}."
    for key in ("site", "externalPhone", "callExternalId"):
        if key in event and not isinstance(event[key], str):
            errors[f"event[{key}]"] = "This value should be of type string."
    return errors


def upload_errors(index: int, call: Any) -> dict[str, str]:
    """RetailCRM-style field errors for one uploaded call; empty when it is valid."""
    at = f"calls[{index}]"
    if not isinstance(call, dict):
        return {at: "This value should be of type object."}
    errors = {f"{at}[{k}]": EXTRA for k in call if k not in UPLOAD_KEYS}
    date = call.get("date")
    if not isinstance(date, str) or not _DATE_RE.fullmatch(date) or not _valid_date(date):
        errors[f"{at}[date]"] = "This value is not a valid datetime (Y-m-d H:i:s)."
    if call.get("type") not in UPLOAD_TYPES:
        errors[f"{at}[type]"] = f"The value must be one of: {listed(UPLOAD_TYPES)}."
    if not _is_text(call.get("phone")):
        errors[f"{at}[phone]"] = BLANK
    if call.get("result") not in UPLOAD_RESULTS:
        errors[f"{at}[result]"] = f"The value must be one of: {listed(UPLOAD_RESULTS)}."
    external_id = call.get("externalId")
    if not (_is_text(external_id) or _is_int(external_id)):
        errors[f"{at}[externalId]"] = BLANK
    for key in ("duration", "durationWaiting"):
        if key in call and not (_is_int(call[key]) and call[key] >= 0):
            errors[f"{at}[{key}]"] = "This value should be a non-negative integer."
    if "userId" in call and not _is_int(call["userId"]):
        errors[f"{at}[userId]"] = "This value should be of type integer."
    if "recordUrl" in call and not _is_url(call["recordUrl"]):
        errors[f"{at}[recordUrl]"] = "This value is not a valid URL."
    for key in ("code", "externalPhone", "site", "clientId"):
        if key in call and not isinstance(call[key], str):
            errors[f"{at}[{key}]"] = "This value should be of type string."
    return errors


def _valid_date(value: str) -> bool:
    try:
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")  # naive: the account's own zone
    except ValueError:
        return False
    return True


def module_errors(code: str, module: Mapping[str, Any]) -> dict[str, str]:
    """RetailCRM-style field errors for an ``integrationModule``; empty when it is valid."""
    errors: dict[str, str] = {}
    for key in module:
        if key in TELEPHONY_KEYS:
            errors[key] = "Telephony settings belong in integrations.telephony."
        elif key not in MODULE_KEYS:
            errors[key] = EXTRA
    for key in ("code", "integrationCode", "name", "baseUrl", "clientId"):
        if not _is_text(module.get(key)):
            errors[key] = BLANK
    if _is_text(module.get("code")) and module["code"] != code:
        errors["code"] = f"The module code must be {code!r}, as in the URL."
    for key in ("baseUrl", "accountUrl", "logo"):
        if key in module and key not in errors and not _is_url(module[key]):
            errors[key] = "This value is not a valid URL."
    for key in ("active", "freeze", "native"):
        if key in module and not isinstance(module[key], bool):
            errors[key] = "This value should be of type bool."
    actions = module.get("actions", {})
    if not isinstance(actions, dict):
        errors["actions"] = "This value should be of type object."
    else:
        for key, value in actions.items():
            if key not in MODULE_ACTIONS:
                errors[f"actions[{key}]"] = f"Unknown action; known: {sorted(MODULE_ACTIONS)}."
            elif not _is_text(value):
                errors[f"actions[{key}]"] = BLANK
    countries = module.get("availableCountries", [])
    if not isinstance(countries, list) or not all(
        isinstance(c, str) and len(c) == 2 for c in countries
    ):
        errors["availableCountries"] = "This value should be a list of ISO country codes."
    integrations = module.get("integrations", {})
    if not isinstance(integrations, dict):
        errors["integrations"] = "This value should be of type object."
        return errors
    for key in integrations:
        if key not in INTEGRATION_KINDS:
            errors[f"integrations[{key}]"] = EXTRA
    telephony = integrations.get("telephony")
    if telephony is not None:
        errors.update(_telephony_errors(telephony))
    return errors


def _telephony_errors(telephony: Any) -> dict[str, str]:
    at = "integrations[telephony]"
    if not isinstance(telephony, dict):
        return {at: "This value should be of type object."}
    errors = {f"{at}[{k}]": EXTRA for k in telephony if k not in TELEPHONY_KEYS}
    for key in ("makeCallUrl", "changeUserStatusUrl"):
        if key in telephony and not _is_text(telephony[key]):
            errors[f"{at}[{key}]"] = "This value should be a URL."
    for key in TELEPHONY_FLAGS:
        if key in telephony and not isinstance(telephony[key], bool):
            errors[f"{at}[{key}]"] = "This value should be of type bool."
    codes = telephony.get("additionalCodes", [])
    # userId as an int or a numeric string: the official Go client sends a string.
    if not isinstance(codes, list) or not all(
        isinstance(c, dict) and _is_text(c.get("code")) and (
            _is_int(c.get("userId")) or (isinstance(c.get("userId"), str)
                                         and c["userId"].isdigit())
        ) for c in codes
    ):
        errors[f"{at}[additionalCodes]"] = "Each entry needs a userId and a code."
    phones = telephony.get("externalPhones", [])
    if not isinstance(phones, list) or not all(
        isinstance(p, dict) and _is_text(p.get("siteCode")) and _is_text(p.get("externalPhone"))
        for p in phones
    ):
        errors[f"{at}[externalPhones]"] = "Each entry needs a siteCode and an externalPhone."
    return errors
