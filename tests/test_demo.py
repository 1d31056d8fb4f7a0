"""`make demo` for real: ``python -m daemon.demo`` as a process on free ports, its calls
delivered at both simulated RetailCRM accounts (one enterprise through the SQL insert, one
through POST /api/events), its admin links opening the pages, a click placing a call at the
PBX simulator — and after SIGINT, not one of its child processes left."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.support.daemon import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STARTED_S = 150.0  # imports, migrations and four processes on a loaded 2-core machine
DELIVERED_S = 90.0


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory that looks like a crm-bridge checkout: dev mode keeps its secrets here."""
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = crm-bridge\n")
    return tmp_path


def bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


class Demo:
    """The demo process and what it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [asyncio.create_task(self._read(proc.stdout, self.out)),
                        asyncio.create_task(self._read(proc.stderr, self.err))]

    @staticmethod
    async def _read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for raw in stream:
            into.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.out)

    async def printed(self, needle: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while needle not in self.text:
            assert self.proc.returncode is None, "\n".join(self.out + self.err)
            assert loop.time() < deadline, f"no {needle!r} in:\n" + "\n".join(
                self.out + self.err)
            await asyncio.sleep(0.1)

    def found(self, pattern: str) -> list[str]:
        return re.findall(pattern, self.text, flags=re.MULTILINE)


@pytest_asyncio.fixture
async def demo(checkout: Path, database_url: str) -> AsyncIterator[Demo]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.demo", "--port", "0", "--crm-port", "0",
        "--pbx-port", "0", "--calls-per-minute", "150", "--seed", "7",
        cwd=checkout, env=bare_env(CRM_BRIDGE_DATABASE_URL=database_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    running = Demo(proc)
    try:
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*running.readers, return_exceptions=True)


def children_of(pid: int) -> dict[int, str]:
    """The live processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def state(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(f"{url}/_state") as resp:
        assert resp.status == 200
        return await resp.json()


async def delivered(http: aiohttp.ClientSession, url: str, timeout: float) -> Any:
    """The account's state once it holds an incoming call's card and an uploaded call."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        seen = await state(http, url)
        if (any(e["type"] == "in" for e in seen["call_events"])
                and seen["uploaded_calls"]):
            return seen
        assert loop.time() < deadline, f"nothing delivered to {url} within {timeout} s"
        await asyncio.sleep(0.5)


async def test_make_demo_runs_everything_and_stops_every_child(
    demo: Demo, checkout: Path
) -> None:
    await demo.printed("Stop: Ctrl-C.", STARTED_S)
    children = children_of(demo.proc.pid)
    assert len(children) == 4, children  # two RetailCRM accounts, the PBX, crm-bridge
    assert sum("daemon.integrations.retailcrm.simulator" in c for c in children.values()) == 2
    assert any("daemon.pbx_simulator" in c for c in children.values())
    assert any("daemon run" in c for c in children.values())

    [bridge] = demo.found(r"^crm-bridge\s+(http://\S+)")
    [pbx] = demo.found(r"^PBX simulator\s+(http://\S+)")
    accounts = demo.found(r"RetailCRM \(sim\)\s+(http://\S+)")
    links = demo.found(r"admin pages\s+(http://\S+)")
    assert len(accounts) == 2 and len(links) == 2
    assert f"curl -s '{accounts[0]}/_requests?limit=5' | python3 -m json.tool" in demo.text

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        for account, numbers in zip(accounts, ({"150", "151", "152", "153"},
                                               {"201", "202", "203"}), strict=True):
            seen = await delivered(http, account, DELIVERED_S)
            module = seen["module"]
            assert module["active"] is True and module["baseUrl"] == f"{bridge}/retailcrm"
            codes = module["integrations"]["telephony"]["additionalCodes"]
            assert {c["code"] for c in codes} <= numbers
            card = next(e for e in seen["call_events"] if e["type"] == "in")
            assert set(card["codes"]) <= numbers and card["userIds"]
            client_id = module["clientId"]
            assert client_id not in demo.text and client_id not in "\n".join(demo.err)

        for link, number in zip(links, ("0367", "0400"), strict=True):
            jar = aiohttp.CookieJar(unsafe=True)
            async with aiohttp.ClientSession(cookie_jar=jar) as browser, \
                    browser.get(link) as page:
                assert page.status == 200, await page.text()
                assert f"/{number}/" in str(page.url) and "token=" not in str(page.url)

        # A click as RetailCRM makes it: the simulator calls crm-bridge's make-call URL,
        # crm-bridge asks the PBX to ring manager 1's extension.
        async with http.post(f"{accounts[0]}/_click",
                             json={"userId": 1, "phone": "+375291112233"}) as resp:
            clicked = await resp.json()
        assert clicked["success"] is True and clicked["status"] == 200, clicked
        async with http.get(f"{pbx}/_requests") as resp:
            placed = (await resp.json())["requests"]
        assert [(r["path"], r["query"]["code"], r["client_ok"]) for r in placed] == [
            ("/api/makecallexternal", "150", True)]

    demo.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(demo.proc.wait(), 60) == 0, "\n".join(demo.err)
    await asyncio.gather(*demo.readers)
    assert "stopped crm-bridge and the simulators" in demo.text
    left = [pid for pid in children if not gone(pid)]
    assert not left, {pid: children[pid] for pid in left}
    logs = sorted(p.name for p in (checkout / ".demo").iterdir())
    assert logs == ["crm-bridge.log", "pbx.log", "retailcrm-0367.log", "retailcrm-0400.log"]
    assert all((checkout / ".demo" / name).stat().st_mode & 0o077 == 0 for name in logs)


def test_a_taken_port_is_one_line_naming_the_option(checkout: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "daemon.demo", "--port", "0", "--crm-port", "0",
             "--pbx-port", str(port)],
            cwd=checkout, env=bare_env(CRM_BRIDGE_DATABASE_URL="postgresql://u@127.0.0.1:9/x"),
            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"port {port}" in result.stderr and "--pbx-port" in result.stderr


def test_an_unreachable_database_is_one_line(checkout: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.demo", "--port", "0", "--crm-port", "0",
         "--pbx-port", "0"],
        cwd=checkout, env=bare_env(CRM_BRIDGE_DATABASE_URL="postgresql://u@127.0.0.1:9/x"),
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot use the database at postgresql://u@127.0.0.1:9/x" in result.stderr


async def test_a_child_that_dies_stops_the_demo_saying_which_and_leaves_nothing(
    demo: Demo,
) -> None:
    await demo.printed("Stop: Ctrl-C.", STARTED_S)
    children = children_of(demo.proc.pid)
    [bridge] = [pid for pid, cmd in children.items() if "daemon run" in cmd]
    os.kill(bridge, signal.SIGKILL)
    assert await asyncio.wait_for(demo.proc.wait(), 60) == 1
    await asyncio.gather(*demo.readers)
    said = "\n".join(demo.err)
    assert "demo: crm-bridge stopped unexpectedly (exit -9); the end of" in said, said
    assert "crm-bridge.log" in said
    left = [pid for pid in children if not gone(pid)]
    assert not left, {pid: children[pid] for pid in left}
