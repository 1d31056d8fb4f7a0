"""Routes the PBX dialplan and the platform's call services call on a live call (service token).

``GET|POST /api/smart-redirect`` — the responsible manager's extension for an incoming
call; ``GET /api/customer-name`` — the caller's name for the platform's call card. Both
answer within ``CRM_BRIDGE_SMART_REDIRECT_DEADLINE_S`` whatever the CRM does (the rules are
in :mod:`daemon.redirect`); contracts in docs/api.md.

Parameters come from the query string, or from a POST body (form fields or a JSON object
of scalars): the enterprise by ``enterprise`` (its number) or ``Token`` (what the Asterisk
hosts send), the caller's ``phone``, and for smart redirect optionally ``unique_id`` (for the
log), ``from_ext`` and ``redirect=1`` (ask the PBX to transfer the call there).
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web

from daemon.cache import AmbiguousToken, Entry
from daemon.redirect import Answer, RedirectRefused
from daemon.runtime import RUNTIME
from web import bodies
from web.auth import require_service_token
from web.middlewares import HttpError, field_error

routes = web.RouteTableDef()

MAX_PHONE_CHARS: Final = 64
MAX_UNIQUE_ID_CHARS: Final = 100
_FLAGS: Final = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False,
                 "": False}


async def _params(request: web.Request) -> dict[str, str]:
    params = dict(request.query)
    if request.method != "POST" or not request.can_read_body:
        return params
    if request.content_type == "application/json":
        body = await bodies.read_json(request)
        if not isinstance(body, dict):
            raise field_error("body", "expected a JSON object")
        for key, value in body.items():
            if isinstance(value, bool):
                value = "1" if value else "0"
            if isinstance(value, str | int) and not isinstance(value, bool):
                params[str(key)] = str(value)
            elif value is not None:
                raise field_error(str(key)[:40], "expected a string or a number")
    elif request.content_type == "application/x-www-form-urlencoded":
        form = await request.post()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _text(params: dict[str, str], name: str, limit: int, *, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise field_error(name, "is required")
        return None
    if len(value) > limit or not value.isprintable():
        raise field_error(name, f"expected at most {limit} printable characters")
    return value


def _entry(request: web.Request, params: dict[str, str]) -> Entry:
    token = _text(params, "Token", 100) or _text(params, "token", 100)
    number = _text(params, "enterprise", 100)
    if token is None and number is None:
        raise field_error("enterprise", "is required (or Token)")
    try:
        entry = request.app[RUNTIME].redirect.resolve(number, token)
    except AmbiguousToken as exc:
        raise HttpError(409, "ambiguous_token", f"Token: {exc}",
                        {"field": "Token", "enterprises": list(exc.enterprises)}) from None
    if entry is None:
        raise HttpError(404, "unknown_enterprise", "no such enterprise",
                        {"field": "Token" if token is not None else "enterprise"})
    return entry


def _observed(request: web.Request, route: str, answer: Answer, started: float) -> None:
    metrics = request.app[RUNTIME].metrics
    metrics.telephony_requests.labels(route, answer.reason or "match").inc()
    metrics.telephony_seconds.labels(route).observe(time.perf_counter() - started)


@routes.get("/api/smart-redirect")
@routes.post("/api/smart-redirect")
async def smart_redirect(request: web.Request) -> web.Response:
    """``{"extension", "manager_id", "manager_name", "customer_name", "source", "reason"}``
    (``extension`` null with a ``reason`` when there is no match), within the deadline."""
    started = time.perf_counter()
    require_service_token(request)
    params = await _params(request)
    entry = _entry(request, params)
    phone = _text(params, "phone", MAX_PHONE_CHARS, required=True)
    assert phone is not None
    unique_id = _text(params, "unique_id", MAX_UNIQUE_ID_CHARS)
    from_ext = _text(params, "from_ext", 20)
    redirect = params.get("redirect", "").strip().lower()
    if redirect not in _FLAGS:
        raise field_error("redirect", "expected 1 or 0")
    if _FLAGS[redirect] and from_ext is None:
        raise field_error("from_ext", "is required with redirect=1")
    try:
        answer = await request.app[RUNTIME].redirect.answer(
            entry, phone, from_ext=from_ext, redirect=_FLAGS[redirect], unique_id=unique_id)
    except RedirectRefused as exc:
        raise field_error(exc.field, exc.message) from None
    _observed(request, "smart_redirect", answer, started)
    return web.json_response(answer.body())


@routes.get("/api/customer-name")
async def customer_name(request: web.Request) -> web.Response:
    """``{"customer_name", "source", "reason"}`` for the caller ``phone`` (null name with a
    ``reason`` when the CRM knows none), within the deadline."""
    started = time.perf_counter()
    require_service_token(request)
    params = await _params(request)
    entry = _entry(request, params)
    phone = _text(params, "phone", MAX_PHONE_CHARS, required=True)
    assert phone is not None
    answer = await request.app[RUNTIME].redirect.customer(entry, phone)
    _observed(request, "customer_name", answer, started)
    return web.json_response({"customer_name": answer.customer_name, "source": answer.source,
                              "reason": answer.reason})
