"""What a request may carry, checked in one place: its head before any handler, its JSON body
through one parser.

:func:`refuse_malformed` (a middleware) answers 400 before routing reaches a handler — and
before authentication — for a NUL or a lone surrogate in the path or the query
(``invalid_path``, ``invalid_query``), a credential header that is not printable ASCII
(``invalid_header``), and 415 for a ``Content-Encoding`` the server cannot decode
(``unsupported_encoding``).

:func:`read_json` is the one JSON body parser of every route that takes JSON: the body as
its ``Content-Encoding`` says (a bad gzip body is ``invalid_encoding``), at most the app's
``client_max_size`` (413), then :mod:`daemon.strictjson` — ``invalid_json``, ``invalid_number``
(``NaN``, ``Infinity``, ``1e999``), ``too_deep``, ``invalid_text`` (``\\u0000``, a lone
surrogate; ``details.field`` names where). Nothing is stored when any of these is refused.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from daemon import strictjson
from web.middlewares import Handler, HttpError

MAX_DEPTH: Final = 32
# What aiohttp's server decodes itself (br and zstd only with optional packages installed).
ENCODINGS: Final = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
CREDENTIAL_HEADERS: Final = ("Authorization", "X-Service-Token")


@web.middleware
async def refuse_malformed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """400/415 for a request head no handler should see (see the module docstring)."""
    if not _clean(request.path):
        raise HttpError(400, "invalid_path",
                        "the path holds a NUL character or is not Unicode text",
                        {"field": "path"})
    if not _clean(request.query_string) or not all(
            _clean(k) and _clean(v) for k, v in request.query.items()):
        raise HttpError(400, "invalid_query",
                        "the query holds a NUL character or is not Unicode text",
                        {"field": "query"})
    for name in CREDENTIAL_HEADERS:
        value = request.headers.get(name)
        if value is not None and not (value.isascii() and value.isprintable()):
            raise HttpError(400, "invalid_header", f"{name}: must be printable ASCII",
                            {"field": name})
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ENCODINGS:
        raise HttpError(415, "unsupported_encoding",
                        "Content-Encoding: expected gzip, deflate or none",
                        {"field": "Content-Encoding"})
    return await handler(request)


def _clean(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, or bytes that were not UTF-8
        return False
    return True


async def read_body(request: web.Request) -> bytes:
    """The body, decoded as its ``Content-Encoding`` says; ``invalid_encoding`` when it
    cannot be, 413 past ``client_max_size``."""
    try:
        return await request.read()
    except (web.RequestPayloadError, HttpProcessingError):
        raise HttpError(400, "invalid_encoding",
                        "body: cannot be decoded as its Content-Encoding says",
                        {"field": "body"}) from None


async def read_json(request: web.Request, *, max_depth: int = MAX_DEPTH) -> Any:
    """The body as JSON, strictly (see the module docstring); 400 naming the culprit."""
    return decode_json(await read_body(request), max_depth=max_depth)


def decode_json(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` as JSON, strictly (see the module docstring); 400 naming the culprit."""
    try:
        return strictjson.loads(raw, max_depth=max_depth)
    except strictjson.Rejected as exc:
        field = exc.pointer.lstrip("/").replace("/", ".") or "body"
        raise HttpError(400, exc.error_id, f"{field}: {exc.message}", {"field": field}) from None
