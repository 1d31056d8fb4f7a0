"""Development mode keeps its secrets in the checkout's .pgdata/dev.env: `make run` in one
shell, and the CLI or curl in another, share them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from daemon import devmode
from daemon.cache import Entry
from daemon.pgcluster import ThrowawayCluster
from daemon.settings import SettingsError, load
from tests.support.daemon import start_process
from tests.support.seed import add_enterprise

URL = "postgresql://postgres@127.0.0.1:5999/crm_bridge"
SECRETS = ("CRM_BRIDGE_SECRET_KEY", "CRM_BRIDGE_ENCRYPTION_KEYS", "CRM_BRIDGE_SERVICE_TOKEN")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory that looks like a crm-bridge checkout (its setup.cfg)."""
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = crm-bridge\n")
    return tmp_path


def test_the_first_dev_mode_command_writes_the_secrets_once_readable_by_its_owner_only(
    checkout: Path,
) -> None:
    env, path = devmode.environment({"CRM_BRIDGE_DEV_MODE": "1", "CRM_BRIDGE_DATABASE_URL": URL},
                                    checkout)
    assert path == checkout / ".pgdata" / "dev.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(env[name] for name in SECRETS)
    settings = load(env)
    assert settings.dev_mode and settings.generated == (), "taken from the file, not made up"
    again, _ = devmode.environment({"CRM_BRIDGE_DEV_MODE": "1"}, checkout)
    assert [again[n] for n in SECRETS] == [env[n] for n in SECRETS], "created once"
    assert again["CRM_BRIDGE_DATABASE_URL"] == URL, "the URL development mode ran against"


def test_another_shell_with_nothing_set_finds_them(checkout: Path) -> None:
    made, _ = devmode.environment({"CRM_BRIDGE_DEV_MODE": "1", "CRM_BRIDGE_DATABASE_URL": URL},
                                  checkout)
    env, path = devmode.environment({"PATH": "/usr/bin"}, checkout)
    assert path is not None
    settings = load(env)
    assert settings.dev_mode and settings.database_url == URL
    assert settings.service_token == made["CRM_BRIDGE_SERVICE_TOKEN"]
    assert settings.encryption_keys == (made["CRM_BRIDGE_ENCRYPTION_KEYS"],)


def test_an_explicit_configuration_never_reads_the_file(checkout: Path) -> None:
    made, _ = devmode.environment({"CRM_BRIDGE_DEV_MODE": "1", "CRM_BRIDGE_DATABASE_URL": URL},
                                  checkout)
    production = {"CRM_BRIDGE_DATABASE_URL": "postgresql://crm@db/platform"}
    assert devmode.environment(production, checkout) == (production, None)
    assert devmode.environment({"CRM_BRIDGE_DEV_MODE": "0"}, checkout) == (
        {"CRM_BRIDGE_DEV_MODE": "0"}, None)
    assert devmode.environment({"CRM_BRIDGE_DEV_MODE": "1"}, None) == (
        {"CRM_BRIDGE_DEV_MODE": "1"}, None), "outside a checkout: nothing is written"
    mine = "m" * 32
    env, _ = devmode.environment({"CRM_BRIDGE_SERVICE_TOKEN": mine}, checkout)
    assert env["CRM_BRIDGE_SERVICE_TOKEN"] == mine, "the environment wins over the file"
    assert env["CRM_BRIDGE_SECRET_KEY"] == made["CRM_BRIDGE_SECRET_KEY"]


def test_only_a_crm_bridge_checkout_counts(tmp_path: Path, checkout: Path) -> None:
    assert devmode.checkout(checkout) == checkout
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "setup.cfg").write_text("[metadata]\nname = something-else\n")
    assert devmode.checkout(other) is None


def test_a_data_folder_that_cannot_hold_the_file_names_the_variable(checkout: Path) -> None:
    (checkout / ".pgdata").write_text("a file where a folder should be")
    with pytest.raises(SettingsError) as info:
        devmode.environment({"CRM_BRIDGE_DEV_MODE": "1"}, checkout)
    assert info.value.variable == "CRM_BRIDGE_DEV_MODE"
    assert ".pgdata/dev.env" in str(info.value)


