"""Middlewares: errors as JSON with a stable ``error_id``, and request metrics.

Handlers raise ``HttpError(status, error_id, message, details)``. A failure that
``daemon.db.unavailable`` classes as "the database is unavailable" is answered 503
``unavailable`` with ``Retry-After`` (an outage, not a bug: one warning line, no
traceback); anything else that escapes a handler is a bug: it is logged with its traceback
and answered 500 with no internals. A client error is answered with the field it concerns in
``details`` and never echoes a secret.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from daemon.runtime import RUNTIME

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """An error answer: ``{"error": error_id, "message": ..., "details": ...}``."""

    def __init__(
        self, status: int, error_id: str, message: str, details: Any = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id
        self.message = message
        self.details = details

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.error_id, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return web.json_response(body, status=self.status)


def field_error(field: str, message: str) -> HttpError:
    """400 naming ``field``."""
    return HttpError(400, "invalid_field", f"{field}: {message}", {"field": field})


# What a client should wait before trying again while the database is away.
UNAVAILABLE_RETRY_AFTER_S = 1

_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error answer (never a traceback page)."""
    try:
        return await handler(request)
    except HttpError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":  # an answer in its route's own shape
            return web.Response(status=exc.status, body=exc.body,
                                content_type="application/json")
        error_id = _REASONS.get(exc.status, f"http_{exc.status}")
        return HttpError(exc.status, error_id, exc.reason).response()
    except ConnectionResetError as exc:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            return _failed(request, exc)  # not the client's connection: the database's?
        # The client left, or the server cut it (a body past its deadline): nobody to answer.
        log.debug("request_abandoned", path=request.path, method=request.method)
        return HttpError(408, "request_timeout", "the request did not arrive in time").response()
    except Exception as exc:
        return _failed(request, exc)


def _failed(request: web.Request, exc: Exception) -> web.Response:
    """The answer to an exception no handler expected (called inside its ``except``): 503
    when the database is unavailable (an outage: one line, no traceback), else 500 (a bug:
    its traceback in the log, no internals in the answer)."""
    if request.app[RUNTIME].health.failed(exc, "http"):
        log.warning("request_database_unavailable", path=request.path,
                    method=request.method, error=type(exc).__name__)
        response = HttpError(503, "unavailable",
                             "the database is unavailable; try again shortly").response()
        response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
        return response
    log.exception("request_failed", path=request.path, method=request.method)
    return HttpError(500, "internal", "internal error; see the server log").response()


@web.middleware
async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time requests by route (the route's pattern, never the raw path)."""
    started = time.perf_counter()
    response = await handler(request)
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    metrics = request.app[RUNTIME].metrics
    metrics.http_requests.labels(route, str(response.status)).inc()
    metrics.http_seconds.labels(route).observe(time.perf_counter() - started)
    return response
