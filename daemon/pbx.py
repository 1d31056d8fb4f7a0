"""The platform's Asterisk service: place a call, transfer one. CRM-neutral.

Two requests, both ``GET`` on ``CRM_BRIDGE_PBX_URL``:

* originate — ``/api/makecallexternal?code=<extension>&phone=<number>&clientId=<secret>``:
  the extension's phone rings first, then the number is dialled;
* blind transfer — ``/api/transfer?transfer_type=blind&from_ext=&to_ext=&clientId=``.

``clientId`` is the enterprise's credential there, ``enterprises.secret``: read from the
database for each request (:meth:`Pbx.line`), never cached, never logged, never in an
error message or a log row.

**The service passes these values into a shell on the PBX host.** So nothing leaves unless
every value is known to be harmless, and the refusal (:class:`PbxRefused`, naming the
field) comes before any connection is opened:

* an extension must be ASCII digits only (1–10 of them) **and** one of that enterprise's
  internal numbers (``user_internal_phones``) — another enterprise's number is refused;
* a phone must be an optional ``+`` and 3–18 ASCII digits, nothing else (no spaces,
  separators, letters, control characters), and then either one of the enterprise's internal
  numbers (a call to a colleague, sent as it is) or a number libphonenumber accepts as
  possible in the enterprise's region, sent in E.164 (``80291234567`` → ``+375291234567``).

Failures are typed: :class:`PbxRefused` (nothing was sent: HTTP 400 for a caller),
:class:`PbxFailed` (the service refused or could not be reached: 502) and
:class:`PbxTimeout` (no answer within ``CRM_BRIDGE_PBX_TIMEOUT_S``: 504). A 2xx answer is
success unless its JSON body says ``"success": false``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import asyncpg
import structlog

from daemon import logconfig, phones, store
from daemon.logs import mask
from daemon.metrics import Metrics

log = structlog.get_logger(__name__)

ORIGINATE_PATH: Final = "/api/makecallexternal"
TRANSFER_PATH: Final = "/api/transfer"
MAX_ANSWER_BYTES: Final = 4096  # what is read of an answer; the rest is not our business
EXCERPT_CHARS: Final = 300
SHOWN_CHARS: Final = 40  # how much of a refused value an error message or log row shows
KEEPALIVE_S: Final = 1.0  # an idle connection to the service is closed after this

_EXTENSION: Final = re.compile(r"[0-9]{1,10}")
_PHONE: Final = re.compile(r"\+?[0-9]{3,18}")


class PbxError(Exception):
    """Base class; ``error_id`` is stable, ``message`` safe to show (never a secret)."""

    error_id = "pbx_error"
    status = 502

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PbxRefused(PbxError):
    """A value failed validation: nothing was sent. ``field`` names it."""

    error_id = "invalid_field"
    status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class PbxFailed(PbxError):
    """The service answered with an error, or could not be reached."""

    error_id = "pbx_failed"


class PbxTimeout(PbxFailed):
    """The service did not answer in time (the request may still have been acted on)."""

    error_id = "pbx_timeout"
    status = 504


@dataclass(frozen=True, slots=True)
class Line:
    """One enterprise at the PBX: its credential and internal numbers, as read just now."""

    enterprise: str
    secret: str = field(repr=False)
    extensions: frozenset[str]


@dataclass(frozen=True, slots=True)
class PbxAnswer:
    """What the service answered (``body``: parsed JSON or a short excerpt, masked)."""

    status: int
    body: Any
    duration_s: float


def shown(value: str) -> str:
    """``value`` made safe to quote in a message or a log row: non-printable characters
    escaped (a NUL cannot go into jsonb), at most ``SHOWN_CHARS`` of it."""
    cut = value[:SHOWN_CHARS]
    escaped = cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")
    return escaped + ("…" if len(value) > SHOWN_CHARS else "")


def check_extension(value: str, line: Line, field: str = "code") -> str:
    """``value`` when it is one of ``line``'s internal numbers (digits only), else
    ``PbxRefused(field)``."""
    if not isinstance(value, str) or not _EXTENSION.fullmatch(value):
        raise PbxRefused(field, f"{shown(str(value))!r} is not an internal number (digits only)")
    if value not in line.extensions:
        raise PbxRefused(field, f"{value} is not an internal number of this enterprise")
    return value


def check_phone(value: str, line: Line, region: str, field: str = "phone") -> str:
    """What to send for ``value``: an internal number as it is, any other number in E.164;
    ``PbxRefused(field)`` when it is not a plausible number (see the module docstring)."""
    if not isinstance(value, str) or not _PHONE.fullmatch(value):
        raise PbxRefused(field, f"{shown(str(value))!r} is not a phone number (an optional + "
                         "and 3 to 18 digits, nothing else)")
    if value in line.extensions:
        return value
    normalized, trusted = phones.normalize_ex(value, region)
    if not trusted or not normalized.startswith("+"):
        raise PbxRefused(field, f"{value} is not a possible phone number in region {region}")
    return normalized


def new_session(timeout_s: float, *, connections: int = 100,
                connect_timeout_s: float = 5.0) -> aiohttp.ClientSession:
    """The PBX's own ``ClientSession`` (one per upstream).

    Originating a call is not idempotent, though it is a GET: aiohttp re-sends a GET once
    when the server drops the connection, which here could ring a manager twice. So that
    retry is off (aiohttp has no public switch: ``_retry_connection`` is the attribute its
    own code reads; tests/test_pbx.py proves a dropped connection reaches the PBX once).
    Without it, a pooled connection the service has just closed for idleness would fail a
    click; so an idle connection is kept only ``KEEPALIVE_S``, below the idle timeout of
    common servers (2 s and more), while clicks in a busy second share connections (a new
    connection per request cost the service ten times more under load).
    """
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s,
                                      connect=min(connect_timeout_s, timeout_s)),
        connector=aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S),
    )
    session._retry_connection = False
    return session


class Pbx:
    """The client (see the module docstring). One per process, built by the Runtime with a
    ``ClientSession`` of its own (one per upstream)."""

    def __init__(self, pool: asyncpg.Pool, session: aiohttp.ClientSession, base_url: str, *,
                 timeout_s: float, metrics: Metrics) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._pool = pool
        self._session = session
        self._base = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"Pbx({self._base!r})"

    async def line(self, enterprise: str) -> Line:
        """The enterprise's credential and internal numbers, read now (one round trip).

        ``PbxRefused("enterprise")`` when the enterprise does not exist or has no secret.
        """
        found = await store.pbx_line(self._pool, enterprise)
        if found is None:
            raise PbxRefused("enterprise", f"there is no enterprise {shown(enterprise)!r}")
        secret, numbers = found
        if not secret:
            raise PbxRefused("enterprise", f"enterprise {enterprise} has no credential at the "
                             "PBX (enterprises.secret is empty)")
        logconfig.also_hide((secret,))  # from now on no log line of this request shows it
        return Line(enterprise, secret, frozenset(n for n in numbers if _EXTENSION.fullmatch(n)))

    async def originate(self, line: Line, extension: str, phone: str, *,
                        region: str = phones.DEFAULT_REGION) -> PbxAnswer:
        """Ring ``extension``, then dial ``phone`` (both checked first, see the module)."""
        try:
            code = check_extension(extension, line, "code")
            number = check_phone(phone, line, region, "phone")
        except PbxRefused:
            self._metrics.pbx_requests.labels("originate", "refused").inc()
            raise
        return await self._get("originate", ORIGINATE_PATH, line,
                               {"code": code, "phone": number})

    async def transfer(self, line: Line, from_ext: str, to_ext: str) -> PbxAnswer:
        """Blind-transfer the call at ``from_ext`` to ``to_ext`` (both internal numbers)."""
        try:
            source = check_extension(from_ext, line, "from_ext")
            target = check_extension(to_ext, line, "to_ext")
        except PbxRefused:
            self._metrics.pbx_requests.labels("transfer", "refused").inc()
            raise
        return await self._get("transfer", TRANSFER_PATH, line,
                               {"transfer_type": "blind", "from_ext": source, "to_ext": target})

    async def _get(self, action: str, path: str, line: Line,
                   params: Mapping[str, str]) -> PbxAnswer:
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = "failed"
        try:
            answer = await self._send(path, line, params, started)
            outcome = "ok"
            return answer
        except PbxTimeout:
            outcome = "timeout"
            raise
        finally:
            elapsed = loop.time() - started
            self._metrics.pbx_requests.labels(action, outcome).inc()
            self._metrics.pbx_seconds.labels(action).observe(elapsed)
            # The caller logs the canonical line of its request; failures are worth one here.
            (log.debug if outcome == "ok" else log.warning)(
                "pbx_request", action=action, enterprise=line.enterprise, outcome=outcome,
                duration_ms=round(elapsed * 1000, 1),
                **{k: v for k, v in params.items() if k != "phone"})

    async def _send(self, path: str, line: Line, params: Mapping[str, str],
                    started: float) -> PbxAnswer:
        query = {**params, "clientId": line.secret}
        loop = asyncio.get_running_loop()
        try:
            async with self._session.get(
                self._base + path, params=query, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            ) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES)
                status = resp.status
        except TimeoutError:
            raise PbxTimeout(f"the PBX did not answer within {self._timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = mask(f"{type(exc).__name__}: {exc}", (line.secret,))
            raise PbxFailed(f"the PBX could not be reached ({reason})") from None
        body = _parsed(raw, line.secret)
        answer = PbxAnswer(status, body, loop.time() - started)
        refused = isinstance(body, dict) and body.get("success") is False
        if not 200 <= status < 300 or refused:
            said = _message(body)
            raise PbxFailed(f"the PBX refused the request (HTTP {status}"
                            f"{': ' + said if said else ''})")
        return answer


def _parsed(raw: bytes, secret: str) -> Any:
    text = raw.decode("utf-8", "replace")
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text[:EXCERPT_CHARS]
    return mask(body, (secret,))


def _message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "error", "errorMsg"):
            if isinstance(body.get(key), str):
                return shown(body[key])
        return ""
    return shown(body) if isinstance(body, str) else ""
