"""The demo's child processes: started, waited for, watched, and stopped — all of them.

Each child (:class:`Child`) runs in a session of its own, so a terminal's Ctrl-C reaches
the demo alone and the demo stops its children in order: the call generator first, then
crm-bridge (its deliveries in flight finish against simulators still up), then the
simulators. A child's output goes to its log file (``.demo/<name>.log``); a child that
fails to start or dies says so with the end of its log. :meth:`Stack.stop` sends SIGTERM,
waits, and kills what is left, so no process outlives the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

import aiohttp

READY_POLL_S: Final = 0.1
STOP_TIMEOUT_S: Final = 15.0
LOG_TAIL_LINES: Final = 12
TAIL_BYTES: Final = 16_384


class StackError(Exception):
    """A child could not be started, did not become ready, or died; the message says which
    and how (the end of its log)."""


@dataclass(slots=True)
class Child:
    """One child process: ``argv`` run with ``env``, its output in ``log``; ``stdin`` is
    written to it once and closed (how a secret reaches it without a command line)."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log: Path
    stdin: bytes | None = None
    proc: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        """Started and not exited."""
        return self.proc is not None and self.proc.returncode is None

    def tail(self) -> str:
        """The last lines of its log, indented, for an error message (only its end is read:
        the log grows over the runs of a demo)."""
        try:
            with self.log.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - TAIL_BYTES))
                lines = log.read().decode("utf-8", errors="replace").splitlines()
        except OSError:
            return "    (no log)"
        return "\n".join(f"    {line}" for line in lines[-LOG_TAIL_LINES:]) or "    (empty log)"


class Stack:
    """The children in the order they were started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], *,
                    stdin: bytes | None = None) -> Child:
        """Start a child in a session of its own; its output goes to ``<log_dir>/<name>.log``
        (appended: the runs of a demo follow each other)."""
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        child = Child(name, argv, env, self.log_dir / f"{name}.log", stdin)
        log = await asyncio.to_thread(_open_log, child.log)
        try:  # the child keeps a descriptor of its own
            child.proc = await asyncio.create_subprocess_exec(
                *argv, env=dict(env), stdout=log, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.children.append(child)
        if stdin is not None and child.proc.stdin is not None:
            child.proc.stdin.write(stdin)
            with contextlib.suppress(ConnectionError):
                await child.proc.stdin.drain()
            child.proc.stdin.close()
        return child

    async def wait_ready(self, child: Child, http: aiohttp.ClientSession, url: str,
                         timeout_s: float) -> None:
        """Poll ``url`` until it answers 200; ``StackError`` if the child exits first or
        ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if not child.alive():
                raise StackError(f"{child.name} stopped while starting (exit "
                                 f"{child.proc.returncode if child.proc else '?'}); the end "
                                 f"of {child.log}:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(READY_POLL_S)
        raise StackError(f"{child.name} was not ready within {timeout_s:g} s ({url}); the end "
                         f"of {child.log}:\n{child.tail()}")

    async def first_exit(self) -> Child:
        """Wait until any child exits; return it."""
        waits = {asyncio.ensure_future(c.proc.wait()): c for c in self.children if c.proc}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]

    async def stop(self, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every child, the last started first: SIGTERM, then SIGKILL after
        ``timeout_s``."""
        for child in reversed(self.children):
            await _stop(child, timeout_s)

    def kill(self) -> None:
        """SIGKILL every child still running, at once (a second Ctrl-C)."""
        for child in self.children:
            if child.alive() and child.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()


def _open_log(path: Path) -> BinaryIO:
    """A child's log for appending, readable by its owner alone: crm-bridge's development
    banner, which holds the service token, ends up there."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")


async def _stop(child: Child, timeout_s: float) -> None:
    proc = child.proc
    if proc is None or proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def check_port(host: str, port: int, option: str) -> None:
    """``StackError`` naming ``option`` when ``host:port`` cannot be listened on now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            what = ("is already in use" if exc.errno == errno.EADDRINUSE
                    else f"cannot be used ({exc.strerror or exc})")
            raise StackError(f"port {port} on {host} {what}: stop what holds it, or choose "
                             f"another with {option} (0: any free port; with make: make demo "
                             f"DEMO_ARGS='{option} 0')") from None

