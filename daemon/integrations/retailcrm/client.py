"""The RetailCRM API v5 HTTP client: one method per endpoint the bridge calls, typed errors.

Owns the wire format of docs/retailcrm.md (the ``X-API-KEY`` header, form-encoded POST bodies
whose nested objects travel as JSON strings, PHP-style GET keys) and the mapping of every
failure to :class:`~daemon.errors.Retryable`, :class:`~daemon.errors.Permanent` or
:class:`~daemon.errors.AuthFailed`. It is deliberately dumb: no database, no retries (the
dispatcher decides), no logging; each round trip is handed to ``on_exchange`` for the
caller's attempt log row. The API key goes out in a header only and never appears in an
:class:`Exchange`, an error message or error details; neither does any other secret the
caller names (``secrets``: the clientId...), even when RetailCRM echoes it back — as a value,
in a text or as an object key.

Answers are read up to ``max_response_bytes`` after decompression (``response_too_large``
past it, retryable; the body is not kept) and decoded by :mod:`daemon.strictjson`: an answer
that is JSON but cannot be decoded safely (too deep, a number out of range) is ``malformed``.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import string
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote_plus

import aiohttp
from yarl import URL

from daemon import egress, errors, logconfig, strictjson
from daemon.integrations.base import AdapterDeps, Exchange
from daemon.integrations.retailcrm.config import RetailCrmConfig

MAX_UPLOAD_BATCH: Final = 50
USERS_PAGE_LIMIT: Final = 100
USER_STATUSES: Final = frozenset({"free", "busy", "dinner", "break"})
DEFAULT_TIMEOUT_S: Final = 3.0
DEFAULT_MAX_RESPONSE_BYTES: Final = 1_048_576
READ_CHUNK_BYTES: Final = 65_536
# RetailCRM's answers are a few levels deep; anything deeper is not an answer of its.
MAX_REPLY_DEPTH: Final = 64
EXCERPT_CHARS: Final = 300
ERRORS_IN_MESSAGE_CHARS: Final = 300

_WRONG_KEY_MSG: Final = 'Wrong "apiKey" value.'
_NO_ACCOUNT_MSG: Final = "Account does not exist"
_RATE_LIMITED_STATUSES: Final = frozenset({429, 503})
_FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"
_REDACTED: Final = "***"
_CODE_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

RequestGate = Callable[[str], Awaitable[None]]
"""Awaited with the API path before every request; may raise ``Retryable(rate_limited=True)``."""


class _NotJson:
    """Marks a body that did not parse as JSON (``None`` is a valid JSON body)."""


_NOT_JSON: Final = _NotJson()


# application/x-www-form-urlencoded as urllib.parse.urlencode writes it: letters, digits and
# "_.-~" as they are, the space as "+", any other character as %XX of its UTF-8 bytes. For
# ASCII text (every field RetailCRM gets from us but a name) one str.translate does it in C,
# where urlencode quotes byte by byte in Python (3 % of a delivery's CPU).
_FORM_SAFE: Final = frozenset(string.ascii_letters + string.digits + "_.-~")
_FORM_ASCII: Final = {code: chr(code) if chr(code) in _FORM_SAFE else "+" if code == 32
                      else f"%{code:02X}" for code in range(128)}


def form_body(fields: Mapping[str, str]) -> bytes:
    """``fields`` form-encoded, exactly as ``urllib.parse.urlencode(fields).encode()``."""
    return "&".join(f"{_form_quote(k)}={_form_quote(v)}" for k, v in fields.items()).encode()


def _form_quote(text: str) -> str:
    return text.translate(_FORM_ASCII) if text.isascii() else quote_plus(text)


def encode_json_field(value: Any) -> str:
    """Encode one nested form field the way RetailCRM expects: compact JSON, UTF-8 kept."""
    return _encode_field(value)


# Built once: json.dumps with options builds a new encoder on every call. (An encoder keeps
# no state between calls: a constant.)
_encode_field = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RetailCrmClient:
    """Typed calls to one RetailCRM account; every failure raises an ``errors`` class.

    The session is injected and shared (one per upstream); every request
    carries its own ``ClientTimeout(total=timeout_s)``. ``gate`` is awaited with the API path
    before each request (the caller's rate limiter), ``on_exchange`` is called once per round
    trip, failed ones included. Redirects are not followed: a custom header such as
    ``X-API-KEY`` would follow the redirect to whatever host it names.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        domain: str,
        api_key: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        gate: RequestGate | None = None,
        on_exchange: Callable[[Exchange], None] | None = None,
        secrets: Sequence[str] = (),
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not api_key:
            raise ValueError("api_key must not be empty")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_response_bytes <= 0:
            raise ValueError("max_response_bytes must be positive")
        self._session = session
        self._base = domain.rstrip("/")
        # Shown in messages: scheme and host only, so userinfo in a bad config never leaks.
        self._origin = str(URL(self._base).origin())
        self._api_key = api_key
        # Longest first: a secret containing another is replaced whole.
        self._hidden = tuple(sorted({api_key, *filter(None, secrets)}, key=len, reverse=True))
        self._hidden_bytes = tuple(h.encode() for h in self._hidden)
        self._timeout_s = timeout_s
        self._max_response_bytes = max_response_bytes
        self._gate = gate
        self._on_exchange = on_exchange

    def __repr__(self) -> str:
        return f"RetailCrmClient({self._origin!r}, api_key={_REDACTED!r})"

    # -- endpoints ------------------------------------------------------------------------

    async def credentials(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /api/credentials``: the key's ``scopes``, ``siteAccess``, ``sitesAvailable``."""
        return await self._request("GET", "/api/credentials", timeout_s=timeout_s)

    async def get_module(self, code: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Return the ``integrationModule`` object registered under ``code``.

        A module that does not exist raises ``Permanent`` with ``status == 404``.
        """
        path = f"/api/v5/integration-modules/{_segment(code)}"
        body = await self._request("GET", path, timeout_s=timeout_s)
        module: dict[str, Any] = self._expect(body, "integrationModule", dict, "GET", path)
        return module

    async def edit_module(
        self, code: str, module: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Create or replace the module ``code``; return the whole body (with ``info``).

        ``info`` may list ``notExistUsersIds`` / ``notExistSiteCodes``: accepted, but worth a
        warning to the admin. An unpaid account raises ``Permanent(error_id="payment_required")``.
        """
        path = f"/api/v5/integration-modules/{_segment(code)}/edit"
        return await self._request(
            "POST", path, form={"integrationModule": dict(module)}, timeout_s=timeout_s
        )

    async def call_event(
        self, event: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Send one live call event (the popup); return the body (``notExistCodes``...)."""
        return await self._request(
            "POST", "/api/v5/telephony/call/event", form={"event": dict(event)},
            timeout_s=timeout_s,
        )

    async def upload_calls(
        self, calls: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Upload finished calls; return ``{success, processedCallsCount, duplicateCalls}``.

        At most ``MAX_UPLOAD_BATCH`` calls and at least one, else ``ValueError`` before any
        request. Calls whose ``externalId`` RetailCRM already holds come back in
        ``duplicateCalls``: uploads are idempotent by ``externalId``.
        """
        if not calls:
            raise ValueError("upload_calls needs at least one call")
        if len(calls) > MAX_UPLOAD_BATCH:
            raise ValueError(
                f"upload_calls takes at most {MAX_UPLOAD_BATCH} calls per request, "
                f"got {len(calls)}: split the batch"
            )
        return await self._request(
            "POST", "/api/v5/telephony/calls/upload",
            form={"calls": [dict(call) for call in calls]}, timeout_s=timeout_s,
        )

    async def responsible_manager(
        self, phone: str, *, ignore_status: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any] | None:
        """Return the ``manager`` object responsible for ``phone``, or None when there is none.

        Both readings of "no manager" give None: a success body whose ``manager`` is absent or
        null, and a 404 answer (unless it is an authentication failure).
        """
        manager, _customer = await self.telephony_manager(
            phone, ignore_status=ignore_status, timeout_s=timeout_s)
        return manager

    async def telephony_manager(
        self, phone: str, *, ignore_status: bool = False, timeout_s: float | None = None
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``GET /api/v5/telephony/manager`` with ``details=1``: ``(manager, customer)``,
        each None when absent or null (a 404 is "neither")."""
        path = "/api/v5/telephony/manager"
        query = {"phone": phone, "details": "1", "ignoreStatus": "1" if ignore_status else "0"}
        try:
            body = await self._request("GET", path, query=query, timeout_s=timeout_s)
        except errors.Permanent as exc:
            if exc.status == 404:
                return None, None
            raise
        found: list[dict[str, Any] | None] = []
        for key in ("manager", "customer"):
            value = body.get(key)
            if value is not None and not isinstance(value, dict):
                raise self._unexpected("GET", path, key)
            found.append(value)
        return found[0], found[1]

    async def users(
        self,
        *,
        active_only: bool = True,
        managers_only: bool = False,
        timeout_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Return every user matching the filters, walking all pages (one gated request each)."""
        path = "/api/v5/users"
        result: list[dict[str, Any]] = []
        page = 1
        while True:
            query = {"limit": str(USERS_PAGE_LIMIT), "page": str(page)}
            if active_only:
                query["filter[active]"] = "1"
            if managers_only:
                query["filter[isManager]"] = "1"
            body = await self._request("GET", path, query=query, timeout_s=timeout_s)
            users = self._expect(body, "users", list, "GET", path)
            result.extend(users)
            pagination = body.get("pagination")
            total_pages = pagination.get("totalPageCount") if isinstance(pagination, dict) else None
            # Stop on the last page, and on an empty one: a server that keeps announcing more
            # pages without giving users must not keep us looping.
            if not users or not isinstance(total_pages, int) or page >= total_pages:
                return result
            page += 1

    async def set_user_status(
        self, user_id: int, status: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Set a user's status (``free``/``busy``/``dinner``/``break``, else ``ValueError``)."""
        if status not in USER_STATUSES:
            raise ValueError(f"status must be one of {sorted(USER_STATUSES)}, got {status!r}")
        if isinstance(user_id, bool) or not isinstance(user_id, int) or user_id <= 0:
            raise ValueError(f"user_id must be a positive int, got {user_id!r}")
        return await self._request(
            "POST", f"/api/v5/users/{user_id}/status", form={"status": status},
            timeout_s=timeout_s,
        )

    # -- one round trip -------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        form: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and return its JSON body, or raise the error class it deserves."""
        headers = {"X-API-KEY": self._api_key, "Accept": "application/json"}
        data: bytes | None = None
        logged: dict[str, Any] = dict(query) if query else {}
        if form is not None:
            # Encode before the gate: a value json cannot encode is our bug, not a CRM call.
            fields = {k: v if isinstance(v, str) else encode_json_field(v) for k, v in form.items()}
            data = form_body(fields)
            headers["Content-Type"] = _FORM_CONTENT_TYPE
            # The objects just encoded, not decoded back from the form: whoever keeps the
            # exchange past this call copies it (masking does, as it records it).
            logged = dict(form)
        if self._gate is not None:
            await self._gate(path)
        total_s = self._timeout_s if timeout_s is None else timeout_s
        # time.monotonic() is the loop's clock; asking asyncio for the loop costs a getpid()
        # system call on Python 3.11, per request.
        started = time.monotonic()
        try:
            async with self._session.request(
                method,
                self._base + path,
                params=query,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=total_s),
                allow_redirects=False,
            ) as resp:
                raw = await self._read(resp)
                status = resp.status
                content_type = resp.content_type
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                location = resp.headers.get("Location")
        except TimeoutError:
            self._report(method, path, logged, None, None, time.monotonic() - started)
            raise errors.Retryable(
                f"RetailCRM {method} {path} at {self._origin} timed out after {total_s:g} s",
                error_id="timeout",
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            self._report(method, path, logged, None, None, time.monotonic() - started)
            raise self._connection_error(method, path, exc) from None
        duration_s = time.monotonic() - started
        if raw is None:
            self._report(method, path, logged, status, f"(an answer larger than "
                         f"{self._max_response_bytes} bytes: not kept)", duration_s)
            raise errors.Retryable(
                f"RetailCRM {method} {path}: the answer from {self._origin} is larger than "
                f"{self._max_response_bytes} bytes (HTTP {status}); it was not read",
                error_id="response_too_large", status=status,
            )

        body: Any = _NOT_JSON
        rejected: strictjson.Rejected | None = None
        if raw:
            try:
                body = strictjson.loads(raw, max_depth=MAX_REPLY_DEPTH, check_text=False)
            except strictjson.Rejected as exc:
                rejected = None if exc.error_id == "invalid_json" else exc
        if isinstance(body, _NotJson):
            excerpt = self._scrub(raw[:EXCERPT_CHARS * 4].decode("utf-8", "replace"))
            self._report(method, path, logged, status, excerpt[:EXCERPT_CHARS], duration_s)
            if rejected is not None:
                raise self._malformed_error(method, path, status, rejected, retry_after)
            raise self._not_json_error(method, path, status, content_type, retry_after, location)
        if any(secret in raw for secret in self._hidden_bytes):
            body = self._scrub(body)
        self._report(method, path, logged, status, body, duration_s)
        if not isinstance(body, dict):
            raise self._not_json_error(method, path, status, content_type, retry_after, location)
        return self._check(method, path, status, body, retry_after)

    def _check(
        self, method: str, path: str, status: int, body: dict[str, Any],
        retry_after: float | None,
    ) -> dict[str, Any]:
        """Return a successful JSON body, or raise what a failed one means (docs/retailcrm.md)."""
        what = f"RetailCRM {method} {path}"
        error_msg = body.get("errorMsg")
        msg = error_msg.strip() if isinstance(error_msg, str) else ""
        said = f": {msg}" if msg else ""
        if status == 403 or msg == _WRONG_KEY_MSG or _NO_ACCOUNT_MSG in msg:
            raise self._scrubbed(errors.AuthFailed(
                f"{what}: {self._origin} rejected the API key (HTTP {status}){said}",
                error_id="auth_failed", status=status,
            ))
        if status in _RATE_LIMITED_STATUSES:
            raise self._scrubbed(errors.Retryable(
                f"{what} was rate limited (HTTP {status}){said}",
                rate_limited=True, retry_after=retry_after, error_id="rate_limited",
                status=status,
            ))
        if status >= 500:
            raise self._scrubbed(errors.Retryable(
                f"{what} failed with a server error (HTTP {status}){said}",
                retry_after=retry_after, error_id=f"http_{status}", status=status,
            ))
        details = body.get("errors")
        if status == 402:
            raise self._scrubbed(errors.Permanent(
                f"{what} refused: payment required, the account is not paid for this "
                f"(HTTP 402){said}",
                error_id="payment_required", status=status, details=details,
            ))
        if status >= 300:
            raise self._scrubbed(errors.Permanent(
                f"{what} refused (HTTP {status}){said}"
                f"{_errors_suffix(details)}",
                error_id=f"http_{status}", status=status, details=details,
            ))
        if body.get("success") is False:
            raise self._scrubbed(errors.Permanent(
                f"{what} answered success=false (HTTP {status}){said}"
                f"{_errors_suffix(details)}",
                error_id="success_false", status=status, details=details,
            ))
        return body

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The answer's body, decompressed, or None once it passes ``max_response_bytes``
        (the rest is never read: the connection is closed, not reused)."""
        body = bytearray()
        async for chunk in resp.content.iter_chunked(READ_CHUNK_BYTES):
            body += chunk
            if len(body) > self._max_response_bytes:
                return None
        return bytes(body)

    def _connection_error(self, method: str, path: str, exc: BaseException
                          ) -> errors.DeliveryError:
        """A failed connection: retryable, unless the address was refused (not public)."""
        refused = egress.refusal(exc)
        if refused is not None:
            return errors.Permanent(
                f"RetailCRM {method} {path}: {self._origin} was not contacted: "
                f"{self._scrub(str(refused))}",
                error_id="target_refused",
            )
        reason = self._scrub(f"{type(exc).__name__}: {exc}")
        return errors.Retryable(
            f"RetailCRM {method} {path}: connection to {self._origin} failed ({reason})",
            error_id="connection",
        )

    def _malformed_error(
        self, method: str, path: str, status: int, rejected: strictjson.Rejected,
        retry_after: float | None,
    ) -> errors.DeliveryError:
        """A JSON answer that cannot be decoded safely: sending again gets the same answer
        (``malformed``, dead letter) — unless the status itself says "try later"."""
        said = f"HTTP {status}; the JSON body {rejected.message}"
        if status in _RATE_LIMITED_STATUSES or status >= 500:
            return errors.Retryable(
                f"RetailCRM {method} {path}: server error at {self._origin} ({said})",
                rate_limited=status in _RATE_LIMITED_STATUSES, retry_after=retry_after,
                error_id="rate_limited" if status in _RATE_LIMITED_STATUSES
                else f"http_{status}", status=status,
            )
        return errors.Permanent(
            f"RetailCRM {method} {path}: the answer from {self._origin} cannot be decoded "
            f"({said})", error_id="malformed", status=status,
        )

    def _not_json_error(
        self, method: str, path: str, status: int, content_type: str,
        retry_after: float | None, location: str | None,
    ) -> errors.DeliveryError:
        """The error for a body that is not a RetailCRM JSON object (wrong domain, proxy page)."""
        answered = f"HTTP {status}, {content_type}"
        if status in _RATE_LIMITED_STATUSES:
            return errors.Retryable(
                f"RetailCRM {method} {path}: rate limited ({answered}, not a JSON body)",
                rate_limited=True, retry_after=retry_after, error_id="rate_limited",
                status=status,
            )
        if status >= 500:
            return errors.Retryable(
                f"RetailCRM {method} {path}: server error at {self._origin} "
                f"({answered}, not a JSON body)",
                retry_after=retry_after, error_id=f"http_{status}", status=status,
            )
        if status == 403:
            return errors.AuthFailed(
                f"RetailCRM {method} {path}: {self._origin} refused access ({answered}, "
                f"not a RetailCRM API answer: check the domain and the API key)",
                error_id="auth_failed", status=status,
            )
        hint = ""
        if 300 <= status < 400 and location:
            hint = f", redirecting to {self._scrub(location)[:200]}"
        return errors.Permanent(
            f"{self._origin} did not answer like a RetailCRM API endpoint ({answered}{hint}) "
            f"to {method} {path}: check the account domain",
            error_id="not_json", status=status,
        )

    # -- small pieces ---------------------------------------------------------------------

    def _expect(
        self, body: dict[str, Any], key: str, kind: type[Any], method: str, path: str
    ) -> Any:
        """``body[key]`` if it has the documented type, else a clear ``Permanent``."""
        value = body.get(key)
        if not isinstance(value, kind):
            raise self._unexpected(method, path, key)
        return value

    def _unexpected(self, method: str, path: str, key: str) -> errors.Permanent:
        return errors.Permanent(
            f"RetailCRM {method} {path}: the answer from {self._origin} has no valid {key!r}",
            error_id="unexpected_response",
        )

    def _report(
        self, method: str, path: str, request: dict[str, Any], status: int | None,
        response: Any, duration_s: float,
    ) -> None:
        if self._on_exchange is not None:
            self._on_exchange(Exchange(method, path, request, status, response, duration_s))

    def _scrub(self, value: Any) -> Any:
        """Replace every secret wherever a server echoed it back: in text, values and keys
        (the last line of defence)."""
        if isinstance(value, str):
            for secret in self._hidden:
                if secret in value:
                    value = value.replace(secret, _REDACTED)
            return value
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        return value

    def _scrubbed(self, error: errors.DeliveryError) -> errors.DeliveryError:
        """``error`` with the key scrubbed from its message and details (they quote the server)."""
        error.message = self._scrub(error.message)
        error.details = self._scrub(error.details)
        error.args = (error.message,)
        return error


def account_client(
    deps: AdapterDeps, config: RetailCrmConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S,
    gate: RequestGate | None = None, on_exchange: Callable[[Exchange], None] | None = None,
    hidden: Sequence[str] = (),
) -> RetailCrmClient:
    """A client for one enterprise's account as the process is configured: the shared
    session, the answer cap of ``deps.settings``, and every secret of ``config`` (plus
    ``hidden``) scrubbed from whatever the client reports — and from whatever the calling
    context logs from now on (``logconfig.hide``)."""
    cap = deps.settings.get("max_response_bytes") or DEFAULT_MAX_RESPONSE_BYTES
    logconfig.hide((*config.secrets(), *hidden))
    return RetailCrmClient(
        deps.http, config.domain, config.api_key, timeout_s=timeout_s, gate=gate,
        on_exchange=on_exchange, secrets=(*config.secrets(), *hidden),
        max_response_bytes=int(cap),
    )


def _segment(value: str) -> str:
    """A module code as one URL path segment; anything that could change the URL is refused."""
    if not _CODE_RE.fullmatch(value):
        raise ValueError(f"invalid module code {value!r}: use letters, digits, '-', '_', '.'")
    return value


def _errors_suffix(details: Any) -> str:
    """A short rendering of RetailCRM's ``errors`` for a message (the full value is details)."""
    if not details:
        return ""
    text = json.dumps(details, ensure_ascii=False)
    if len(text) > ERRORS_IN_MESSAGE_CHARS:
        text = text[:ERRORS_IN_MESSAGE_CHARS] + "…"
    return f"; errors: {text}"
