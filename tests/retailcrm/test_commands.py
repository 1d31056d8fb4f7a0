"""``crm-bridge retailcrm …`` as an operator runs it: real processes, the real database, the
simulator. Every answer is one clear paragraph, the exit code says success, and no secret
is ever printed; the key is stored encrypted and never touches the managers' numbers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations.retailcrm import commands
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.settings import Settings
from tests.conftest import settings_env
from tests.retailcrm.conftest import AMOCRM, ENTERPRISE, KEY, PUBLIC, amocrm_text, seed, stored
from tests.support.bytesink import ByteSink
from tests.support.daemon import ROOT
from tests.support.seed import add_enterprise

KEY2 = "rcrm-SECOND-key-fedcba9876543210"


class Cli:
    """Runs ``python -m daemon retailcrm …`` against this test's database."""

    def __init__(self, database_url: str) -> None:
        self.env = {**os.environ, **settings_env(database_url, CRM_BRIDGE_PUBLIC_URL=PUBLIC)}
        self.outputs: list[str] = []

    async def __call__(self, *args: str, stdin: str | None = None) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon", "retailcrm", *args, cwd=ROOT, env=self.env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), 30)
        logged = [line for line in out.decode().splitlines() if _is_log_line(line)]
        assert not logged, f"log lines belong on stderr, the answer alone on stdout: {logged}"
        text = out.decode() + err.decode()
        self.outputs.append(text)
        assert proc.returncode is not None
        return proc.returncode, _paragraph(text)

    def assert_no_secret(self, *secrets: str) -> None:
        everything = "\n".join(self.outputs)
        assert "eyJ" not in everything  # no admin link (JWT) either
        for secret in secrets:
            assert secret not in everything, f"{secret[:6]}… was printed"


def _is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _paragraph(text: str) -> str:
    """The command's answer: its output minus the JSON log lines."""
    lines = []
    for line in text.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                continue
        except ValueError:
            pass
        lines.append(line)
    answer = "\n".join(lines).strip()
    assert answer and "\n" not in answer, f"not one paragraph: {text!r}"
    return answer


async def _raw(pool: asyncpg.Pool) -> dict[str, Any]:
    return await stored(pool)


async def test_configure_then_test(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, database_url: str, tmp_path: Path
) -> None:
    await add_enterprise(pool, ENTERPRISE, config={
        "amocrm": AMOCRM, "retailcrm": {"user_extensions": {"1": "101"}}})
    amocrm = await amocrm_text(pool)
    cli = Cli(database_url)
    key_file = tmp_path / "retailcrm.key"
    key_file.write_text(KEY + "\n")

    code, said = await cli("configure", ENTERPRISE, "--domain", sim.url, "--api-key-file",
                           str(key_file), "--enable", "--time-zone", "Europe/Moscow",
                           "--region", "ru")
    assert code == 0, said
    assert said.startswith(f"Saved the RetailCRM settings of enterprise {ENTERPRISE}")
    assert "API key replaced (stored encrypted)" in said and "integration on" in said
    assert "1 manager number(s) kept" in said
    raw = await _raw(pool)
    assert raw["api_key"] != KEY and KEY not in json.dumps(raw)
    assert crypto.decrypt(raw["api_key"]) == KEY
    assert (raw["domain"], raw["enabled"], raw["time_zone"], raw["region"]) == (
        sim.url, True, "Europe/Moscow", "RU")
    assert raw["user_extensions"] == {"1": "101"}

    code, said = await cli("test", ENTERPRISE)
    assert code == 0 and "accepted the API key" in said

    sim.set_keys([KEY, KEY2])
    code, said = await cli("configure", ENTERPRISE, "--api-key-file", "-", stdin=KEY2 + "\n")
    assert code == 0 and "API key replaced" in said and sim.url in said
    raw = await _raw(pool)
    assert crypto.decrypt(raw["api_key"]) == KEY2 and raw["user_extensions"] == {"1": "101"}

    before = await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                                 "WHERE number = $1", ENTERPRISE)
    refusals = await asyncio.gather(
        cli("configure", ENTERPRISE, "--domain", "https://crm.example.com/api"),
        cli("configure", ENTERPRISE, "--time-zone", "Mars/Olympus"),
        cli("configure", "9999", "--enable"),
    )
    assert [code for code, _said in refusals] == [1] * 3
    messages = [said for _code, said in refusals]
    assert messages[0] == ("Nothing was saved: domain: expected the account address without "
                           "a path.")
    assert messages[1] == "Nothing was saved: time_zone: unknown time zone 'Mars/Olympus'."
    assert messages[2] == "Nothing was saved: there is no enterprise 9999."
    assert await pool.fetchval("SELECT integrations_config::text FROM enterprises "
                               "WHERE number = $1", ENTERPRISE) == before

    # 0367 keeps KEY2, which RetailCRM no longer accepts; 0368's key lacks permissions.
    await seed(pool, crypto, sim.url, enterprise="0368", numbers=())
    sim.set_keys([KEY])
    sim.scopes = ["integration_read", "telephony_write"]
    (code, wrong), (code2, scopes), (code3, unknown), (code4, sync) = await asyncio.gather(
        cli("test", ENTERPRISE), cli("test", "0368"), cli("test", "9999"),
        cli("sync-extensions", "9999"))
    assert (code, code2, code3, code4) == (1, 1, 1, 1)
    assert sync == "There is no enterprise 9999."
    assert "rejected the API key" in wrong
    assert "lacks the permissions integration_write, telephony_read, user_read" in scopes
    assert unknown.startswith("Enterprise 9999 has no RetailCRM configuration")
    assert await amocrm_text(pool) == amocrm
    cli.assert_no_secret(KEY, KEY2)


