"""The process: the real `crm-bridge run` answers /health and stops cleanly on SIGTERM;
supervised tasks that die take the process down with a failure."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp
import pytest

from daemon import collector
from daemon.supervisor import Supervisor
from tests.conftest import TEST_SERVICE_TOKEN, settings_env
from tests.support.daemon import ROOT, start_process


@pytest.mark.slow
async def test_run_serves_health_and_exits_0_on_sigterm(database_url: str) -> None:
    daemon = await start_process(settings_env(database_url))
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/health") as r:
            assert r.status == 200
            body = await r.json()
        assert body["status"] == "ok"
        assert body["database"] == "ok"
        assert body["integration"] == "retailcrm"
        await daemon.signal(signal.SIGTERM)
        code = await daemon.stop()
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()
    assert code == 0
    events = [line.get("event") for line in daemon.lines]
    assert "signal_received" in events
    assert events[-1] == "stopped"
    registered = await _served(database_url)
    assert registered == ["retailcrm"]


async def _served(url: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        return [r[0] for r in await conn.fetch("SELECT integration_type FROM crm_integrations")]
    finally:
        await conn.close()


async def test_run_refuses_bad_settings_naming_the_variable(database_url: str) -> None:
    env = settings_env(database_url, CRM_BRIDGE_PORT="http")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "run", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"CRM_BRIDGE_PORT" in err


async def test_a_crashed_task_fails_the_supervisor() -> None:
    supervisor = Supervisor()

    async def crash() -> None:
        raise RuntimeError("boom")

    supervisor.spawn("crasher", crash())
    await asyncio.wait_for(supervisor.stopping.wait(), 2)
    assert supervisor.failed == "task crasher crashed: RuntimeError"


async def test_a_task_returning_early_fails_the_supervisor() -> None:
    supervisor = Supervisor()

    async def quits() -> None:
        return None

    supervisor.spawn("quitter", quits())
    await asyncio.wait_for(supervisor.stopping.wait(), 2)
    assert supervisor.failed == "task quitter exited unexpectedly"


async def test_a_graceful_stop_is_not_a_failure() -> None:
    supervisor = Supervisor()

    async def loop() -> None:
        await supervisor.stopping.wait()

    supervisor.spawn("loop", loop())
    supervisor.stop()
    assert await supervisor.join(2)
    assert supervisor.failed is None


@pytest.mark.slow
async def test_run_tunes_the_garbage_collector_for_a_server(database_url: str) -> None:
    daemon = await start_process(settings_env(database_url))
    try:
        headers = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}
        async with aiohttp.ClientSession() as http, \
                http.get(f"{daemon.url}/stats", headers=headers) as r:
            assert r.status == 200
            collected = (await r.json())["gc"]
        await daemon.signal(signal.SIGTERM)
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()
    assert collected["thresholds"][0] == collector.YOUNG_THRESHOLD
    assert len(collected["generations"]) == 3
