"""The admin pages of one enterprise, under ``/<integration>-admin/`` (a sub-application).

``/?token=<admin link>`` signs in (the token is exchanged for a session cookie, then a 303
to the same address without it, so it leaves the address bar and the history) and leads to
the enterprise's pages: **Подключение** (``connection``), **Менеджеры и добавочные**
(``managers``), **Журнал** (``journal``, with a live view over server-sent events) and
**Диагностика** (``diagnostics``). The pages' own calls go to ``api/…`` (``admin_api``),
with the session and its CSRF token; ``static/`` holds one script and one style sheet.

Every answer of the sub-application carries the security headers (:func:`_headers`): a
Content-Security-Policy without inline script, no framing (RetailCRM opens the account page
in a new tab, not in a frame), nosniff, no referrer, and ``no-store``: the pages show an
enterprise's settings. A failure on a page is an HTML page saying what to do, never JSON.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from daemon import diagnostics, journal, sessions
from daemon.errors import ConfigError, DeliveryError
from daemon.runtime import RUNTIME
from web import admin_api
from web.auth import (
    NEW_SESSION,
    Principal,
    admin_prefix,
    clear_cookie,
    csrf_token,
    require_admin,
    set_cookie,
    sign_in,
)
from web.middlewares import Handler, HttpError
from web.templating import STATIC_DIR, render

log = structlog.get_logger(__name__)

HEARTBEAT_S: Final = 15.0
SSE_RETRY_MS: Final = 2000
PAGES: Final = ("connection", "managers", "journal", "diagnostics")
CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS: Final = {
    "Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

routes = web.RouteTableDef()


def create(prefix: str) -> web.Application:
    """The admin sub-application (mounted at ``prefix``/ by ``web.app``)."""
    sub = web.Application(middlewares=[_pages_fail_as_html])
    sub.add_routes(routes)
    sub.add_routes(admin_api.page_routes())
    sub.router.add_static("/static/", STATIC_DIR, name="static")
    sub.on_response_prepare.append(_headers)
    return sub


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """The security headers of every admin answer (see the module docstring)."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    static = "/static/" in request.path
    response.headers["Cache-Control"] = "no-cache" if static else "no-store"


