"""deploy/nginx/crm-bridge.conf, checked by nginx itself: `nginx -t` accepts the file as
shipped inside Debian's http block, and a real nginx on loopback in front of a running
daemon passes the public routes, refuses the internal ones to an outside address, and
keeps query strings (where the secrets travel) out of its access log."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemon.settings import Settings
from tests.conftest import TEST_SERVICE_TOKEN
from tests.support.daemon import running
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy/nginx/crm-bridge.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
DEBIAN_MAIN = Path("/etc/nginx/nginx.conf")
SECRET_CLIENT_ID = "clientid-5ecret-0123456789abcdef"
SECRET_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJlbnRlcnByaXNlIjoiMDM2NyJ9.c2lnbmF0dXJlLXNlY3JldA"

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx not found: `deploy/devenv.sh system` "
                       "installs Debian's nginx package"),
    pytest.mark.skipif(os.geteuid() != 0, reason="nginx -t opens the shipped log paths under "
                       "/var/log/nginx, writable by root only"),
]


def _certificate(folder: Path) -> None:
    """A self-signed certificate where the shipped configuration looks for one."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crm-bridge.example.by")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    tls = folder / "crm-bridge/tls"
    tls.mkdir(parents=True)
    (tls / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tls / "privkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _main_conf(folder: Path, site: Path, *, debian: bool) -> Path:
    """nginx.conf in ``folder`` whose http block includes ``site``: Debian's own main file
    with its includes of conf.d/ and sites-enabled/ pointed at ``site``, or a bare one."""
    if debian:
        lines = []
        for line in DEBIAN_MAIN.read_text().splitlines():
            if "include /etc/nginx/conf.d/" in line:
                line = f"\tinclude {site};"
            elif "include /etc/nginx/sites-enabled/" in line:
                continue
            lines.append(line)
        text = "\n".join(lines) + "\n"
        assert f"include {site};" in text, "Debian's nginx.conf includes conf.d/ in http {}"
    else:
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(f"    {kind}_temp_path {folder}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        text = (f"{user}pid {folder}/nginx.pid;\nworker_processes 1;\nevents {{}}\n"
                f"http {{\n{temp}    include {site};\n}}\n")
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


def _nginx(folder: Path, conf: Path, *args: str) -> list[str]:
    assert NGINX is not None
    return [NGINX, "-p", f"{folder}/", "-c", str(conf), "-e", str(folder / "error.log"), *args]


def test_nginx_t_accepts_the_file_as_shipped(tmp_path: Path) -> None:
    _certificate(tmp_path)
    conf = _main_conf(tmp_path, SHIPPED, debian=DEBIAN_MAIN.is_file())
    result = subprocess.run(_nginx(tmp_path, conf, "-t"), capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr
    assert "[warn]" not in result.stderr, result.stderr


def test_nginx_t_fails_without_the_certificate(tmp_path: Path) -> None:
    """The check above is real: no certificate at the configured path, no pass."""
    conf = _main_conf(tmp_path, SHIPPED, debian=False)
    result = subprocess.run(_nginx(tmp_path, conf, "-t"), capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode != 0
    assert "crm-bridge/tls/fullchain.pem" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"the shipped file no longer has {old!r}"
    return text.replace(old, new)


@dataclass(slots=True)
class Proxy:
    url: str
    access_log: Path


@contextlib.asynccontextmanager
async def _nginx_in_front_of(folder: Path, upstream: str) -> AsyncIterator[Proxy]:
    """A real nginx running the shipped file with only its addresses and log folder changed
    to the test's, passing to ``upstream`` (host:port)."""
    _certificate(folder)
    https, http = _free_port(), _free_port()
    site = SHIPPED.read_text()
    site = _replace(site, "server 127.0.0.1:8019;", f"server {upstream};")
    site = _replace(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;")
    site = _replace(site, "listen 80;", f"listen 127.0.0.1:{http};")
    site = _replace(site, "/var/log/nginx/", f"{folder}/")
    (folder / "crm-bridge.conf").write_text(site)
    conf = _main_conf(folder, folder / "crm-bridge.conf", debian=False)
    nginx = await asyncio.create_subprocess_exec(
        *_nginx(folder, conf, "-g", "daemon off;"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: _accepts(https) or nginx.returncode is not None)
        assert nginx.returncode is None, (folder / "error.log").read_text()
        yield Proxy(f"https://127.0.0.1:{https}", folder / "crm-bridge.access.log")
    finally:
        nginx.terminate()
        await asyncio.wait_for(nginx.wait(), 15)


@pytest_asyncio.fixture
async def proxy(tmp_path: Path, make_settings: Callable[..., Settings]) -> AsyncIterator[Proxy]:
    """The daemon, and a real nginx in front of it."""
    async with running(make_settings()) as daemon, \
            _nginx_in_front_of(tmp_path, daemon.url[7:]) as front:
        yield front


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _client(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=False, local_addr=(source, 0)),
        timeout=aiohttp.ClientTimeout(total=10))


AUTH = {"Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}


async def test_public_routes_pass_and_internal_ones_answer_the_internal_network_only(
    proxy: Proxy,
) -> None:
    async with _client("127.0.0.1") as inside, _client("127.0.0.2") as outside:
        for client in (inside, outside):
            async with client.get(f"{proxy.url}/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            async with client.get(f"{proxy.url}/retailcrm/logo.svg") as r:
                assert r.status == 200 and r.content_type == "image/svg+xml"
            async with client.get(f"{proxy.url}/retailcrm-admin/") as r:
                # crm-bridge's own answer (no session: 401 and its security headers).
                assert r.status == 401 and "Content-Security-Policy" in r.headers
            async with client.get(f"{proxy.url}/") as r:
                assert r.status == 404 and r.content_type == "text/html", "nginx's own"
        for path in ("/stats", "/metrics", "/api/config-cache/active-enterprises"):
            async with inside.get(f"{proxy.url}{path}", headers=AUTH) as r:
                assert r.status == 200, path
            async with outside.get(f"{proxy.url}{path}", headers=AUTH) as r:
                assert r.status == 403 and r.content_type == "text/html", path
        async with outside.post(f"{proxy.url}/api/events", headers=AUTH, json={}) as r:
            assert r.status == 403


async def test_no_query_string_reaches_the_access_log(proxy: Proxy) -> None:
    async with _client("127.0.0.2") as outside:
        async with outside.post(f"{proxy.url}/retailcrm/actions/activity"
                                f"?clientId={SECRET_CLIENT_ID}&activity=true") as r:
            assert r.status == 403, "an unknown clientId, refused by crm-bridge"
        async with outside.get(f"{proxy.url}/retailcrm-admin/?token={SECRET_TOKEN}") as r:
            assert r.status == 401, "a link that is not one, refused by crm-bridge"
        async with outside.get(f"{proxy.url}/api/events?token={SECRET_TOKEN}") as r:
            assert r.status == 403
    await wait_until(lambda: proxy.access_log.exists()
                     and proxy.access_log.read_text().count("\n") >= 3)
    log = proxy.access_log.read_text()
    assert '"POST /retailcrm/actions/activity HTTP/1.1" 403' in log
    assert '"GET /retailcrm-admin/ HTTP/1.1" 401' in log
    for secret in (SECRET_CLIENT_ID, SECRET_TOKEN, "clientId=", "token="):
        assert secret not in log


async def test_no_query_string_reaches_any_log_when_crm_bridge_does_not_answer(
    tmp_path: Path,
) -> None:
    """nginx's error log writes the whole request line of a request its upstream failed:
    the shipped file keeps it to crit, and the access log says what happened instead."""
    down = f"127.0.0.1:{_free_port()}"  # nothing listens there
    async with _nginx_in_front_of(tmp_path, down) as front, _client("127.0.0.2") as outside:
        async with outside.post(f"{front.url}/retailcrm/actions/activity"
                                f"?clientId={SECRET_CLIENT_ID}&activity=true") as r:
            assert r.status == 502
        async with outside.get(f"{front.url}/retailcrm-admin/?token={SECRET_TOKEN}") as r:
            assert r.status == 502
        await wait_until(lambda: front.access_log.exists()
                         and front.access_log.read_text().count("\n") >= 2)
    access = front.access_log.read_text()
    assert '"GET /retailcrm-admin/ HTTP/1.1" 502' in access
    assert f"upstream={down} 502" in access, access
    logs = [path for path in tmp_path.iterdir() if path.suffix == ".log"]
    assert {path.name for path in logs} >= {"crm-bridge.access.log", "crm-bridge.error.log"}
    for path in logs:
        text = path.read_text()
        for secret in (SECRET_CLIENT_ID, SECRET_TOKEN, "clientId=", "token="):
            assert secret not in text, path.name
