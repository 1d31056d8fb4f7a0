"""Running crm-bridge in tests: in-process (a Runtime and its app on a free port) or as a
real ``python -m daemon run`` process that can be SIGTERMed or killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import runtime
from daemon.runtime import Runtime
from daemon.settings import Settings
from web.app import create_app
from web.server import Limits, Runner

ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class InProcess:
    rt: Runtime
    url: str
    app: web.Application


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[InProcess]:
    """The whole daemon in this event loop; stopped gracefully on exit."""
    async with runtime.build(settings) as rt:
        cut = rt.metrics.http_cut
        app = create_app(rt)
        runner = Runner(app, Limits.from_settings(settings),
                        on_cut=lambda reason: cut.labels(reason).inc())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        if rt.listener is not None:
            await asyncio.wait_for(rt.listener.caught_up.wait(), 10)
        try:
            yield InProcess(rt, f"http://127.0.0.1:{port}", app)
        finally:
            rt.supervisor.stop()
            await rt.supervisor.join(settings.shutdown_grace_s + 5)
            await runner.cleanup()
        assert rt.supervisor.failed is None, rt.supervisor.failed


@dataclass(slots=True)
class DaemonProcess:
    """A real daemon process; its stdout (JSON lines) is collected in ``lines``."""

    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    _reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"event": "raw", "text": raw.decode(errors="replace")})

    async def wait_for(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for line in self.lines:
                if line.get("event") == event:
                    return line
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event!r} in the daemon's output: {self.lines[-20:]}")

    async def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code


async def start_process(env: Mapping[str, str], *args: str, cwd: Path = ROOT,
                        wait_listening: bool = True) -> DaemonProcess:
    """``python -m daemon run`` with ``env`` (in ``cwd``); returns once it logged
    ``listening`` (or at once, without ``wait_listening``: a process that may die before it
    listens). Its stderr is read with its stdout (lines that are not JSON come as
    ``{"event": "raw", "text": ...}``)."""
    full_env = {**os.environ, "CRM_BRIDGE_PORT": "0", **env, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", *args, cwd=cwd, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    daemon = DaemonProcess(proc)
    daemon._reader = asyncio.create_task(daemon._read())
    if not wait_listening:
        return daemon
    listening = await daemon.wait_for("listening")
    daemon.url = listening["url"]
    return daemon
