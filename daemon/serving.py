"""An aiohttp application served on a TCP port for the length of a block: the simulators'
and the tests' small servers (the daemon's own server is web/server.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application, host: str = "127.0.0.1", port: int = 0,
                  ) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0: any free port) until the block ends; yields its
    base URL (``http://host:port``). Requests still running at the end get a second."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()
