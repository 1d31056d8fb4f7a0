"""The PBX simulator run standalone (``python -m daemon.pbx_simulator``), as the demo and a
dry run use it: it serves, learns its clients over ``POST /_clients``, and says a taken port
in one line."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import aiohttp

COMMAND = [sys.executable, "-m", "daemon.pbx_simulator"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_standalone_it_serves_and_learns_its_clients_over_http() -> None:
    port = _free_port()
    proc = subprocess.Popen([*COMMAND, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
        assert f"PBX simulator on http://127.0.0.1:{port}" in line
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/_clients", json={"s3cret-0367": "0367"}) as resp:
                assert await resp.json() == {"success": True, "count": 1}
            query = {"code": "150", "phone": "+375291112233"}
            async with http.get(f"{url}/api/makecallexternal",
                                params={**query, "clientId": "wrong"}) as resp:
                assert resp.status == 403
            async with http.get(f"{url}/api/makecallexternal",
                                params={**query, "clientId": "s3cret-0367"}) as resp:
                assert resp.status == 200
            async with http.get(f"{url}/_requests") as resp:
                seen = await resp.json()
        assert [(r["client_ok"], r["enterprise"]) for r in seen["requests"]] == [
            (False, None), (True, "0367")]
        assert "s3cret" not in str(seen)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_taken_port_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*COMMAND, "--port", str(port)], capture_output=True,
                                text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
