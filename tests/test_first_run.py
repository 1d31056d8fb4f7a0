"""`make run` and `make stop` as a newcomer uses them, in a copy of the checkout's set-up
files sharing this checkout's virtualenv: a throwaway PostgreSQL, then a daemon in
development mode that says, once ready, how to reach it; Ctrl-C stops the daemon, the
database keeps running until `make stop`."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from daemon.pgcluster import ThrowawayCluster
from tests.support.daemon import ROOT

SET_UP_FILES = ("Makefile", "setup.cfg", "pyproject.toml", "deploy/devenv.sh")


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "deploy").mkdir(parents=True)
    # The copy shares this checkout's virtualenv: its set-up files must look older than the
    # venv's stamp, or `make run` would reinstall into the shared venv from the copy's path.
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    for name in SET_UP_FILES:
        shutil.copy2(ROOT / name, root / name)
        os.utime(root / name, (stamp - 1, stamp - 1))
    (root / "daemon").symlink_to(ROOT / "daemon")  # python -m daemon.pgcluster (make stop)
    (root / ".venv").symlink_to(ROOT / ".venv")
    if os.geteuid() == 0:  # the cluster runs as postgres, which must reach its folder
        for folder in (tmp_path, root):
            folder.chmod(0o755)
    return root


async def _read_until(stream: asyncio.StreamReader, lines: list[str], pattern: str,
                      timeout: float) -> re.Match[str]:
    async def scan() -> re.Match[str]:
        while True:
            raw = await stream.readline()
            if not raw:
                raise AssertionError(f"no {pattern!r} before the end: {lines[-20:]}")
            lines.append(raw.decode(errors="replace").rstrip("\n"))
            if found := re.search(pattern, lines[-1]):
                return found

    return await asyncio.wait_for(scan(), timeout)


@pytest.mark.slow
async def test_make_run_says_how_to_reach_it_and_make_stop_stops_the_database(
    tmp_path: Path,
) -> None:
    root = _checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    env.update(CRM_BRIDGE_PORT="0", CRM_BRIDGE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    make = await asyncio.create_subprocess_exec(
        "make", "--no-print-directory", "run", cwd=root, env=env, start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert make.stdout is not None
    lines: list[str] = []
    cluster = ThrowawayCluster(root / ".pgdata")
    try:
        await _read_until(make.stdout, lines, r"keeps running after crm-bridge stops: "
                                              r"make stop stops it", 180)
        curl = await _read_until(make.stdout, lines,
                                 r"curl -H 'Authorization: Bearer (\S+)' (\S+)/stats", 60)
        token, url = curl.group(1), curl.group(2)
        assert any(f"curl {url}/health" in line for line in lines)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/health") as r:
                assert r.status == 200
            async with http.get(f"{url}/stats",
                                headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C in the terminal
        await asyncio.wait_for(make.wait(), 30)
        assert cluster.running(), "the database outlives the daemon"
        stop = await asyncio.create_subprocess_exec(
            "make", "--no-print-directory", "stop", cwd=root, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(stop.communicate(), 60)
        assert stop.returncode == 0, out.decode()
        assert "stopped the throwaway PostgreSQL" in out.decode()
        assert not cluster.running()
    finally:
        if make.returncode is None:
            os.killpg(make.pid, signal.SIGKILL)
            await make.wait()
        cluster.destroy()
