"""systemd's notification protocol, for ``Type=notify`` and ``WatchdogSec=`` units.

systemd names a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written with a leading ``@``); the service sends it newline-separated ``NAME=value`` lines:
``READY=1`` once it serves, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` (or systemd
kills and restarts it), ``STATUS=…`` for ``systemctl status``, ``STOPPING=1`` on its way
out. Without ``$NOTIFY_SOCKET`` (not under systemd) nothing is sent and nothing runs.

The heartbeat is sent by a task of the event loop itself, so a loop that stalls — blocked
by a bug, starved of CPU — misses it, and systemd restarts the process. A datagram that
cannot be sent at once is dropped (the socket is non-blocking: the loop never waits on
systemd), and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

STATUS_INTERVAL_S = 30.0  # how often STATUS= is refreshed when no watchdog asks for more


def _address(raw: str) -> str | None:
    if not raw or raw[0] not in "/@":
        return None  # unset, or a vsock address this daemon never runs under
    return "\0" + raw[1:] if raw[0] == "@" else raw


def _watchdog_s(environ: Mapping[str, str]) -> float | None:
    """``$WATCHDOG_USEC`` in seconds when the watchdog is meant for this process."""
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


class Notifier:
    """Sends notifications to systemd (see the module docstring)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_s(env) if self.address else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True under systemd with a notification socket."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False when not under systemd or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd_notify_failed", error=type(exc).__name__)
            self._failed = True
            return False
        if self._failed:
            log.info("systemd_notify_recovered")
            self._failed = False
        return True

    def close(self) -> None:
        """Close the socket (reopened by the next ``send``)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def run(self, ready: Awaitable[object], stopping: asyncio.Event,
                  status: Callable[[], str]) -> None:
        """READY=1 once ``ready`` is done, then WATCHDOG=1 every half ``$WATCHDOG_USEC``
        with a fresh STATUS=, until ``stopping``: then STOPPING=1."""
        try:
            waiting = asyncio.ensure_future(ready)
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
            for future in (waiting, stop):
                future.cancel()
            if not stopping.is_set():
                self.send("READY=1", f"STATUS={status()}")
            period = self.watchdog_s / 2 if self.watchdog_s else STATUS_INTERVAL_S
            while not stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), period)
                if not stopping.is_set():
                    beat = ("WATCHDOG=1",) if self.watchdog_s else ()
                    self.send(*beat, f"STATUS={status()}")
            self.send("STOPPING=1", "STATUS=stopping: finishing the deliveries in flight")
        finally:
            self.close()