@web.middleware
async def _pages_fail_as_html(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A refusal on a page is an HTML page; the API's stay JSON."""
    if "/api/" in request.path:
        return await handler(request)
    try:
        return await handler(request)
    except HttpError as exc:
        status, error_id, message = exc.status, exc.error_id, exc.message
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, error_id, message = exc.status, "http", ""
    except Exception as exc:
        if request.app[RUNTIME].health.failed(exc, "http"):  # an outage, not a bug
            log.warning("page_database_unavailable", path=request.path,
                        error=type(exc).__name__)
            status, error_id, message = 503, "unavailable", ""
        else:
            log.exception("page_failed", path=request.path)
            status, error_id, message = 500, "internal", ""
    return render(request, "error.html", {
        "status": status, "error": error_id, "message": message,
        "prefix": admin_prefix(request.app[RUNTIME]),
    }, status=status)


def _context(request: web.Request, principal: Principal, page: str,
             **extra: Any) -> dict[str, Any]:
    runtime = request.app[RUNTIME]
    return {"enterprise": principal.enterprise, "page": page,
            "prefix": admin_prefix(runtime), "integration": runtime.adapter.name,
            "csrf": csrf_token(request, principal), **extra}


# ---------------------------------------------------------------------- signing in


@routes.route("*", "/")
async def index(request: web.Request) -> web.StreamResponse:
    """Sign in with ``?token=`` (303 to the same address without it), or go to the
    session's enterprise. RetailCRM may POST to the account page: it is treated alike."""
    prefix = admin_prefix(request.app[RUNTIME])
    if request.method not in ("GET", "HEAD", "POST"):
        raise HttpError(405, "method_not_allowed", "use GET")
    token = request.query.get("token", "")
    if token:
        await sign_in(request, token)
        rest = {k: v for k, v in request.query.items() if k != "token"}
        response = web.Response(status=303, headers={
            "Location": str(request.rel_url.with_query(rest))})
        set_cookie(request, response, request[NEW_SESSION])
        return response
    principal = await require_admin(request, None)
    return _redirect(f"{prefix}/{principal.enterprise}/connection")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    """End this browser's session (CSRF required, as for every change)."""
    principal = await require_admin(request, None)
    if principal.kind == "session":
        await sessions.close(request.app[RUNTIME].pool, principal.credential)
    response = render(request, "error.html", {
        "status": 200, "error": "signed_out", "message": "",
        "prefix": admin_prefix(request.app[RUNTIME])})
    clear_cookie(request, response)
    return response


# ---------------------------------------------------------------------- pages


@routes.get("/{enterprise}/")
async def home(request: web.Request) -> web.Response:
    """The enterprise's first page."""
    enterprise = request.match_info["enterprise"]
    await require_admin(request, enterprise)
    return _redirect(f"{admin_prefix(request.app[RUNTIME])}/{enterprise}/connection")


@routes.get("/{enterprise}/connection")
async def connection(request: web.Request) -> web.Response:
    """Подключение: the CRM account, switches, time zone, region, lines."""
    principal = await require_admin(request, request.match_info["enterprise"])
    settings = await request.app[RUNTIME].adapter.read_settings(principal.enterprise)
    return render(request, "connection.html",
                  _context(request, principal, "connection", settings=settings))


@routes.get("/{enterprise}/managers")
async def managers(request: web.Request) -> web.Response:
    """Менеджеры и добавочные: managers, their numbers, the mismatches."""
    principal = await require_admin(request, request.match_info["enterprise"])
    adapter = request.app[RUNTIME].adapter
    view, problem = None, None
    try:
        view = await adapter.managers(principal.enterprise)
    except ConfigError:
        problem = "not_connected"
    except DeliveryError as exc:
        problem = f"crm_failed: {exc.message}"
    numbers = await adapter.internal_numbers_view(principal.enterprise)
    names = {m.id: m.name for m in view.managers} if view is not None else {}
    return render(request, "managers.html", _context(
        request, principal, "managers", view=view, problem=problem, numbers=numbers,
        names=names))


@routes.get("/{enterprise}/journal")
async def journal_page(request: web.Request) -> web.Response:
    """Журнал: deliveries, filters, keyset paging, attempts, replay, the live view."""
    principal = await require_admin(request, request.match_info["enterprise"])
    runtime = request.app[RUNTIME]
    problem: ConfigError | None = None
    try:
        where = journal.parse_filter(request.query)
    except ConfigError as exc:
        problem, where = exc, journal.Filter()
    result = await journal.page(runtime.pool, principal.enterprise, runtime.adapter.name,
                                where)
    return render(request, "journal.html", _context(
        request, principal, "journal", items=result["items"], next=result["next"],
        where=where, query=where.query(), problem=problem, statuses=journal.STATUSES,
        event_types=sorted(runtime.adapter.event_types)))


@routes.get("/{enterprise}/diagnostics")
async def diagnostics_page(request: web.Request) -> web.Response:
    """Диагностика: queue, guards, holds, last success and error, cache, listener."""
    principal = await require_admin(request, request.match_info["enterprise"])
    state = await diagnostics.enterprise(request.app[RUNTIME], principal.enterprise)
    return render(request, "diagnostics.html",
                  _context(request, principal, "diagnostics", state=state))


# ---------------------------------------------------------------------- the live view


@routes.get("/{enterprise}/journal/live")
async def live(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``delivery`` (a new delivery or a new state, as a journal row),
    ``reload`` (fell behind, or the server is stopping: load the page again)."""
    principal = await require_admin(request, request.match_info["enterprise"])
    try:
        where = journal.parse_filter({k: v for k, v in request.query.items()
                                      if k not in ("before", "limit")})
    except ConfigError as exc:
        raise HttpError(400, "invalid_field", str(exc), {"field": exc.field}) from None
    runtime = request.app[RUNTIME]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(f"retry: {SSE_RETRY_MS}\n: watching\n\n".encode())
    try:
        async with runtime.feed.watch(principal.enterprise, where) as watcher:
            stopping = runtime.supervisor.stopping
            while not (stopping.is_set() or watcher.behind.is_set()):
                item = await _next(watcher.queue, stopping, watcher.behind)
                chunk = (f"event: delivery\ndata: {_json(item)}\n\n" if item is not None
                         else ": heartbeat\n\n")
                await response.write(chunk.encode())
            await response.write(b"event: reload\ndata: {}\n\n")
    except ConnectionResetError:
        pass  # the page was closed: nothing to tell anyone
    return response


async def _next(queue: asyncio.Queue[dict[str, Any]], *stops: asyncio.Event
                ) -> dict[str, Any] | None:
    """The next queued item, or None after ``HEARTBEAT_S`` or when a stop is set."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    waiters = {getter, *(asyncio.ensure_future(s.wait()) for s in stops)}
    try:
        await asyncio.wait(waiters, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None


def _json(item: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in item.items() if k != "enterprise"},
                      ensure_ascii=False, separators=(",", ":"))
