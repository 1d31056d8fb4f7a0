"""RetailCRM's callbacks to us, mounted under ``/retailcrm/``.

``GET /retailcrm/logo.svg`` is the module's logo (public, no credential). The callbacks
are not signed: the ``clientId`` RetailCRM sends is the only credential. It is a
256-bit random secret per enterprise (never the enterprise number), looked up through its
keyed fingerprint, so a guess costs the same whether it is close or not. An unknown or
missing ``clientId`` is answered 403 with RetailCRM's error shape and changes nothing.

The handlers get what they need from the core through ``CALLBACK_DEPS`` on their
sub-application (``integrations/base.py``), never by importing the Runtime. Click-to-call
and status changes are done by :mod:`~daemon.integrations.retailcrm.telephony`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from daemon import logconfig, store, strictjson
from daemon.integrations.base import CALLBACK_DEPS
from daemon.integrations.retailcrm import telephony
from daemon.integrations.retailcrm.config import KEY, RetailCrmConfig

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

DEACTIVATED = "deactivated"
LOGO: Final = Path(__file__).parent / "static" / "logo.svg"
LOGO_MAX_AGE_S: Final = 86_400


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"success": False, "errorMsg": message}
    if field:
        body["errors"] = {field: message}
    return web.json_response(body, status=status)


def _form_error() -> web.HTTPBadRequest:
    """400 for a form that cannot be read, in RetailCRM's error shape plus the stable
    ``error`` id ``invalid_form``."""
    message = "body: not a readable form (invalid UTF-8 or malformed multipart)"
    body = {"success": False, "error": "invalid_form", "errorMsg": message,
            "errors": {"body": message}}
    return web.HTTPBadRequest(text=json.dumps(body), content_type="application/json")


async def _params(request: web.Request) -> dict[str, str]:
    params = dict(request.query)
    if request.method == "POST" and request.content_type in (
        "application/x-www-form-urlencoded", "multipart/form-data"
    ):
        try:
            form = await request.post()
        except (ValueError, AssertionError, LookupError, web.RequestPayloadError,
                HttpProcessingError):
            # aiohttp's form reader: UnicodeDecodeError (a ValueError) for bytes that are
            # not UTF-8, ValueError/AssertionError/LookupError for a broken multipart body.
            raise _form_error() from None
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    return params


def _enterprise(request: web.Request, params: dict[str, str]) -> str | None:
    client_id = params.get("clientId", "")
    if not client_id:
        return None
    deps = request.app[CALLBACK_DEPS]
    enterprise = deps.enterprise_by_secret(client_id)
    config = deps.config_of(enterprise) if enterprise is not None else None
    # Nothing this request logs shows the clientId it presented, or its enterprise's secrets.
    logconfig.hide((client_id, *(config.secrets() if config is not None else ())))
    return enterprise


@routes.post("/actions/activity")
async def activity(request: web.Request) -> web.Response:
    """The module was (de)activated or (un)frozen in RetailCRM: pause or resume delivery.

    Deliveries of a deactivated or frozen module wait (a ``deactivated`` hold), they do not
    fail; they go out once RetailCRM reports the module active and not frozen again.
    """
    params = await _params(request)
    enterprise = _enterprise(request, params)
    if enterprise is None:
        return _error(403, "unknown clientId", "clientId")
    try:
        state = strictjson.loads(params.get("activity", ""))
        active, freeze = state["active"], state.get("freeze", False)
        if not isinstance(active, bool) or not isinstance(freeze, bool):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        return _error(400, 'activity: expected {"active": bool, "freeze": bool}', "activity")
    pool = request.app[CALLBACK_DEPS].pool
    if active and not freeze:
        lifted = await store.lift_hold(pool, enterprise, KEY, DEACTIVATED)
        if lifted:
            log.info("module_reactivated", enterprise=enterprise)
    else:
        reason = "frozen in RetailCRM" if freeze else "deactivated in RetailCRM"
        await store.put_hold(pool, enterprise, KEY, DEACTIVATED, reason)
        log.warning("module_deactivated", enterprise=enterprise, active=active, freeze=freeze)
    return web.json_response({"success": True})


@routes.get("/logo.svg")
async def logo(request: web.Request) -> web.FileResponse:
    """The module's logo, the ``logo`` URL registered in RetailCRM (public, cacheable)."""
    return web.FileResponse(LOGO, headers={
        "Content-Type": "image/svg+xml", "Cache-Control": f"public, max-age={LOGO_MAX_AGE_S}",
        "X-Content-Type-Options": "nosniff",
    })


@routes.get("/make-call")
@routes.post("/make-call")
async def make_call(request: web.Request) -> web.Response:
    """Click-to-call (``makeCallUrl``): GET query or POST form ``clientId``, ``code``,
    ``phone``, ``userId``, ``externalPhone`` (see ``telephony.make_call``).

    403 for an unknown clientId or an enterprise this integration does not serve (nothing
    is sent to the PBX); 429 with ``Retry-After`` past ``CRM_BRIDGE_MAKE_CALL_RATE``
    requests per second of one clientId.
    """
    deps = request.app[CALLBACK_DEPS]
    started = time.perf_counter()
    params = await _params(request)
    answer = await _make_call(request, params)
    deps.metrics.telephony_requests.labels("make_call", answer.outcome).inc()
    deps.metrics.telephony_seconds.labels("make_call").observe(time.perf_counter() - started)
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


async def _make_call(request: web.Request, params: dict[str, str]) -> telephony.Answer:
    deps = request.app[CALLBACK_DEPS]
    enterprise = _enterprise(request, params)
    if enterprise is None:
        return telephony.refusal(403, "unknown clientId", "clientId", outcome="unknown_client")
    config = deps.serving_config(enterprise)
    if not isinstance(config, RetailCrmConfig):
        return telephony.refusal(403, "RetailCRM is not enabled for this clientId", "clientId",
                                 outcome="not_serving")
    wait_s = deps.make_call_throttle.admit(enterprise)
    if wait_s is not None:
        if deps.make_call_throttle.first_refusal(enterprise):
            log.warning("make_call_rate_limited", enterprise=enterprise)
        refused = telephony.refusal(429, "too many calls requested; try again shortly",
                                    outcome="rate_limited")
        return telephony.Answer(refused.status, refused.body, refused.outcome,
                                {"Retry-After": str(max(1, math.ceil(wait_s)))})
    return await telephony.make_call(deps, enterprise, config, params)


@routes.get("/user-status")
@routes.post("/user-status")
async def user_status(request: web.Request) -> web.Response:
    """A manager's status changed (``changeUserStatusUrl``): ``clientId``, ``userId``,
    ``code``, ``status`` ∈ free/busy/dinner/break (see ``telephony.set_status``)."""
    deps = request.app[CALLBACK_DEPS]
    started = time.perf_counter()
    params = await _params(request)
    enterprise = _enterprise(request, params)
    if enterprise is None:
        answer = telephony.refusal(403, "unknown clientId", "clientId", outcome="unknown_client")
    else:
        answer = await telephony.set_status(deps, enterprise, params)
    deps.metrics.telephony_requests.labels("user_status", answer.outcome).inc()
    deps.metrics.telephony_seconds.labels("user_status").observe(time.perf_counter() - started)
    return web.json_response(answer.body, status=answer.status)
