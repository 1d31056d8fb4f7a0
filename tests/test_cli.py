"""The command line's manners: a result on stdout, log lines on stderr, and an operator's
mistake (an unreachable database, a port already taken, an unknown integration) as one
line naming what to change — never a traceback."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest

from daemon.pgcluster import free_port
from daemon.settings import mask_url_password
from tests.conftest import settings_env
from tests.support.daemon import ROOT
from tests.support.pg import with_database


async def cli(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """``python -m daemon ARGS`` with exactly ``env``: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {err!r}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("command", ["check", "run", "migrate", "replay", "purge"])
async def test_an_unreachable_database_is_one_line(command: str) -> None:
    url = f"postgresql://crm:hunter2-password@127.0.0.1:{free_port()}/platform"
    code, out, err = await cli(settings_env(url), command)
    assert code == 1
    line = _one_line(err)
    assert line.startswith("crm-bridge: cannot reach the database at "
                           "postgresql://crm:***@127.0.0.1:"), line
    assert "CRM_BRIDGE_DATABASE_URL" in line
    assert "hunter2" not in out + err
    assert out == ""


async def test_a_missing_database_and_an_unmigrated_one_are_one_line_each(
    pg_server: str, empty_database_url: str,
) -> None:
    code, _out, err = await cli(settings_env(with_database(pg_server, "no_such_db")), "run")
    assert code == 1
    assert 'database "no_such_db" does not exist' in _one_line(err)
    code, out, err = await cli(settings_env(empty_database_url), "run")
    assert code == 1
    line = _one_line(err)
    assert "is not migrated" in line and "run crm-bridge migrate" in line
    assert all(json.loads(raw) for raw in out.splitlines()), "the daemon's own log: stdout"


async def test_a_port_in_use_is_one_line_naming_the_port_and_the_variable(
    database_url: str,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await cli(settings_env(database_url, CRM_BRIDGE_PORT=str(port)), "run")
    assert code == 1
    line = _one_line(err)
    assert f"port {port} is already in use" in line and "CRM_BRIDGE_PORT" in line
    events = [json.loads(raw)["event"] for raw in out.splitlines()]
    assert "task_crashed" not in events and "listening" not in events


@pytest.mark.parametrize("command", ["check", "run"])
async def test_an_unknown_integration_is_a_usage_error(database_url: str, command: str) -> None:
    code, out, err = await cli(settings_env(database_url), command, "--integration", "amocrn")
    assert code == 2
    line = _one_line(err)
    assert "no integration 'amocrn'" in line and "retailcrm" in line, line
    assert out == ""


async def test_commands_print_their_result_on_stdout_and_log_on_stderr(
    database_url: str,
) -> None:
    env = settings_env(database_url)
    code, out, err = await cli(env, "migrate")
    assert code == 0
    assert out.startswith("the database is up to date (at ") and out.count("\n") == 1
    assert [json.loads(line)["event"] for line in err.splitlines()] == ["migrations_done"]
    code, out, err = await cli(env, "check")
    assert code == 0, err
    assert out.startswith("ok: settings valid, integration retailcrm, database ")
    assert f"database {mask_url_password(database_url)} reachable and migrated" in out
    assert "check_ok" in err
    code, out, err = await cli(env, "replay")
    assert (code, out) == (0, "0 deliveries put back in the queue\n")
    assert json.loads(err.splitlines()[-1])["event"] == "replayed"
