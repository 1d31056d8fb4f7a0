"""Authentication of the service API: the platform's call services and operators.

``/api/*`` and ``/stats`` take the service token (``CRM_BRIDGE_SERVICE_TOKEN``) as
``Authorization: Bearer <token>`` (or ``X-Service-Token``), compared in constant time.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from daemon.runtime import RUNTIME
from web.middlewares import HttpError


def require_service_token(request: web.Request) -> None:
    """Raise 401 unless the request carries the service token."""
    expected = request.app[RUNTIME].settings.service_token
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        presented = request.headers.get("X-Service-Token", "")
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise HttpError(401, "unauthorized", "a valid service token is required")