async def test_register_sync_and_unregister(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, database_url: str
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101", "2": "102"})
    cli = Cli(database_url)

    code, said = await cli("register", ENTERPRISE)
    assert code == 0, said
    assert said.startswith("Registered the module 'vochi-telephony' in RetailCRM at")
    module = sim.state.modules["vochi-telephony"]
    assert module["baseUrl"] == f"{PUBLIC}/retailcrm" and module["active"] is True
    first = crypto.decrypt((await _raw(pool))["client_id"])

    code, said = await cli("sync-extensions", ENTERPRISE)
    assert code == 0 and said.startswith("Updated the module")
    assert "2 manager extension(s)" in said

    code, said = await cli("unregister", ENTERPRISE)
    assert code == 0, said
    assert said.startswith("Deactivated the module") and "revoked" in said
    raw = await _raw(pool)
    assert raw["enabled"] is False and raw["token_version"] == 1
    assert raw["user_extensions"] == {"1": "101", "2": "102"}
    rotated = crypto.decrypt(raw["client_id"])
    assert sim.state.modules["vochi-telephony"]["active"] is False
    cli.assert_no_secret(KEY, first, rotated)


async def test_no_key_reaches_a_private_port_unless_the_operator_allows_it(
    pool: asyncpg.Pool, crypto: Crypto, database_url: str
) -> None:
    async with ByteSink() as postgres:
        # Written by another service, past every check: the CLI must still refuse it.
        await seed(pool, crypto, f"http://127.0.0.1:{postgres.port}")
        cli = Cli(database_url)
        cli.env["CRM_BRIDGE_ALLOW_PRIVATE_CRM"] = "0"
        (code, tested), (code2, registered) = await asyncio.gather(
            cli("test", ENTERPRISE), cli("register", ENTERPRISE))
        assert (code, code2) == (1, 1)
        assert tested == ("The stored RetailCRM configuration is invalid: domain: must use "
                          "https.")
        assert "invalid: domain: must use https" in registered
        refusals = await asyncio.gather(*(
            cli("configure", ENTERPRISE, "--domain", domain) for domain in (
                f"http://127.0.0.1:{postgres.port}", f"https://127.0.0.1:{postgres.port}",
                f"https://[::ffff:127.0.0.1]:{postgres.port}", f"localhost:{postgres.port}")))
        assert [said for _code, said in refusals] == [
            "Nothing was saved: domain: must use https.",
            "Nothing was saved: domain: must be a host name, not an IP address.",
            "Nothing was saved: domain: must be a host name, not an IP address.",
            "Nothing was saved: domain: must not be localhost.",
        ]
        assert postgres.connections == 0 and not postgres.received

        # With the operator's permission the same command does connect (the sink is no CRM).
        cli.env["CRM_BRIDGE_ALLOW_PRIVATE_CRM"] = "1"
        code, said = await cli("test", ENTERPRISE)
        assert code == 1 and "lacks the permissions" in said  # it answered {}
        assert b"X-API-KEY" in postgres.received
        cli.assert_no_secret(KEY)


async def test_what_retailcrm_echoes_back_is_never_printed(
    sim: Simulator, pool: asyncpg.Pool, crypto: Crypto, database_url: str
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    cli = Cli(database_url)
    code, said = await cli("register", ENTERPRISE)
    assert code == 0, said
    client_id = crypto.decrypt((await _raw(pool))["client_id"])
    sim.add_fault(path="/api/credentials", status=400, count=1, body={
        "success": False, "errorMsg": f"clientId {client_id} is not yours",
        "errors": {client_id: "unknown", "apiKey": KEY}})
    code, said = await cli("test", ENTERPRISE)
    assert code == 1 and "is not yours" in said and "***" in said
    sim.add_fault(path="/api/v5/integration-modules", status=200, count=1, body={
        "success": True, "info": {"notExistUsersIds": [client_id, KEY],
                                  "notExistSiteCodes": [f"site-{client_id}"]}})
    code, said = await cli("sync-extensions", ENTERPRISE)
    assert code == 0 and "does not know the users ***, ***" in said
    cli.assert_no_secret(KEY, client_id)


# ---------------------------------------------------------------------- in process
# (what is decided before any database or network: no process needed)


def test_the_key_is_read_alone_from_a_file(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    good.write_text(f"  {KEY}\n")
    assert commands._read_key(str(good)) == KEY
    for name, content, says in (("empty.key", "\n", "the key file is empty"),
                                ("two.key", f"{KEY} {KEY2}", "the key alone"),
                                ("missing.key", None, "cannot read the key file")):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError) as info:
            commands._read_key(str(path))
        assert info.value.field == "api_key" and says in info.value.message
        assert KEY not in str(info.value)


def test_configure_needs_something_to_save(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["retailcrm", "configure", ENTERPRISE])
    assert args.handler(args, make_settings()) == 1
    assert capsys.readouterr().err.startswith("Nothing to save")
    args = parser.parse_args(["retailcrm", "configure", ENTERPRISE, "--domain", "ftp://x"])
    assert args.handler(args, make_settings()) == 1
    assert "domain" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # never a key on the command line, nor echoed back
        parser.parse_args(["retailcrm", "configure", ENTERPRISE, "--api-key", KEY])
    err = capsys.readouterr().err
    assert "--api-key-file" in err and KEY not in err
    with pytest.raises(SystemExit):  # no abbreviation turns it into --api-key-file
        parser.parse_args(["retailcrm", "configure", ENTERPRISE, "--api-key-f", "x"])
