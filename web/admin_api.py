"""The administration API: one set of handlers, served twice.

``/api/...`` for the platform's services (service token, any enterprise) and
``/<integration>-admin/api/...`` for the admin pages' own calls (a session of that
enterprise, and its CSRF token on every change). The contract is ``docs/openapi.yaml``.

Each handler parses, calls one function of the core or the adapter, and renders JSON: the
validation lives there, shared with the pages and the CLI. Errors keep the API's shape
``{"error", "message", "details"}``: a bad value is 400 naming the field (nothing changed),
an unknown enterprise 404, a CRM that failed 502, a state that forbids the action 409.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, Final

from aiohttp import web

from daemon import diagnostics, journal
from daemon.errors import ConfigError, DeliveryError
from daemon.integrations.base import RegistrationResult
from daemon.runtime import RUNTIME
from web import bodies
from web.auth import require_admin, require_service_token
from web.middlewares import HttpError, field_error

Action = Callable[[web.Request, str], Awaitable[web.StreamResponse]]

# RegistrationResult.error_id → status: the CRM failed (502) or the local state forbids it.
UPSTREAM_ERRORS: Final = frozenset({"auth_failed", "payment_required", "invalid_module",
                                    "refused", "unavailable"})


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    """The request's JSON body (``optional``: None when empty), decoded by the one JSON
    parser of every route (``web.bodies``); 400 ``body`` otherwise."""
    raw = await bodies.read_body(request)
    if not raw.strip():
        if optional:
            return None
        raise field_error("body", "a JSON object is required")
    return bodies.decode_json(raw)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise field_error("body", "expected a JSON object")
    return body


def _config_error(exc: ConfigError) -> HttpError:
    return field_error(exc.field, exc.message)


def _crm_error(exc: DeliveryError) -> HttpError:
    return HttpError(502, "crm_failed", f"the CRM did not answer as expected: {exc.message}",
                     {"error_id": exc.error_id})


def registration(result: RegistrationResult) -> web.Response:
    """A registration-like result: 200 when ok; else 502 (the CRM), 404 or 409 (our
    state), in the error shape with the result's fields alongside."""
    body: dict[str, Any] = {
        "ok": result.ok, "message": result.message, "warnings": list(result.warnings),
        "unknown_users": list(result.unknown_users),
    }
    if result.ok:
        return web.json_response(body)
    error_id = result.error_id or "failed"
    status = 502 if error_id in UPSTREAM_ERRORS else 404 if error_id == "unknown_enterprise" \
        else 409
    body.update(error=error_id, details=dict(result.details))
    return web.json_response(body, status=status)


# ---------------------------------------------------------------------- actions


async def get_config(request: web.Request, enterprise: str) -> web.Response:
    """The enterprise's settings, secrets masked."""
    runtime = request.app[RUNTIME]
    settings = await runtime.adapter.read_settings(enterprise)
    return web.json_response(_config(runtime.adapter.name, enterprise, settings))


def _config(integration: str, enterprise: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"enterprise": enterprise, "integration": integration, "settings": dict(settings)}


async def put_config(request: web.Request, enterprise: str) -> web.Response:
    """A partial update of the settings (only the keys sent change)."""
    runtime = request.app[RUNTIME]
    changes = _object(await read_json(request))
    try:
        settings = await runtime.adapter.write_settings(enterprise, changes)
    except ConfigError as exc:
        raise _config_error(exc) from None
    return web.json_response(_config(runtime.adapter.name, enterprise, settings))


async def delete_config(request: web.Request, enterprise: str) -> web.Response:
    """Delete the integration: unregister it in the CRM, revoke links, sessions, clientId."""
    return registration(await request.app[RUNTIME].adapter.unregister(enterprise))


async def post_register(request: web.Request, enterprise: str) -> web.Response:
    """Register (or update) the integration in the CRM and switch it on."""
    return registration(await request.app[RUNTIME].adapter.register(enterprise))


async def post_test_connection(request: web.Request, enterprise: str) -> web.Response:
    """Test the stored credentials, or those sent (unsaved): always 200 with the verdict."""
    body = await read_json(request, optional=True)
    changes = _object(body) if body is not None else None
    try:
        check = await request.app[RUNTIME].adapter.test_connection(enterprise, changes)
    except ConfigError as exc:
        raise _config_error(exc) from None
    return web.json_response({"ok": check.ok, "message": check.message,
                              "missing_scopes": list(check.missing_scopes)})


async def get_managers(request: web.Request, enterprise: str) -> web.Response:
    """The CRM's active managers with status and number, and the mismatches."""
    try:
        view = await request.app[RUNTIME].adapter.managers(enterprise)
    except ConfigError as exc:
        raise HttpError(409, "not_connected", exc.message, {"field": exc.field}) from None
    except DeliveryError as exc:
        raise _crm_error(exc) from None
    return web.json_response({
        "managers": [asdict(m) for m in view.managers],
        "mismatches": [asdict(m) for m in view.mismatches],
        "module_registered": view.module_registered,
    })


async def get_internal_phones(request: web.Request, enterprise: str) -> web.Response:
    """The enterprise's internal numbers, owners, and the managers on them."""
    numbers = await request.app[RUNTIME].adapter.internal_numbers_view(enterprise)
    return web.json_response({"numbers": [
        {"number": n.number, "owner": n.owner, "manager_id": n.manager_id} for n in numbers]})


