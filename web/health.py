"""Operator endpoints: ``/health`` (a real database round trip), ``/ready`` and ``/metrics``.

``/health`` says whether the process can reach its database now. ``/ready`` says whether it
can do its job: the database answers, the LISTEN connection is up (or the process polls
only, ``CRM_BRIDGE_NOTIFY=0``) and every migration this build knows is applied — 503 names
what is missing. A load balancer routes by ``/ready``; neither endpoint ever answers 500.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from daemon import __version__, store
from daemon.runtime import RUNTIME

HEALTH_DB_TIMEOUT_S = 2.0

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 when the database answers within ``HEALTH_DB_TIMEOUT_S``, else 503."""
    runtime = request.app[RUNTIME]
    started = time.perf_counter()
    body: dict[str, object] = {
        "integration": runtime.adapter.name,
        "version": __version__,
        "instance": runtime.settings.instance_id,
    }
    try:
        await store.ping(runtime.pool, HEALTH_DB_TIMEOUT_S)
    except Exception as exc:  # any failure to reach the DB is "unhealthy", not a 500
        body.update(status="unavailable", database=type(exc).__name__)
        return web.json_response(body, status=503)
    body.update(status="ok", database="ok", db_ms=round((time.perf_counter() - started) * 1000, 2))
    return web.json_response(body)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """200 when the database answers, the listener is connected (or poll-only) and no
    migration is pending; else 503 with ``missing`` naming each reason."""
    runtime = request.app[RUNTIME]
    missing: list[str] = []
    body: dict[str, object] = {"integration": runtime.adapter.name,
                               "instance": runtime.settings.instance_id}
    try:
        applied = await store.applied_migrations(runtime.pool, HEALTH_DB_TIMEOUT_S)
    except Exception as exc:  # any failure to reach the DB is "not ready", never a 500
        runtime.health.failed(exc, "ready")
        body["database"] = f"unavailable: {type(exc).__name__}"
        missing.append("database")
    else:
        runtime.health.succeeded()
        body["database"] = "ok"
        pending = sorted(runtime.migrations - applied)
        body["migrations"] = {"pending": pending} if pending else "ok"
        if pending:
            missing.append("migrations")
    listener = runtime.listener
    if listener is None:
        body["listener"] = "poll-only"
    elif listener.state.connected:
        body["listener"] = "connected"
    else:
        body["listener"] = "disconnected"
        missing.append("listener")
    body.update(status="not_ready" if missing else "ready", missing=missing)
    return web.json_response(body, status=503 if missing else 200)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's registry."""
    runtime = request.app[RUNTIME]
    response = web.Response(body=runtime.metrics.render())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
