"""The service API (service-token authenticated): event ingest, config cache, enablement, stats.

Contracts are in docs/api.md. Every answer is JSON; errors carry ``error`` (a stable id),
``message`` and ``details.field`` for bad input. JSON bodies are read by ``web.bodies``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from daemon import collector
from daemon.cache import AmbiguousToken, Entry
from daemon.ingest import (
    FieldError,
    IncomingEvent,
    UnknownToken,
    accept,
    parse_envelope,
    parse_raw,
)
from daemon.runtime import RUNTIME, Runtime
from web.auth import require_service_token
from web.bodies import read_json
from web.middlewares import HttpError, field_error

routes = web.RouteTableDef()


async def _ingest(request: web.Request, parsed: IncomingEvent | str,
                  token_field: str) -> web.Response:
    runtime = request.app[RUNTIME]
    if isinstance(parsed, str):
        runtime.metrics.events_ingested.labels("ignored").inc()
        return web.json_response({"accepted": True, "stored": False, "ignored": parsed},
                                 status=202)
    try:
        result = await accept(runtime.pool, runtime.cache.matrix, parsed)
    except UnknownToken:
        runtime.metrics.events_ingested.labels("unknown_token").inc()
        raise HttpError(404, "unknown_token", "no active enterprise has this token",
                        {"field": token_field}) from None
    except AmbiguousToken as exc:
        runtime.metrics.events_ingested.labels("ambiguous_token").inc()
        raise HttpError(409, "ambiguous_token",
                        f"{token_field}: {exc}; nothing was stored",
                        {"field": token_field, "enterprises": list(exc.enterprises)}) from None
    runtime.metrics.events_ingested.labels("stored" if result.stored else "not_stored").inc()
    return web.json_response(result.body(), status=202)


@routes.post("/api/events")
async def post_event(request: web.Request) -> web.Response:
    """The platform's envelope ``{token, uniqueId, event_type, raw, record_url?, origin?}``."""
    require_service_token(request)
    try:
        parsed = parse_envelope(await read_json(request))
    except FieldError as exc:
        raise field_error(exc.field, exc.message) from None
    return await _ingest(request, parsed, "token")


@routes.post("/api/events/{event_type}")
async def post_raw_event(request: web.Request) -> web.Response:
    """A raw Asterisk body (with ``Token`` and ``UniqueId``)."""
    require_service_token(request)
    try:
        parsed = parse_raw(request.match_info["event_type"], await read_json(request))
    except FieldError as exc:
        raise field_error(exc.field, exc.message) from None
    return await _ingest(request, parsed, "Token")


def _describe(runtime: Runtime, entry: Entry) -> dict[str, Any]:
    return {
        "enterprise": entry.enterprise,
        "active": entry.active,
        "enabled": sorted(entry.enabled_types),
        "serves": entry.serves,
        "integration": runtime.adapter.name,
        "held": entry.held,
        "invalid": entry.invalid,
    }


@routes.post("/api/config-cache/refresh/{enterprise}")
async def refresh_one(request: web.Request) -> web.Response:
    """Reload one enterprise now (single-flight with any load already running)."""
    require_service_token(request)
    runtime = request.app[RUNTIME]
    enterprise = request.match_info["enterprise"]
    entry = await runtime.cache.load(enterprise, "manual")
    if entry is None:
        raise HttpError(404, "unknown_enterprise", "no such enterprise", {"field": "enterprise"})
    return web.json_response(_describe(runtime, entry))


@routes.post("/api/config-cache/refresh-all")
async def refresh_all(request: web.Request) -> web.Response:
    """Reload every enterprise and swap the cache."""
    require_service_token(request)
    count = await request.app[RUNTIME].cache.refresh_all("manual")
    return web.json_response({"entries": count})


@routes.get("/api/config-cache/active-enterprises")
async def active_enterprises(request: web.Request) -> web.Response:
    """Enterprises this process delivers for (integration enabled, valid, enterprise active)."""
    require_service_token(request)
    runtime = request.app[RUNTIME]
    serving = sorted(e.enterprise for e in runtime.cache.entries() if e.serves)
    return web.json_response({"integration": runtime.adapter.name, "enterprises": serving})


@routes.get("/api/enablement/{enterprise}")
async def enablement(request: web.Request) -> web.Response:
    """Which integration types are enabled for an enterprise (from memory)."""
    require_service_token(request)
    runtime = request.app[RUNTIME]
    enterprise = request.match_info["enterprise"]
    enabled = runtime.cache.matrix.enabled(enterprise)
    if enabled is None:
        raise HttpError(404, "unknown_enterprise", "no such enterprise", {"field": "enterprise"})
    return web.json_response({"enterprise": enterprise, "enabled": sorted(enabled)})


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    """Listener, cache, dispatcher (with ownership), guards, smart redirect and database
    state (operators; service token)."""
    require_service_token(request)
    runtime = request.app[RUNTIME]
    body = {
        "integration": runtime.adapter.name,
        "instance": runtime.settings.instance_id,
        "tasks": runtime.supervisor.names,
        "listener": runtime.listener.stats() if runtime.listener else {"mode": "poll-only"},
        "cache": runtime.cache.stats(),
        "dispatcher": runtime.dispatcher.stats(),
        "guards": runtime.guards.stats(),
        "smart_redirect": runtime.redirect.stats(),
        "database": runtime.health.stats(),
        "gc": collector.stats(),
    }
    return web.json_response(body)
