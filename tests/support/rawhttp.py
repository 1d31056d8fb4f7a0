"""HTTP/1.1 by hand, over a blocking socket: requests no well-behaved client would send
(non-ASCII header bytes, bodies that lie about their encoding, NUL in a path), sent exactly
as written. Blocking on purpose: the hypothesis suite runs it from a worker thread while the
daemon runs in the test's event loop (``asyncio.to_thread``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class Answer:
    """A parsed response: the status, the headers (names lower-cased), the body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def build(method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]] = (),
          body: bytes = b"") -> bytes:
    """One request with ``Host``, ``Connection: close`` and a correct ``Content-Length``."""
    head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
            b"Content-Length: " + str(len(body)).encode()]
    head += [name + b": " + value for name, value in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def exchange(url: str, request: bytes, timeout_s: float = 10.0) -> Answer:
    """Send ``request`` to the server at ``url`` and read the answer until it closes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    return parse(bytes(received))


def parse(raw: bytes) -> Answer:
    """Parse one HTTP/1.x response (``Content-Length`` or chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)
