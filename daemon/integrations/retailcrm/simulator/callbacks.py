"""What the simulated account calls back: a manager's click on a phone number.

In RetailCRM a manager with an extension (the module's ``additionalCodes``) clicks a number,
and RetailCRM calls the registered module's ``makeCallUrl`` with ``clientId`` (the module's
secret), ``code``, ``phone``, ``userId`` and, when given, ``externalPhone`` — as query
parameters of a GET, which is what a working integration received (``method: POST`` sends
them as form fields instead). ``POST /_click`` does that, so a dry run or the demo can
place a call the way RetailCRM would without anyone handling the ``clientId``: the
simulator knows it from the module, and never shows it in an answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from .state import SimulatorState

CALLBACK_TIMEOUT_S: Final = 10.0
MAX_ANSWER_BYTES: Final = 65_536
_FIELDS: Final = frozenset({"userId", "phone", "code", "externalPhone", "method"})


class CallbackError(Exception):
    """The click cannot be made (no module, no ``makeCallUrl``, a user without a code) or
    the module's URL could not be reached; the message says which."""


@dataclass(frozen=True, slots=True)
class Click:
    """A manager's click: who clicked (``user_id``) which ``phone``."""

    user_id: int
    phone: str
    code: str | None = None
    external_phone: str | None = None
    method: str = "GET"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Click:
        """From a ``POST /_click`` body; ``ValueError`` names the field that is wrong."""
        unknown = set(data) - _FIELDS
        if unknown:
            raise ValueError(f"unknown fields: {sorted(unknown)}")
        user_id = data.get("userId")
        if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
            raise ValueError("userId must be a positive integer")
        phone = data.get("phone")
        if not isinstance(phone, str) or not phone.strip():
            raise ValueError("phone must be a non-empty string")
        for name in ("code", "externalPhone"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        method = data.get("method", "GET")
        if method not in ("GET", "POST"):
            raise ValueError("method must be GET or POST")
        return cls(user_id, phone, data.get("code"), data.get("externalPhone"), method)


async def make_call(http: aiohttp.ClientSession, state: SimulatorState,
                    users: Mapping[int, Mapping[str, Any]], click: Click) -> dict[str, Any]:
    """Call the registered module's ``makeCallUrl`` as RetailCRM does; return its answer
    (``status`` and ``answer``: JSON when it is, else text), never the ``clientId``."""
    module = state.module
    if module is None or module.get("active") is False:
        raise CallbackError("no active module is registered in this account")
    telephony = (module.get("integrations") or {}).get("telephony") or {}
    url = telephony.get("makeCallUrl")
    if not isinstance(url, str) or not url:
        raise CallbackError("the module has no makeCallUrl: RetailCRM shows no click-to-call")
    if click.user_id not in users:
        raise CallbackError(f"there is no user {click.user_id} in this account")
    code = click.code if click.code is not None else state.code_of(click.user_id)
    if code is None:
        raise CallbackError(f"user {click.user_id} has no code in the module's "
                            "additionalCodes: RetailCRM shows them no click-to-call")
    fields = {"clientId": str(module.get("clientId", "")), "code": code,
              "phone": click.phone, "userId": str(click.user_id)}
    if click.external_phone is not None:
        fields["externalPhone"] = click.external_phone
    try:
        if click.method == "POST":
            response = http.post(url, data=fields)
        else:
            response = http.get(url, params=fields)
        async with response as answer:
            raw = await answer.content.read(MAX_ANSWER_BYTES)
            status = answer.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CallbackError(f"makeCallUrl could not be reached: {type(exc).__name__}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return {"status": status, "answer": body}


def session() -> aiohttp.ClientSession:
    """The account's one HTTP session for its callbacks, with a timeout on every call."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S))