async def get_user_extensions(request: web.Request, enterprise: str) -> web.Response:
    """The stored map manager → internal number."""
    mapped = await request.app[RUNTIME].adapter.extensions(enterprise)
    return web.json_response({"user_extensions": dict(mapped)})


async def post_user_extensions(request: web.Request, enterprise: str) -> web.Response:
    """Assign numbers (``{"user_extensions": {"12": "151", "13": null}}``)."""
    body = _object(await read_json(request))
    assignments = body.get("user_extensions")
    if not isinstance(assignments, Mapping) or not assignments:
        raise field_error("user_extensions", "expected an object: manager id → number or null")
    if any(v is not None and not isinstance(v, str) for v in assignments.values()):
        raise field_error("user_extensions", "each number must be a string or null")
    try:
        saved = await request.app[RUNTIME].adapter.save_extensions(enterprise, assignments)
    except ConfigError as exc:
        raise _config_error(exc) from None
    return web.json_response({
        "user_extensions": dict(saved.user_extensions),
        "moves": [asdict(m) for m in saved.moves], "synced": saved.synced,
        "sync_pending": saved.sync_pending, "message": saved.message,
        "warnings": list(saved.warnings),
    })


async def post_sync_extensions(request: web.Request, enterprise: str) -> web.Response:
    """Send the managers' numbers to the CRM again."""
    return registration(await request.app[RUNTIME].adapter.sync_extensions(enterprise))


async def get_journal(request: web.Request, enterprise: str) -> web.Response:
    """One page of the enterprise's deliveries (filters and keyset paging in the query)."""
    runtime = request.app[RUNTIME]
    try:
        where = journal.parse_filter(request.query)
    except ConfigError as exc:
        raise _config_error(exc) from None
    return web.json_response(await journal.page(runtime.pool, enterprise, runtime.adapter.name,
                                                where))


async def get_attempts(request: web.Request, enterprise: str) -> web.Response:
    """One delivery's attempts: what was sent and answered (masked)."""
    runtime = request.app[RUNTIME]
    raw = request.match_info["event_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise field_error("event_id", "expected a delivery id")
    entry = runtime.cache.get(enterprise)
    hidden = entry.config.secrets() if entry is not None and entry.config is not None else ()
    items = await journal.attempts(runtime.pool, enterprise, runtime.adapter.name, int(raw),
                                   hidden)
    return web.json_response({"event_id": int(raw), "attempts": items})


async def post_replay(request: web.Request, enterprise: str) -> web.Response:
    """Queue failed (or skipped) deliveries again: ``{"event_ids": [...]}``."""
    runtime = request.app[RUNTIME]
    try:
        ids = journal.parse_replay(await read_json(request))
    except ConfigError as exc:
        raise _config_error(exc) from None
    replayed = await journal.replay(runtime.pool, enterprise, runtime.adapter.name, ids)
    return web.json_response({"replayed": replayed})


async def get_diagnostics(request: web.Request, enterprise: str) -> web.Response:
    """The enterprise's queue, guards, holds, last success and error."""
    return web.json_response(await diagnostics.enterprise(request.app[RUNTIME], enterprise))


ACTIONS: Final[tuple[tuple[str, str, Action], ...]] = (
    ("GET", "/config/{enterprise}", get_config),
    ("PUT", "/config/{enterprise}", put_config),
    ("DELETE", "/config/{enterprise}", delete_config),
    ("POST", "/register/{enterprise}", post_register),
    ("POST", "/test-connection/{enterprise}", post_test_connection),
    ("GET", "/managers/{enterprise}", get_managers),
    ("GET", "/internal-phones/{enterprise}", get_internal_phones),
    ("GET", "/user-extensions/{enterprise}", get_user_extensions),
    ("POST", "/user-extensions/{enterprise}", post_user_extensions),
    ("POST", "/sync-extensions/{enterprise}", post_sync_extensions),
    ("GET", "/journal/{enterprise}", get_journal),
    ("GET", "/journal/{enterprise}/deliveries/{event_id}", get_attempts),
    ("POST", "/deliveries/{enterprise}/replay", post_replay),
    ("GET", "/diagnostics/{enterprise}", get_diagnostics),
)


async def _known(request: web.Request, enterprise: str) -> None:
    if await request.app[RUNTIME].cache.fetch(enterprise) is None:
        raise HttpError(404, "unknown_enterprise", "no such enterprise", {"field": "enterprise"})


def _for_services(action: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        require_service_token(request)
        enterprise = request.match_info["enterprise"]
        await _known(request, enterprise)
        return await action(request, enterprise)

    handler.__doc__ = action.__doc__
    return handler


def _for_pages(action: Action) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        enterprise = request.match_info["enterprise"]
        await require_admin(request, enterprise)
        await _known(request, enterprise)
        return await action(request, enterprise)

    handler.__doc__ = action.__doc__
    return handler


def service_routes() -> list[web.RouteDef]:
    """The actions under ``/api`` (service token)."""
    return [web.route(method, "/api" + path, _for_services(action))
            for method, path, action in ACTIONS]


def page_routes() -> list[web.RouteDef]:
    """The actions under the admin sub-application's ``/api`` (session and CSRF)."""
    return [web.route(method, "/api" + path, _for_pages(action))
            for method, path, action in ACTIONS]
