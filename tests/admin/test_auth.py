"""Who gets in: the auth matrix over the live route table (a route added without
authentication fails here), admin links exchanged for a cookie and taken out of the
address, every kind of bad link refused, sessions scoped to one enterprise and revocable,
platform sessions, CSRF, and no secret of any of it in the logs."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from daemon import links
from daemon.settings import Settings
from tests.admin.conftest import PREFIX, SERVICE, A, B, Bridge, Browser
from tests.conftest import TEST_SECRET_KEY
from tests.support.daemon import running
from web.app import create_app

# Public on purpose (and why): health and readiness checks and metrics (nginx keeps the
# metrics internal), the API's description, the module's logo RetailCRM shows, the pages'
# script and style.
PUBLIC = {
    ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/api/openapi.yaml"),
    ("GET", "/retailcrm/logo.svg"), ("GET", f"{PREFIX}/static"),
}
# Authenticated by the CRM's clientId (refused in the CRM's own error shape).
CALLBACKS = "/retailcrm/"


def live_routes(app: web.Application) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route the application serves, sub-apps included."""
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            yield from live_routes(resource._app)
            continue
        for route in resource:
            if route.method != "HEAD":
                yield route.method, resource.canonical


def concrete(template: str, enterprise: str = A) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: enterprise if m.group(0) == "{enterprise}" else "1",
                  template)


def routes_of(bridge: Bridge) -> list[tuple[str, str]]:
    found = sorted(set(live_routes(create_app(bridge.rt))))
    assert len(found) > 30  # the walk saw the sub-applications too
    return found


async def status_of(http: aiohttp.ClientSession, method: str, url: str,
                    headers: dict[str, str] | None = None) -> int:
    method = "GET" if method == "*" else method
    async with http.request(method, url, headers=headers, data=b"{}",
                            allow_redirects=False) as response:
        return response.status


async def test_every_route_refuses_a_request_without_credentials(
    bridge: Bridge, http: aiohttp.ClientSession
) -> None:
    refused = []
    for method, template in routes_of(bridge):
        if (method, template) in PUBLIC:
            continue
        status = await status_of(http, method, bridge.url + concrete(template))
        expected = 403 if template.startswith(CALLBACKS) else 401
        if status != expected:
            refused.append(f"{method} {template}: {status} instead of {expected}")
    assert not refused, refused


