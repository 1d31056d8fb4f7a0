"""Operator endpoints: ``/health`` (a real database round trip) and ``/metrics``."""

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


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's registry."""
    runtime = request.app[RUNTIME]
    response = web.Response(body=runtime.metrics.render())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
