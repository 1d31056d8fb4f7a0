"""Admin sessions: who may open one enterprise's admin pages, and for how long.

Two ways in, both ending in one enterprise:

* **an admin link** (:mod:`daemon.links`) is exchanged for a session of our own
  (:func:`open_by_link`): 256 random bits, given to the browser once; the database keeps
  only their SHA-256 (``crm_admin_sessions``), with the enterprise, the integration and the
  integration's ``token_version`` at that moment. A session lives ``SESSION_TTL_S`` (12 h),
  ends early when the admin logs out, and dies with every link when ``token_version`` is
  bumped (deleting the integration does);
* **a platform session**: the platform's own ``session_token`` cookie, valid while its
  ``sessions`` table has that token for the enterprise asked for (:func:`platform`).

State-changing requests also carry a CSRF token (:func:`csrf_token`): an HMAC of the
session's credential under the process's secret key, so it needs no storage, differs per
session and cannot be computed without the key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

import asyncpg

from daemon import links, store
from daemon.store import Executor

SESSION_TTL_S: Final = 12 * 3600.0
SESSION_ID_BYTES: Final = 32
MAX_CREDENTIAL_CHARS: Final = 200
_CSRF_CONTEXT: Final = b"crm-bridge csrf\0"


@dataclass(frozen=True, slots=True)
class Opened:
    """A session made from a link: the id to give the browser, and its enterprise."""

    session_id: str
    enterprise: str


def _hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8")).digest()


async def open_by_link(db: Executor, secret_key: str, token: str, integration: str) -> Opened:
    """Verify an admin link of ``integration`` and open a session for its enterprise.

    ``links.InvalidLink`` when the link is forged, expired, revoked, malformed, or was
    issued by another integration (reason ``wrong_source``).
    """
    claims = links.decode(secret_key, token)
    if claims.source != integration:
        raise links.InvalidLink("wrong_source", "the link opens another integration's pages")
    claims = await links.verify_stored(db, secret_key, token)
    session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
    await store.create_admin_session(db, _hash(session_id), claims.enterprise, integration,
                                     claims.token_version, SESSION_TTL_S)
    return Opened(session_id, claims.enterprise)


async def resolve(db: Executor, session_id: str, integration: str) -> str | None:
    """The enterprise of a live session id, or None (unknown, expired, or revoked by a newer
    ``token_version``)."""
    if not session_id or len(session_id) > MAX_CREDENTIAL_CHARS:
        return None
    row = await store.admin_session(db, _hash(session_id), integration)
    if row is None or row["current_version"] != row["token_version"]:
        return None
    enterprise: str = row["enterprise_number"]
    return enterprise


async def close(db: Executor, session_id: str) -> None:
    """End a session now (logging out)."""
    if session_id and len(session_id) <= MAX_CREDENTIAL_CHARS:
        await store.delete_admin_session(db, _hash(session_id))


async def platform(db: Executor, token: str) -> str | None:
    """The enterprise of the platform's session ``token``; None when the platform has no
    such session (or no ``sessions`` table at all)."""
    if not token or len(token) > MAX_CREDENTIAL_CHARS:
        return None
    try:
        return await store.platform_session(db, token)
    except asyncpg.UndefinedTableError:
        return None


def csrf_token(secret_key: str, credential: str) -> str:
    """The CSRF token of the session whose credential (our session id, or the platform's
    token) is ``credential``."""
    key = hashlib.sha256(_CSRF_CONTEXT + secret_key.encode("utf-8")).digest()
    return hmac.new(key, credential.encode("utf-8"), hashlib.sha256).hexdigest()


def csrf_ok(secret_key: str, credential: str, presented: str) -> bool:
    """Whether ``presented`` is that session's CSRF token (constant-time)."""
    if not presented or len(presented) > MAX_CREDENTIAL_CHARS:
        return False
    return hmac.compare_digest(csrf_token(secret_key, credential).encode(),
                               presented.encode("utf-8", "replace"))