async def test_the_service_api_takes_only_the_service_token(
    bridge: Bridge, http: aiohttp.ClientSession, browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    wrong = {"Authorization": "Bearer not-the-service-token-0123456789"}
    problems = []
    for method, template in routes_of(bridge):
        if not (template.startswith("/api/") or template == "/stats") or \
                (method, template) in PUBLIC:
            continue
        url = bridge.url + concrete(template)
        if (status := await status_of(http, method, url, wrong)) != 401:
            problems.append(f"wrong token: {method} {template}: {status}")
        # An admin session (with its CSRF token) does not open the service API.
        if (status := await status_of(browser.http, method, url, browser.headers())) != 401:
            problems.append(f"admin session: {method} {template}: {status}")
    assert not problems, problems


async def test_admin_routes_refuse_other_enterprises_and_missing_csrf(
    bridge: Bridge, http: aiohttp.ClientSession, browser: Browser, other_browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    await other_browser.sign_in(bridge, B)
    problems = []
    for method, template in routes_of(bridge):
        if not template.startswith(PREFIX + "/") or (method, template) in PUBLIC:
            continue
        url_a, url_b = bridge.url + concrete(template, A), bridge.url + concrete(template, B)
        checks: list[tuple[str, aiohttp.ClientSession, str, dict[str, str], int]] = [
            ("service token", http, url_a, SERVICE, 401),
        ]
        if "{enterprise}" in template:
            checks.append(("A's session asking for B", browser.http, url_b,
                           browser.headers(), 403))
        if method not in ("GET", "*"):
            checks += [
                ("no CSRF token", browser.http, url_a, {}, 403),
                ("a wrong CSRF token", browser.http, url_a, {"X-CSRF-Token": "0" * 64}, 403),
                ("B's CSRF token", browser.http, url_a, other_browser.headers(), 403),
                ("another origin", browser.http, url_a,
                 {**browser.headers(), "Origin": "https://evil.example"}, 403),
            ]
        for what, client, url, headers, expected in checks:
            if (status := await status_of(client, method, url, headers)) != expected:
                problems.append(f"{what}: {method} {template}: {status} != {expected}")
    assert not problems, problems


def _forged(claims: dict[str, object], key: str = TEST_SECRET_KEY) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


@pytest.mark.parametrize("kind", ["forged", "expired", "revoked", "wrong_source", "malformed",
                                  "no_audience"])
async def test_a_bad_link_is_refused_and_opens_nothing(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool, kind: str
) -> None:
    now = int(time.time())
    claims = {"enterprise": A, "source": "retailcrm", "token_version": 0, "iat": now,
              "exp": now + 600, "aud": links.AUDIENCE}
    token = {
        "forged": lambda: _forged(claims, "another-secret-key-0123456789abcdef-xyz"),
        "expired": lambda: _forged({**claims, "iat": now - 700, "exp": now - 100}),
        "wrong_source": lambda: _forged({**claims, "source": "amocrm"}),
        "malformed": lambda: "not.a.jwt",
        "no_audience": lambda: _forged({k: v for k, v in claims.items() if k != "aud"}),
        "revoked": lambda: _forged(claims),
    }[kind]()
    if kind == "revoked":
        await bridge.link(A)  # the key exists with version 0 ...
        await pool.execute("""UPDATE enterprises SET integrations_config = jsonb_set(
            integrations_config, '{retailcrm,token_version}', '1') WHERE number = $1""", A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/?token={token}",
                                allow_redirects=False) as response:
        assert response.status == 401
        assert "crm_bridge_admin" not in response.cookies
        text = await response.text()
        assert "Ссылка недействительна" in text and token not in text
    assert await pool.fetchval("SELECT count(*) FROM crm_admin_sessions") == 0


async def test_a_link_becomes_a_cookie_and_leaves_the_address(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    token = await bridge.link(A)
    with capture_logs() as logs:
        async with browser.http.get(f"{bridge.url}{PREFIX}/?token={token}&tab=1",
                                    allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == f"{PREFIX}/?tab=1"
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            cookie = response.headers["Set-Cookie"]
    session_id = response.cookies["crm_bridge_admin"].value
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert f"Path={PREFIX}/" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # served over plain http here
    rows = await pool.fetch("SELECT * FROM crm_admin_sessions")
    assert [bytes(r["id_hash"]) for r in rows] == [hashlib.sha256(session_id.encode()).digest()]
    assert session_id not in json.dumps([dict(r) for r in rows], default=str)
    assert token not in repr(logs) and session_id not in repr(logs)

    async with browser.http.get(f"{bridge.url}{PREFIX}/", allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == f"{PREFIX}/{A}/connection"
    async with browser.http.get(f"{bridge.url}{PREFIX}/{B}/connection") as response:
        assert response.status == 403 and "Нет доступа" in await response.text()


async def test_the_cookie_is_secure_when_served_over_https(
    bridge: Bridge, http: aiohttp.ClientSession, make_settings: type[Settings]
) -> None:
    token = await bridge.link(A)
    settings = make_settings(public_url="https://bridge.example.by", poll_interval_s=0.5)
    async with running(settings) as daemon, http.get(
            f"{daemon.url}{PREFIX}/?token={token}", allow_redirects=False) as response:
        assert response.status == 303 and "Secure" in response.headers["Set-Cookie"]


async def test_signing_out_ends_the_session(bridge: Bridge, browser: Browser) -> None:
    await browser.sign_in(bridge, A)
    async with browser.http.post(f"{bridge.url}{PREFIX}/logout",
                                 headers=browser.headers()) as response:
        assert response.status == 200
    browser.http.cookie_jar.clear()
    # Even a copy of the old cookie opens nothing now.
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/connection") as response:
        assert response.status == 401 and "Нужно войти" in await response.text()


async def test_a_platform_session_opens_its_own_enterprise_only(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO sessions (session_token, enterprise_number) VALUES ($1, $2)",
                       "platform-session-token-of-A-0123456789", A)
    browser.http.cookie_jar.update_cookies(
        {"session_token": "platform-session-token-of-A-0123456789"})
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/journal") as response:
        assert response.status == 200
        page = await response.text()
    async with browser.http.get(f"{bridge.url}{PREFIX}/{B}/journal") as response:
        assert response.status == 403
    csrf = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page)
    assert csrf is not None
    async with browser.http.put(f"{bridge.url}{PREFIX}/api/config/{A}",
                                json={"region": "RU"},
                                headers={"X-CSRF-Token": csrf.group(1)}) as response:
        assert response.status == 200
    browser.http.cookie_jar.clear()
    browser.http.cookie_jar.update_cookies({"session_token": "made-up-token"})
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/journal") as response:
        assert response.status == 401


@pytest.mark.parametrize("stored", ["1.5", "1e10", "99999999999", '"1"', "-1"])
async def test_a_malformed_stored_token_version_voids_the_session_never_a_500(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool, stored: str
) -> None:
    await browser.sign_in(bridge, A)
    await pool.execute(
        "UPDATE enterprises SET integrations_config = jsonb_set(integrations_config, "
        "'{retailcrm,token_version}', $2::jsonb) WHERE number = $1", A, json.loads(stored))
    assert await pool.fetchval(
        "SELECT integrations_config -> 'retailcrm' -> 'token_version' = $2::text::jsonb "
        "FROM enterprises WHERE number = $1", A, stored)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/connection") as response:
        assert response.status == 401 and "Нужно войти" in await response.text()
    # Deleting the integration (which bumps the version) still revokes locally and starts
    # the count over; RetailCRM is not told (409: the stored configuration is invalid).
    async with bridge_http(bridge) as http, http.delete(f"{bridge.url}/api/config/{A}",
                                                        headers=SERVICE) as response:
        assert response.status in (200, 409), await response.text()
    version = await pool.fetchval("SELECT integrations_config -> 'retailcrm' -> "
                                  "'token_version' FROM enterprises WHERE number = $1", A)
    assert isinstance(version, int) and version >= 1


def bridge_http(bridge: Bridge) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
