"""The operator's commands of the admin experience, as real processes: ``crm-bridge
admin-link`` (the link opens the pages, even of an enterprise never configured), and the
settings and numbers ``retailcrm configure`` / ``extensions`` change through the same
validation as the API. Results on standard output, logs on standard error."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import jwt
import pytest

from daemon.crypto import Crypto
from daemon.integrations.retailcrm.simulator import Simulator
from tests.admin.conftest import PREFIX, A, Bridge
from tests.conftest import TEST_SECRET_KEY, settings_env
from tests.retailcrm.conftest import AMOCRM, PUBLIC, amocrm_text, seed, stored
from tests.support.daemon import ROOT
from tests.support.seed import add_enterprise


async def run(database_url: str, *args: str, public: str = PUBLIC) -> tuple[int, str, str]:
    """``python -m daemon ARGS``: (exit code, stdout, stderr)."""
    env = {**os.environ, **settings_env(database_url, CRM_BRIDGE_PUBLIC_URL=public)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode()


async def test_admin_link_prints_a_link_that_opens_the_pages(
    database_url: str, bridge: Bridge, pool: asyncpg.Pool
) -> None:
    await add_enterprise(pool, "0555")  # never configured: no retailcrm key at all
    code, out, err = await run(database_url, "admin-link", "0555", "--ttl", "2h",
                               public=bridge.url)
    assert code == 0, err
    assert out.startswith(f"{bridge.url}{PREFIX}/?token=") and "\n" not in out
    assert all(json.loads(line)["event"] for line in err.splitlines())  # logs: stderr
    token = parse_qs(urlsplit(out).query)["token"][0]
    assert token not in err
    claims = jwt.decode(token, TEST_SECRET_KEY, algorithms=["HS256"],
                        audience="crm-bridge:admin-link")
    assert claims["enterprise"] == "0555" and claims["source"] == "retailcrm"
    assert 7150 <= claims["exp"] - time.time() <= 7200
    assert (await stored(pool, "0555")) == {"token_version": 0}
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http, http.get(out) as page:
        assert page.status == 200 and str(page.url).endswith(f"{PREFIX}/0555/connection")
        assert "token=" not in str(page.url)

    code, out, err = await run(database_url, "admin-link", "4242")
    assert code == 1 and out == "" and "no enterprise 4242" in err
    code, out, err = await run(database_url, "admin-link", A, "--ttl", "400d")
    assert code == 2 and "366d" in err


async def test_configure_sets_every_setting_through_the_api_validation(
    database_url: str, pool: asyncpg.Pool, crypto: Crypto, admin_sim: Simulator
) -> None:
    await seed(pool, crypto, admin_sim.url, enterprise=A, user_extensions={"1": "101"})
    amocrm = await amocrm_text(pool, A)
    code, out, err = await run(
        database_url, "retailcrm", "configure", A, "--crm-time-zone", "Europe/Moscow",
        "--no-popup-hangup", "--log-internal", "--site-code", "main",
        "--external-phone", "0001363=+375172000000", "--external-phone", "0001364=+375172000001")
    assert code == 0, err
    assert out.startswith(f"Saved the RetailCRM settings of enterprise {A}")
    assert "2 line number(s)" in out and "site code main" in out
    raw = await stored(pool, A)
    assert raw["crm_time_zone"] == "Europe/Moscow" and raw["popup_hangup"] is False
    assert raw["log_internal"] is True and raw["site_code"] == "main"
    assert raw["external_phones"] == {"0001363": "+375172000000", "0001364": "+375172000001"}
    assert raw["user_extensions"] == {"1": "101"} and await amocrm_text(pool, A) == amocrm

    code, out, err = await run(database_url, "retailcrm", "configure", A,
                               "--external-phone", "0001363=not a phone")
    assert code == 1 and out == ""
    assert "Nothing was saved: external_phones.0001363" in err
    assert (await stored(pool, A)) == raw
    code, out, err = await run(database_url, "retailcrm", "configure", A, "--no-external-phones")
    assert code == 0 and (await stored(pool, A))["external_phones"] == {}
    assert json.loads(await amocrm_text(pool, A)) == AMOCRM


async def test_extensions_set_and_show(
    database_url: str, pool: asyncpg.Pool, crypto: Crypto, admin_sim: Simulator
) -> None:
    await seed(pool, crypto, admin_sim.url, enterprise=A, user_extensions={"1": "101"})
    code, out, err = await run(database_url, "retailcrm", "extensions", "set", A, "2=101", "3=102")
    assert code == 0, err
    assert "Number 101 moved from manager 1 to manager 2" in out
    code, out, err = await run(database_url, "retailcrm", "extensions", "show", A)
    assert out == f"Enterprise {A}: manager 2 → 101, manager 3 → 102."
    code, out, err = await run(database_url, "retailcrm", "extensions", "set", A, "3=", "4=999")
    assert code == 1 and "Nothing was saved: user_extensions.4" in err
    assert (await stored(pool, A))["user_extensions"] == {"2": "101", "3": "102"}
    code, out, err = await run(database_url, "retailcrm", "extensions", "set", A, "3=")
    assert code == 0 and (await stored(pool, A))["user_extensions"] == {"2": "101"}


@pytest.mark.parametrize("bad", ["0", "-5", "soon", "367d"])
def test_a_bad_ttl_is_refused(bad: str) -> None:
    from daemon.cli import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["admin-link", A, "--ttl", bad])
