"""Admin links: signed, expiring, revocable tokens that open one enterprise's admin pages.

A CRM opens the bridge's admin pages for an enterprise through a link it was given (for
RetailCRM, the module's ``accountUrl``): ``<public>/<integration>-admin/?token=<JWT>``. This
module owns that token, and nothing else about the pages.

The token is a JWT signed with HS256 under ``CRM_BRIDGE_SECRET_KEY``. Claims:

* ``enterprise`` — the enterprise number the link opens, and nothing else;
* ``source`` — the integration that issued it (its key in ``integrations_config``);
* ``token_version`` — the ``token_version`` of that integration's configuration when the
  link was issued. Bumping the stored value revokes every link issued before, at once;
* ``iat``, ``exp`` — issued at, expires at (seconds since the epoch);
* ``aud`` — ``crm-bridge:admin-link``, so no other token signed with the same key (a
  future session cookie, say) is ever taken for a link.

Verification checks the signature, the audience, the expiry and the version against the
current configuration; every failure is one :class:`InvalidLink` whose ``reason`` is a
stable word and whose message never quotes the token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import jwt

from daemon import store
from daemon.store import Executor

ALGORITHM: Final = "HS256"
AUDIENCE: Final = "crm-bridge:admin-link"
DEFAULT_TTL_S: Final = 7 * 86_400.0
MAX_TTL_S: Final = 366 * 86_400.0
VERSION_KEY: Final = "token_version"


class InvalidLink(Exception):
    """A link token that must not open anything; ``reason`` is one of ``malformed``,
    ``bad_signature``, ``expired``, ``revoked``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LinkClaims:
    """What a valid link token says (see the module docstring)."""

    enterprise: str
    source: str
    token_version: int
    issued_at: int
    expires_at: int


def create(
    secret_key: str,
    enterprise: str,
    source: str,
    token_version: int,
    *,
    ttl_s: float = DEFAULT_TTL_S,
    now: float | None = None,
) -> str:
    """A signed link token for ``enterprise`` issued by integration ``source``.

    ``ValueError`` for an empty enterprise or source, a negative version, or a lifetime
    that is not positive or exceeds ``MAX_TTL_S``.
    """
    if not enterprise or not source:
        raise ValueError("a link needs an enterprise and a source")
    if isinstance(token_version, bool) or not isinstance(token_version, int) or token_version < 0:
        raise ValueError("token_version must be a non-negative integer")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:g}]")
    issued = int(time.time() if now is None else now)
    claims = {
        "enterprise": enterprise, "source": source, "token_version": token_version,
        "iat": issued, "exp": issued + int(ttl_s), "aud": AUDIENCE,
    }
    return jwt.encode(claims, secret_key, algorithm=ALGORITHM)


def decode(secret_key: str, token: str, *, now: float | None = None) -> LinkClaims:
    """The claims of a token whose signature, audience and expiry hold (the version is not
    checked here: see :func:`verify`). ``InvalidLink`` otherwise."""
    try:
        raw: dict[str, Any] = jwt.decode(
            token, secret_key, algorithms=[ALGORITHM], audience=AUDIENCE,
            options={"require": ["exp", "iat", "aud"], "verify_exp": False},
        )
    except jwt.InvalidSignatureError:
        raise InvalidLink("bad_signature", "the link's signature is not valid") from None
    except jwt.PyJWTError:
        raise InvalidLink("malformed", "the link is not a valid admin link") from None
    claims = _claims(raw)
    if claims.expires_at <= (time.time() if now is None else now):
        raise InvalidLink("expired", "the link has expired: open it again from the CRM")
    return claims


def verify(
    secret_key: str, token: str, current_version: int | None, *, now: float | None = None
) -> LinkClaims:
    """:func:`decode`, then the token's version must equal ``current_version`` (the stored
    ``token_version``; None when the integration is not configured: every link is void)."""
    claims = decode(secret_key, token, now=now)
    if current_version is None or claims.token_version != current_version:
        raise InvalidLink("revoked", "the link has been revoked: open it again from the CRM")
    return claims


async def verify_stored(
    db: Executor, secret_key: str, token: str, *, now: float | None = None
) -> LinkClaims:
    """:func:`verify` against the ``token_version`` stored now in
    ``integrations_config[source]`` of the token's enterprise (absent: 0)."""
    claims = decode(secret_key, token, now=now)
    config = await store.read_integration_config(db, claims.enterprise, claims.source)
    current: int | None = None
    if config is not None:
        value = config.get(VERSION_KEY, 0)
        current = value if isinstance(value, int) and not isinstance(value, bool) else None
    return verify(secret_key, token, current, now=now)


def _claims(raw: dict[str, Any]) -> LinkClaims:
    enterprise, source = raw.get("enterprise"), raw.get("source")
    numbers: list[Any] = [raw.get(key) for key in ("token_version", "iat", "exp")]
    if not (isinstance(enterprise, str) and enterprise and isinstance(source, str) and source):
        raise InvalidLink("malformed", "the link is not a valid admin link")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
        raise InvalidLink("malformed", "the link is not a valid admin link")
    version, issued, expires = (int(n) for n in numbers)
    return LinkClaims(enterprise, source, version, issued, expires)


async def issue(
    db: Executor, secret_key: str, enterprise: str, source: str, *, ttl_s: float = DEFAULT_TTL_S
) -> str | None:
    """A link token for ``enterprise`` at the version stored now; None when there is no such
    enterprise. An integration never configured there gets its key with ``token_version``
    0 first (nothing else), so the link opens its pages to set it up."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:g}]")
    stored = await store.merge_integration_config_missing(db, enterprise, source,
                                                          {VERSION_KEY: 0})
    if stored is None:
        return None
    version = stored.get(VERSION_KEY)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{source}.{VERSION_KEY} is stored malformed for {enterprise}")
    return create(secret_key, enterprise, source, version, ttl_s=ttl_s)
