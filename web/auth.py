"""Who is asking, and for which enterprise: the service token, admin sessions, CSRF.

* ``/api/*`` and ``/stats`` take the service token (``CRM_BRIDGE_SERVICE_TOKEN``) as
  ``Authorization: Bearer <token>`` (or ``X-Service-Token``), compared in constant time:
  the platform's services and operators, for any enterprise.
* The admin pages (``/<integration>-admin/``) and their own API calls take a session: our
  cookie ``crm_bridge_admin`` (made from an admin link, :func:`sign_in`) or the platform's
  ``session_token``. Each session opens exactly one enterprise: asking for another is 403,
  no session at all 401. Every state-changing call also needs the session's CSRF token in
  ``X-CSRF-Token`` (and, when the browser sends one, an ``Origin`` of this site): 403.

The cookie is HttpOnly, ``SameSite=Lax``, limited to the admin path, ``Secure`` when the
bridge is served over https, and lives as long as the session (12 h). The rules of sessions
themselves (hashing, revocation by ``token_version``) are in ``daemon/sessions.py``.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from daemon import links, sessions
from daemon.runtime import RUNTIME, Runtime
from web.middlewares import HttpError

COOKIE: Final = "crm_bridge_admin"
PLATFORM_COOKIE: Final = "session_token"
CSRF_HEADER: Final = "X-CSRF-Token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


def admin_prefix(runtime: Runtime) -> str:
    """Where the admin pages of this process's integration live: ``/retailcrm-admin``."""
    return f"/{runtime.adapter.name}-admin"


def require_service_token(request: web.Request) -> None:
    """Raise 401 unless the request carries the service token."""
    expected = request.app[RUNTIME].settings.service_token
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        presented = request.headers.get("X-Service-Token", "")
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise HttpError(401, "unauthorized", "a valid service token is required")


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in administrator: the enterprise they may see, and the credential that
    says so (our session id or the platform's token; the CSRF token is derived from it)."""

    enterprise: str
    credential: str
    kind: str  # "session" | "platform"


async def principals(request: web.Request) -> list[Principal]:
    """Every valid admin session the request carries (our cookie, the platform's)."""
    runtime = request.app[RUNTIME]
    found: list[Principal] = []
    ours = request.cookies.get(COOKIE, "")
    if ours:
        enterprise = await sessions.resolve(runtime.pool, ours, runtime.adapter.name)
        if enterprise is not None:
            found.append(Principal(enterprise, ours, "session"))
    theirs = request.cookies.get(PLATFORM_COOKIE, "")
    if theirs:
        enterprise = await sessions.platform(runtime.pool, theirs)
        if enterprise is not None:
            found.append(Principal(enterprise, theirs, "platform"))
    return found


async def require_admin(request: web.Request, enterprise: str | None) -> Principal:
    """The session that may act for ``enterprise`` (None: any one session); 401 without a
    valid session, 403 when the sessions are for other enterprises, 403 for a
    state-changing request without this session's CSRF token or from another origin."""
    found = await principals(request)
    if not found:
        raise HttpError(401, "unauthorized",
                        "sign in: open the admin pages from the CRM (or the platform)")
    principal = next((p for p in found if enterprise in (None, p.enterprise)), None)
    if principal is None:
        raise HttpError(403, "forbidden", "this session is for another enterprise",
                        {"field": "enterprise"})
    if request.method not in SAFE_METHODS:
        _check_origin(request)
        secret_key = request.app[RUNTIME].settings.secret_key
        presented = request.headers.get(CSRF_HEADER, "")
        if not sessions.csrf_ok(secret_key, principal.credential, presented):
            raise HttpError(403, "csrf", "the request lacks this page's CSRF token",
                            {"field": CSRF_HEADER})
    return principal


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _check_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return
    public = request.app[RUNTIME].settings.public_url
    allowed = {_origin(public), f"{request.scheme}://{request.host}".lower()}
    if origin.lower() not in allowed:
        raise HttpError(403, "csrf", "cross-origin requests are refused", {"field": "Origin"})


def csrf_token(request: web.Request, principal: Principal) -> str:
    """The CSRF token the pages of ``principal`` send back."""
    return sessions.csrf_token(request.app[RUNTIME].settings.secret_key, principal.credential)


async def sign_in(request: web.Request, token: str) -> str:
    """Exchange an admin link's token for a session; returns the enterprise and sets the
    cookie on the request's response-to-be (``request[NEW_SESSION]``). 401 for a link that
    is forged, expired, revoked or for another integration (its reason in ``details``)."""
    runtime = request.app[RUNTIME]
    try:
        opened = await sessions.open_by_link(runtime.pool, runtime.settings.secret_key, token,
                                             runtime.adapter.name)
    except links.InvalidLink as exc:
        runtime.metrics.admin_sessions.labels(exc.reason).inc()
        raise HttpError(401, "invalid_link", str(exc), {"reason": exc.reason}) from None
    runtime.metrics.admin_sessions.labels("opened").inc()
    request[NEW_SESSION] = opened.session_id
    return opened.enterprise


NEW_SESSION: Final = web.RequestKey("new_admin_session", str)


def set_cookie(request: web.Request, response: web.StreamResponse, session_id: str) -> None:
    """Give the browser the session cookie (see the module docstring for its flags)."""
    runtime = request.app[RUNTIME]
    secure = request.secure or runtime.settings.public_url.startswith("https://")
    response.set_cookie(COOKIE, session_id, max_age=int(sessions.SESSION_TTL_S),
                        path=admin_prefix(runtime) + "/", secure=secure, httponly=True,
                        samesite="Lax")


def clear_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Remove the session cookie."""
    response.del_cookie(COOKIE, path=admin_prefix(request.app[RUNTIME]) + "/")