@pytest.mark.slow
def test_the_throwaway_cluster_starts_in_a_data_folder_that_already_holds_dev_env(
    checkout: Path,
) -> None:
    if os.geteuid() == 0:
        os.chmod(checkout, 0o755)
    made, path = devmode.environment({"CRM_BRIDGE_DEV_MODE": "1"}, checkout)
    assert path is not None
    cluster = ThrowawayCluster(checkout / ".pgdata")
    try:
        cluster.start()
        assert (cluster.datadir / "PG_VERSION").exists()
        again, _ = devmode.environment({}, checkout)
        assert again["CRM_BRIDGE_SERVICE_TOKEN"] == made["CRM_BRIDGE_SERVICE_TOKEN"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        cluster.destroy()


def _banner(lines: list[dict[str, object]]) -> str:
    return "\n".join(str(line["text"]) for line in lines if line.get("event") == "raw")


@pytest.mark.slow
async def test_make_run_in_one_shell_and_the_cli_and_curl_in_another(
    checkout: Path, database_url: str, pool: asyncpg.Pool,
) -> None:
    await add_enterprise(pool, "0367")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    daemon = await start_process({**bare, "CRM_BRIDGE_DEV_MODE": "1",
                                  "CRM_BRIDGE_DATABASE_URL": database_url,
                                  "CRM_BRIDGE_LOG_FORMAT": "json"}, cwd=checkout)
    try:
        await asyncio.sleep(0)  # the banner follows the listening line
        for _ in range(100):
            if "curl -H" in _banner(daemon.lines):
                break
            await asyncio.sleep(0.05)
        banner = _banner(daemon.lines)
        assert f"curl {daemon.url}/health" in banner
        token = re.search(r"Authorization: Bearer (\S+)' " + re.escape(daemon.url) + "/stats",
                          banner)
        assert token is not None, banner
        # The second shell: nothing set, run from the checkout.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "retailcrm", "configure", "0367", "--domain",
            "demo.retailcrm.ru", "--api-key-file", "-", "--enable", cwd=checkout, env=bare,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(b"rcrm-dev-key-0123456789\n"), 30)
        assert proc.returncode == 0, err.decode()
        assert "Saved the RetailCRM settings of enterprise 0367" in out.decode()
        auth = {"Authorization": f"Bearer {token.group(1)}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{daemon.url}/api/config-cache/refresh/0367",
                                 headers=auth) as r:
                assert r.status == 200, "the token the banner shows opens /api/*"
                entry = await r.json()
            async with http.get(f"{daemon.url}/stats", headers=auth) as r:
                assert r.status == 200
        assert entry["invalid"] is None, "the daemon decrypts the key the CLI stored"
        assert entry["serves"] is True
    finally:
        code = await daemon.stop()
    assert code == 0


# ---------------------------------------------------------------------- the admin line


def entry(number: str, *, active: bool = True, configured: bool = False,
          enabled: bool = False) -> Entry:
    config = _Config(enabled) if configured else None
    return Entry(enterprise=number, token=None, secret_fp=None, active=active,
                 enabled_types=frozenset(), config=config, invalid=None, holds={}, seq=0,
                 expires_at=0.0)


@dataclass(frozen=True, slots=True)
class _Config:
    enabled: bool
    callback_secret: str | None = None

    def secrets(self) -> tuple[str, ...]:
        return ()


def test_the_admin_line_points_at_a_configured_enterprise_else_says_the_command() -> None:
    assert devmode.admin_candidate([]) is None
    assert devmode.admin_candidate([entry("0100", active=False)]) is None
    assert devmode.admin_candidate([entry("0300"), entry("0200")]) == ("0200", False)
    assert devmode.admin_candidate([entry("0100"), entry("0300", configured=True),
                                    entry("0200", configured=True, enabled=True)]) == (
        "0200", True), "a configured enterprise it serves first"
    assert devmode.admin_candidate([entry("0300", configured=True),
                                    entry("0200", configured=True, active=False)]) == (
        "0300", True)
    cli = ".venv/bin/crm-bridge"
    assert "no enterprise yet" in devmode.admin_line(None, None, cli)
    assert f"{cli} admin-link NUMBER" in devmode.admin_line(None, None, cli)
    assert devmode.admin_line("0200", None, cli).split()[:3] == [
        "admin:", cli, "admin-link"]
    with_link = devmode.admin_line("0200", "http://h/retailcrm-admin/?token=t", cli)
    assert with_link.splitlines()[0].split() == ["admin:", "http://h/retailcrm-admin/?token=t"]
    assert "valid 7 days" in with_link


@pytest.mark.slow
async def test_make_run_prints_an_admin_link_that_opens_the_pages(
    checkout: Path, database_url: str, pool: asyncpg.Pool,
) -> None:
    await add_enterprise(pool, "0100")  # not configured: not the one shown
    await add_enterprise(pool, "0367", config={"retailcrm": {"enabled": False}})
    bare = {k: v for k, v in os.environ.items() if not k.startswith("CRM_BRIDGE_")}
    daemon = await start_process({**bare, "CRM_BRIDGE_DEV_MODE": "1",
                                  "CRM_BRIDGE_DATABASE_URL": database_url,
                                  "CRM_BRIDGE_LOG_FORMAT": "json"}, cwd=checkout)
    try:
        for _ in range(200):
            if "admin:" in _banner(daemon.lines):
                break
            await asyncio.sleep(0.05)
        banner = _banner(daemon.lines)
        link = re.search(r"admin:\s+(\S+)", banner)
        assert link is not None and link.group(1).startswith(
            f"{daemon.url}/retailcrm-admin/?token="), banner
        assert "enterprise 0367's admin pages" in banner
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser, \
                browser.get(link.group(1)) as page:
            assert page.status == 200
            assert str(page.url).startswith(f"{daemon.url}/retailcrm-admin/0367/")
        token = link.group(1).rsplit("=", 1)[1]
        logged = [line for line in daemon.lines if line.get("event") != "raw"]
        assert token not in json.dumps(logged), "printed for the terminal, never logged"
        stored = await pool.fetchval(
            "SELECT integrations_config FROM enterprises WHERE number = '0100'")
        assert stored == {}, "nothing written for an enterprise never configured"
    finally:
        assert await daemon.stop() == 0
