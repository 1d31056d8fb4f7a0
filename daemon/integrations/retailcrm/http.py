"""RetailCRM's callbacks to us, mounted under ``/retailcrm/``.

``GET /retailcrm/logo.svg`` is the module's logo (public, no credential). The callbacks
are not signed: the ``clientId`` RetailCRM sends is the only credential. It is a
256-bit random secret per enterprise (never the enterprise number), looked up through its
keyed fingerprint, so a guess costs the same whether it is close or not. An unknown or
missing ``clientId`` is answered 403 with RetailCRM's error shape and changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from daemon import logconfig, store, strictjson
from daemon.integrations.retailcrm.config import KEY
from daemon.runtime import RUNTIME

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
    cache = request.app[RUNTIME].cache
    enterprise = cache.matrix.by_secret(client_id)
    entry = cache.get(enterprise) if enterprise is not None else None
    # Nothing this request logs shows the clientId it presented, or its enterprise's secrets.
    logconfig.hide((client_id, *(entry.config.secrets() if entry and entry.config else ())))
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
    pool = request.app[RUNTIME].pool
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
