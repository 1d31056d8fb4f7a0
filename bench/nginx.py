"""A static RetailCRM upstream that is not Python: Debian's nginx answering from its config.

The drains that compare crm-bridge with a pgqueuer worker send their RetailCRM requests
here, so what is measured is the sender's CPU and not a simulated CRM's: nginx answers a
request in a few microseconds. It answers every ``POST`` with ``{"success":true}`` — what
the RetailCRM client needs of a ``call/event`` answer — and ``calls/upload`` with
``{"success":true,"processedCallsCount":1,"duplicateCalls":[]}``; request bodies are read
and discarded. One worker process, no access log, on 127.0.0.1 and a free port; the master
runs in the foreground as this process's child (``daemon off``) and stops on SIGQUIT.
``requests_served`` reads how many requests it has answered (nginx's ``stub_status``), so a
drain says how many requests each delivery cost, whoever sent them.

``make bench`` installs nginx when it is missing (``deploy/devenv.sh bench``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.harness import OUT_DIR
from daemon.pgcluster import free_port

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
SUCCESS = '{"success":true}'
UPLOADED = '{"success":true,"processedCallsCount":1,"duplicateCalls":[]}'
STATUS_PATH = "/_status"

CONFIG = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location = {status} {{ stub_status; }}
        location = /api/v5/telephony/calls/upload {{ return 200 '{uploaded}'; }}
        location / {{ return 200 '{success}'; }}
    }}
}}
"""


class NginxMissing(RuntimeError):
    """nginx is not installed (``make bench`` installs it)."""


@dataclass(frozen=True, slots=True)
class StaticUpstream:
    """A running nginx: its base URL and its master's pid (the workers are its children)."""

    url: str
    pid: int


def binary() -> str:
    """Path of the nginx binary; ``NginxMissing`` when there is none."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)
    if found is None:
        raise NginxMissing("nginx is not installed: run `make bench` (it installs it) or "
                           "apt-get install nginx")
    return found


def config(prefix: Path, port: int) -> str:
    """The nginx configuration of the static upstream (see the module docstring)."""
    # Workers of a root master default to `nobody`; they write nothing, but keep them
    # able to read the prefix whoever runs the bench.
    user = "user root;" if os.geteuid() == 0 else ""
    return CONFIG.format(prefix=prefix, port=port, user=user, success=SUCCESS,
                         uploaded=UPLOADED, status=STATUS_PATH)


def served(status_page: str) -> int:
    """The requests a ``stub_status`` page says nginx has taken, the one that read it
    included."""
    # "Active connections: 1 \nserver accepts handled requests\n 4 4 17 \nReading: ..."
    lines = [line.strip() for line in status_page.splitlines()]
    counts = lines[lines.index("server accepts handled requests") + 1].split()
    return int(counts[2])


async def requests_served(url: str) -> int:
    """How many requests the nginx at ``url`` has taken so far, this one included: between
    two readings, ``after - before - 1`` requests came from others."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
            http.get(url + STATUS_PATH) as resp:
        return served(await resp.text())


@asynccontextmanager
async def running(name: str = "nginx") -> AsyncIterator[StaticUpstream]:
    """nginx serving the static answers until the block ends (prefix ``.bench/<name>``)."""
    nginx = binary()
    prefix = (OUT_DIR / name).resolve()
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(config(prefix, port), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
        "-g", "daemon off;", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await _until_answering(url, proc)
        yield StaticUpstream(url, proc.pid)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _until_answering(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    timeout = aiohttp.ClientTimeout(total=1)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while True:
            if proc.returncode is not None:
                assert proc.stderr is not None
                err = (await proc.stderr.read()).decode(errors="replace")
                raise RuntimeError(f"nginx exited with {proc.returncode}: {err[-400:]}")
            try:
                async with http.post(f"{url}/api/v5/telephony/call/event", data="x") as resp:
                    if resp.status == 200 and await resp.text() == SUCCESS:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not answer on {url} within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)
