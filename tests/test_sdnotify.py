"""systemd's notification protocol: READY once serving, WATCHDOG heartbeats from the event
loop (a stalled loop misses them), STOPPING on the way out; nothing without NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.sdnotify import Notifier
from tests.conftest import TEST_SERVICE_TOKEN, settings_env
from tests.support.daemon import start_process
from tests.support.waiting import wait_until


class Receiver:
    """A bound datagram socket, as systemd's, read by a thread that stamps each message with
    the time it arrived (the test's own loop may be the one that is blocked)."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)
        self.sock.settimeout(0.1)
        self.name = name
        self.messages: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def having(self, line: str) -> list[float]:
        return [at for at, text in list(self.messages) if line in text.splitlines()]

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def abstract() -> Iterator[Receiver]:
    receiver = Receiver(f"@crm-bridge-test-{secrets.token_hex(6)}")
    yield receiver
    receiver.close()


def test_a_path_socket_and_an_abstract_one_both_receive(
    tmp_path: Path, abstract: Receiver,
) -> None:
    path = Receiver(str(tmp_path / "notify"))
    try:
        for receiver in (path, abstract):
            notifier = Notifier({"NOTIFY_SOCKET": receiver.name})
            assert notifier.enabled and notifier.send("READY=1", "STATUS=up")
            notifier.close()
        for receiver in (path, abstract):
            assert wait_for_thread(lambda r=receiver: r.having("READY=1"))
            assert receiver.messages[0][1] == "READY=1\nSTATUS=up"
    finally:
        path.close()


def wait_for_thread(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.send("READY=1") is False


def test_the_watchdog_is_for_this_process_only() -> None:
    mine = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_s == 30.0
    assert Notifier({**mine, "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "junk"}).watchdog_s is None


def test_a_socket_nobody_listens_on_is_a_dropped_message_not_an_error(
    tmp_path: Path,
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.send("WATCHDOG=1") is False
    notifier.close()


async def test_a_stalled_event_loop_misses_its_heartbeats(abstract: Receiver) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": abstract.name, "WATCHDOG_USEC": "100000"})
    stopping = asyncio.Event()
    task = asyncio.create_task(notifier.run(asyncio.sleep(0), stopping, lambda: "fine"))
    await wait_until(lambda: len(abstract.having("WATCHDOG=1")) >= 3)
    assert abstract.having("READY=1")[0] <= abstract.having("WATCHDOG=1")[0]
    stalled_at = time.monotonic()
    time.sleep(0.6)  # the loop is stuck: a bug, or no CPU
    resumed_at = time.monotonic()
    await wait_until(lambda: any(t > resumed_at for t in abstract.having("WATCHDOG=1")))
    beats = abstract.having("WATCHDOG=1")
    assert not [t for t in beats if stalled_at + 0.15 < t < resumed_at], \
        "no heartbeat while the loop was stalled"
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) >= 0.5, "systemd (WatchdogSec=0.1s) would have seen the silence"
    stopping.set()
    await asyncio.wait_for(task, 2)
    await wait_until(lambda: abstract.having("STOPPING=1"))


@pytest.mark.slow
async def test_the_daemon_tells_systemd_it_is_ready_alive_and_stopping(
    database_url: str, abstract: Receiver,
) -> None:
    env = settings_env(database_url, NOTIFY_SOCKET=abstract.name, WATCHDOG_USEC="400000")
    daemon = await start_process(env)
    try:
        await wait_until(lambda: abstract.having("READY=1"), timeout=30)
        ready = next(text for _at, text in abstract.messages if "READY=1" in text)
        assert "STATUS=retailcrm on http://127.0.0.1:" in ready
        assert "listener connected" in ready, "READY once the listener is connected"
        await wait_until(lambda: len(abstract.having("WATCHDOG=1")) >= 3, timeout=10)
        assert "systemd-notify" in await _tasks(daemon.url)
        await daemon.signal(signal.SIGTERM)
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()
    assert abstract.having("STOPPING=1")


async def _tasks(url: str) -> list[str]:
    headers = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
    async with aiohttp.ClientSession() as http, http.get(f"{url}/stats", headers=headers) as r:
        assert r.status == 200
        tasks: list[str] = (await r.json())["tasks"]
        return tasks


async def test_the_daemon_runs_no_notifier_without_notify_socket(database_url: str) -> None:
    daemon = await start_process({**settings_env(database_url), "NOTIFY_SOCKET": ""})
    try:
        tasks = await _tasks(daemon.url)
        assert "dispatcher" in tasks and "systemd-notify" not in tasks
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()
    assert not [line for line in daemon.lines if "systemd" in str(line.get("event"))]
