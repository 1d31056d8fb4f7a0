"""No secret escapes: the API key, the clientId and the admin link never reach a log line,
an integration_logs row, an HTTP answer or an error message — even when RetailCRM echoes
them back. Checked in process (structlog's capture) and on a real daemon's stdout."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
from structlog.testing import capture_logs

from daemon.crypto import Crypto
from daemon.integrations.retailcrm import RetailCrmAdapter
from daemon.integrations.retailcrm.simulator import Simulator
from daemon.logconfig import redact
from daemon.settings import Settings
from tests.conftest import TEST_SERVICE_TOKEN, settings_env
from tests.retailcrm.conftest import ENTERPRISE, KEY, seed, stored
from tests.support.daemon import running, start_process
from tests.support.seed import insert_event
from tests.support.waiting import wait_until

CODE = "vochi-telephony"
TOKEN = f"tok{ENTERPRISE}"


def call(n: int, event: str) -> dict[str, Any]:
    body: dict[str, Any] = {"Token": TOKEN, "UniqueId": f"1757772742.{n}", "CallType": 0,
                            "Phone": "+375291234567", "Trunk": "0001363"}
    if event == "dial":
        body["Extensions"] = ["101"]
    else:
        body.update(Extensions=[""], CallStatus="2", StartTime="2025-01-09 19:20:00",
                    EndTime="2025-01-09 19:21:00")
    return body


def echo(*secrets: str, status: int = 400) -> dict[str, Any]:
    """A RetailCRM answer quoting secrets back, in its message and its field errors."""
    return {"success": False, "errorMsg": "rejected: " + " ".join(secrets),
            "errors": {"clientId": secrets[-1], "apiKey": secrets[0], "note": " ".join(secrets)}}


def leaked(text: str, secrets: list[str]) -> list[str]:
    return [s[:6] + "…" for s in secrets if s and s in text]


async def all_logs_text(pool: asyncpg.Pool) -> str:
    rows = await pool.fetch("SELECT event_type, request_data, response_data, error_message "
                            "FROM integration_logs")
    assert rows
    return json.dumps([dict(r) for r in rows], ensure_ascii=False)


async def test_nothing_secret_in_logs_rows_or_answers(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    answers: list[str] = []
    with capture_logs() as logs:
        registered = await adapter.register(ENTERPRISE)
        assert registered.ok
        client_id = crypto.decrypt((await stored(pool))["client_id"])
        link = sim.state.modules[CODE]["accountUrl"]
        jwt = parse_qs(urlsplit(link).query)["token"][0]
        secrets = [KEY, client_id, jwt]

        sim.add_fault(path="/api/v5/integration-modules", status=400, count=1,
                      body=echo(KEY, link, client_id))
        saved = await adapter.save_extensions(ENTERPRISE, {"2": "102"})
        assert saved.sync_pending
        answers += [saved.message, json.dumps(saved.warnings)]
        sim.add_fault(path="/api/v5/integration-modules", status=500, count=1,
                      body=echo(KEY, link, client_id))
        answers.append((await adapter.sync_extensions(ENTERPRISE)).message)
        assert await adapter.reconcile() == 1
        config = adapter.parse_config(await stored(pool))
        answers.append((await adapter.check_credentials(config)).message)

        async with running(make_settings(poll_interval_s=0.1, max_attempts=2)) as daemon, \
                aiohttp.ClientSession() as http:
            sim.add_fault(path="/api/v5/telephony/call/event", status=400, count=1,
                          body=echo(KEY, client_id))
            sim.add_fault(path="/api/v5/telephony/calls/upload", status=500, count=1,
                          body=echo(KEY, client_id))
            for n in range(3):
                await insert_event(pool, "dial", call(n, "dial"))
                await insert_event(pool, "hangup", call(n, "hangup"))
            # The hangups' uploads go together once their popups are out: the echoing 500
            # fails that batch once, its retry goes through.
            await wait_until(lambda: len(sim.state.uploaded_calls) == 3)
            for path in ("/stats", "/health", "/metrics"):
                async with http.get(daemon.url + path, headers={
                        "Authorization": f"Bearer {TEST_SERVICE_TOKEN}"}) as response:
                    answers.append(await response.text())
            for sent in (client_id, client_id + "x"):
                async with http.post(f"{daemon.url}/retailcrm/actions/activity", data={
                        "clientId": sent, "activity": "nonsense"}) as response:
                    answers.append(await response.text())
            async with http.get(link.replace("https://bridge.example.by", daemon.url)) as r:
                answers.append(await r.text())
        unregistered = await adapter.unregister(ENTERPRISE)
        answers.append(unregistered.message)
        secrets.append(crypto.decrypt((await stored(pool))["client_id"]))

    rows = await all_logs_text(pool)
    assert "module_edit" in rows and "call/event" in rows
    assert "***" in rows  # the echoes were there, and were masked
    assert not leaked(rows, secrets)
    assert not leaked(json.dumps(logs, ensure_ascii=False, default=str), secrets)
    assert not leaked("\n".join(answers), secrets)
    failed = await pool.fetchval("SELECT count(*) FROM crm_deliveries WHERE status = 'failed'")
    assert failed >= 1  # the echoing failure really happened


async def test_a_real_daemon_s_stdout_has_no_secret(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    database_url: str,
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    assert (await adapter.register(ENTERPRISE)).ok
    client_id = crypto.decrypt((await stored(pool))["client_id"])
    sim.add_fault(path="/api/v5/telephony/call/event", status=403, count=1,
                  body=echo(KEY, client_id))  # auth failure: logged, held
    sim.add_fault(path="/api/v5/telephony/calls/upload", status=500, count=1,
                  body=echo(KEY, client_id))
    daemon = await start_process(settings_env(
        database_url, CRM_BRIDGE_POLL_INTERVAL_S="0.1", CRM_BRIDGE_LOG_LEVEL="debug",
        CRM_BRIDGE_RETRY_BASE_S="0.1", CRM_BRIDGE_RETRY_MAX_S="0.2"))
    try:
        await insert_event(pool, "dial", call(1, "dial"))
        await insert_event(pool, "hangup", call(1, "hangup"))
        deadline = time.monotonic() + 10
        while not await pool.fetchval("SELECT count(*) FROM crm_holds"):
            assert time.monotonic() < deadline, "the auth failure put no hold"
            await asyncio.sleep(0.05)
        # The hold lifts when the configuration changes (an admin fixing the key).
        await pool.execute(
            "UPDATE enterprises SET integrations_config = jsonb_set(integrations_config, "
            "'{retailcrm,site_code}', '\"main\"') WHERE number = $1", ENTERPRISE)
        await wait_until(lambda: len(sim.state.uploaded_calls) == 1, timeout=15)
        await daemon.signal(signal.SIGTERM)
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.kill()
    text = json.dumps(daemon.lines, ensure_ascii=False)
    assert "delivery_" in text or "auth" in text  # the failures were logged...
    assert not leaked(text, [KEY, client_id])  # ...without the secrets


async def test_a_secret_echoed_as_an_object_key_never_reaches_a_row(
    adapter: RetailCrmAdapter, sim: Simulator, pool: asyncpg.Pool, crypto: Crypto,
    make_settings: Callable[..., Settings],
) -> None:
    await seed(pool, crypto, sim.url, user_extensions={"1": "101"})
    assert (await adapter.register(ENTERPRISE)).ok
    client_id = crypto.decrypt((await stored(pool))["client_id"])
    # RetailCRM quoting the clientId and the key back as keys of its answer: refused once,
    # then "accepted".
    sim.add_fault(path="/api/v5/telephony/call/event", status=400, count=1, body={
        "success": False, "errorMsg": "unknown codes",
        "errors": {client_id: "is not a code", KEY: {"nested": {client_id: KEY}}}})
    sim.add_fault(path="/api/v5/telephony/calls/upload", status=200, count=1, body={
        "success": True, "processedCallsCount": 1, "duplicateCalls": [],
        "echo": {client_id: [KEY], f"clientId={client_id}": 1}})
    with capture_logs(processors=[redact]) as logs:
        async with running(make_settings(poll_interval_s=0.1, max_attempts=1)):
            await insert_event(pool, "dial", call(9, "dial"))
            await insert_event(pool, "hangup", call(9, "hangup"))
            deadline = time.monotonic() + 15
            while await pool.fetchval(
                    "SELECT count(*) FROM crm_deliveries WHERE status = 'pending'"):
                assert time.monotonic() < deadline, "not settled"
                await asyncio.sleep(0.05)
    rows = await all_logs_text(pool)
    assert '"***"' in rows  # the echoes were there, as keys, and were masked
    assert not leaked(rows, [KEY, client_id])
    errors = await pool.fetchval("SELECT string_agg(last_error, ' ') FROM crm_deliveries")
    assert not leaked(errors or "", [KEY, client_id])
    assert not leaked(json.dumps(logs, ensure_ascii=False, default=str), [KEY, client_id])
