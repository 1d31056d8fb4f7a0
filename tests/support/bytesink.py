"""A TCP server on 127.0.0.1 that records every byte it receives: a stand-in for a service of
the platform's own network (PostgreSQL, Redis...) that no CRM request may ever reach."""

from __future__ import annotations

import asyncio

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"


class ByteSink:
    """``async with ByteSink() as sink``: listening on ``sink.port`` until the block ends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.received += await reader.read(65536)
        writer.write(ANSWER)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> ByteSink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
