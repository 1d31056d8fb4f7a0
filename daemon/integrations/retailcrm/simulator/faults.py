"""Misbehaviour on demand: what the network and the servers in front of RetailCRM can do.

A :class:`Fault` applies to the API paths under a prefix (all of them by default), to one
API key's requests or to a random share of them, for a number of requests or until
cleared. It can add latency, stall a request until released, drop the connection, answer
with another status or body (JSON, text, an HTML page), or stream a huge answer, gzipped
if asked (a "gzip bomb"). :func:`pick` chooses the fault a request meets and :func:`apply`
carries it out; the account keeps the list (``Simulator.faults``).
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from .state import RATE_LIMIT_MSG, key_fingerprint

_HTML_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>Page not found</title></head>"
    "<body><h1>Page not found</h1><p>This is not the API you are looking for.</p></body></html>"
)
_PAD: Final = memoryview(b" " * 1_048_576)


@dataclass(slots=True)
class Fault:
    """An injected misbehaviour for API paths starting with ``path`` (None: every API path).

    ``latency_ms`` delays the answer; ``stall`` never answers until reset (or shutdown);
    ``outage`` closes the connection without an answer; ``status``/``body``/``html`` replace
    the answer (a ``body`` string is sent as text, other values as JSON; ``html`` sends an
    HTML page, with status 200 unless given); ``bloat_bytes`` answers a JSON-looking body
    that long, streamed (never held in memory), ``gzip`` compressing it on the way: a few
    hundred KiB on the wire inflating to the whole size (a "gzip bomb"). A latency-only
    fault leaves the normal answer.
    ``count`` is how many requests it still applies to (None: until cleared); ``hits`` how
    many it has taken. ``api_key`` limits it to one key's requests (shown only as its
    fingerprint); ``ratio`` to that random share of the matching requests (1: all).
    """

    path: str | None = None
    status: int | None = None
    body: Any = None
    html: bool = False
    latency_ms: float = 0.0
    stall: bool = False
    outage: bool = False
    count: int | None = None
    retry_after: float | None = None
    api_key: str | None = field(default=None, repr=False)
    ratio: float = 1.0
    bloat_bytes: int | None = None
    gzip: bool = False
    hits: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from the ``POST /_fault`` body; ``ValueError`` names a bad field."""
        unknown = set(data) - {f.name for f in fields(cls) if f.name != "hits"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        fault = cls(**data)
        fault.validate()
        return fault

    def validate(self) -> None:
        """``ValueError`` naming the first field that cannot work."""
        if self.path is not None and not isinstance(self.path, str):
            raise ValueError("path must be a string or null")
        if self.status is not None and (
            not isinstance(self.status, int) or not 100 <= self.status <= 599
        ):
            raise ValueError("status must be an HTTP status code")
        if not isinstance(self.latency_ms, int | float) or self.latency_ms < 0:
            raise ValueError("latency_ms must be a non-negative number")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError("count must be a positive integer or null")
        if self.retry_after is not None and not isinstance(self.retry_after, int | float):
            raise ValueError("retry_after must be a number of seconds")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or null")
        if not isinstance(self.ratio, int | float) or not 0 < self.ratio <= 1:
            raise ValueError("ratio must be a number in (0, 1]")
        if self.bloat_bytes is not None and (
            not isinstance(self.bloat_bytes, int) or self.bloat_bytes < 1
        ):
            raise ValueError("bloat_bytes must be a positive integer or null")
        if not isinstance(self.gzip, bool) or (self.gzip and self.bloat_bytes is None):
            raise ValueError("gzip must be a boolean, and needs bloat_bytes")

    def matches(self, path: str, key: str | None = None) -> bool:
        """Whether this fault applies to a request for ``path`` sent with ``key``."""
        return (self.path is None or path.startswith(self.path)) and (
            self.api_key is None or key == self.api_key)

    def kind(self) -> str:
        """A short name of what the fault does, as recorded with each request it met."""
        if self.stall:
            return "stall"
        if self.outage:
            return "outage"
        if self.html:
            return "html"
        if self.bloat_bytes is not None:
            return "bloat"
        if self.status is not None:
            return f"status_{self.status}"
        return "latency" if self.latency_ms else "body"

    def replaces_answer(self) -> bool:
        """Whether the normal answer is replaced (else the fault only adds latency)."""
        return (
            self.stall or self.outage or self.html or self.status is not None
            or self.body is not None or self.bloat_bytes is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The fault as ``GET /_state`` shows it (a key as its fingerprint)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.api_key is not None:
            shown["api_key"] = key_fingerprint(self.api_key)
        return shown


class Dropped(Exception):
    """The connection was closed on purpose (outage, released stall): nothing to answer."""


def pick(faults: list[Fault], path: str, key: str | None, rng: random.Random) -> Fault | None:
    """The first fault that matches a request and whose share comes up this time; it is
    counted (``hits``, ``count``) and leaves ``faults`` once its count is used up."""
    fault = next((f for f in faults if f.matches(path, key)
                  and (f.ratio >= 1 or rng.random() < f.ratio)), None)
    if fault is None:
        return None
    fault.hits += 1
    if fault.count is not None:
        fault.count -= 1
        if fault.count == 0:
            faults.remove(fault)
    return fault


async def apply(fault: Fault, request: web.Request, released: Callable[[], asyncio.Event]
                ) -> web.StreamResponse | None:
    """Carry ``fault`` out on ``request``: the answer that replaces the normal one, or None
    (latency only). A stall waits until the event ``released()`` gives when it stalls is
    set; a dropped connection raises :class:`Dropped`."""
    if fault.latency_ms:
        await asyncio.sleep(fault.latency_ms / 1000)
    if fault.stall:
        await released().wait()
        _drop(request)
    if fault.outage:
        _drop(request)
    if not fault.replaces_answer():
        return None
    headers = None
    if fault.retry_after is not None:
        headers = {"Retry-After": f"{fault.retry_after:g}"}
    if fault.bloat_bytes is not None:
        return await _bloated(request, fault.status or 200, fault.bloat_bytes, fault.gzip)
    if fault.html:
        text = fault.body if isinstance(fault.body, str) else _HTML_PAGE
        return web.Response(
            status=fault.status or 200, text=text, content_type="text/html", headers=headers
        )
    status = fault.status or 200
    if isinstance(fault.body, str):
        return web.Response(status=status, text=fault.body, headers=headers)
    body = fault.body
    if body is None:
        body = {"success": True} if status < 300 else {
            "success": False,
            "errorMsg": RATE_LIMIT_MSG if status in (429, 503) else _phrase(status),
        }
    return web.json_response(body, status=status, headers=headers)


def _drop(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()
    raise Dropped


async def _bloated(request: web.Request, status: int, size: int, gzip: bool
                   ) -> web.StreamResponse:
    """``size`` bytes of an unfinished JSON object, streamed; gzip-compressed on the way when
    ``gzip``. A reader that stops early just closes the connection: the writing stops."""
    response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    if gzip:
        response.headers["Content-Encoding"] = "gzip"
    else:
        response.content_length = size
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
    head = b'{"success": true, "pad": "'
    try:
        await response.prepare(request)
        sent = 0
        while sent < size:
            chunk = (memoryview(head) if sent == 0 else _PAD)[:size - sent]
            sent += len(chunk)
            data = compressor.compress(chunk) if compressor is not None else chunk
            if data:
                await response.write(data)
            else:
                await asyncio.sleep(0)  # deflate holds its output back: let the reader run
        if compressor is not None:
            await response.write(compressor.flush())
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the reader had enough
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"

