"""The admin pages as served: security headers on every one, no inline script, what a CRM
sent rendered as text, the API key in no page or answer, the journal's paging links."""

from __future__ import annotations

import re

import asyncpg

from daemon.integrations.retailcrm.simulator import Simulator
from tests.admin.conftest import PREFIX, A, Bridge, Browser
from tests.admin.test_api import _deliveries
from tests.retailcrm.conftest import KEY

PAGES = ("connection", "managers", "journal", "diagnostics")
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)", re.IGNORECASE)
INLINE_HANDLER = re.compile(r"\son[a-z]+\s*=", re.IGNORECASE)


async def test_every_page_carries_the_security_headers_and_no_inline_script(
    bridge: Bridge, browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    for page in PAGES:
        async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/{page}") as response:
            assert response.status == 200, page
            html = await response.text()
            headers = response.headers
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
        assert headers["Content-Type"].startswith("text/html")
        assert not INLINE_SCRIPT.search(html), page
        assert not INLINE_HANDLER.search(html), page
        assert f'<script src="{PREFIX}/static/app.js" defer></script>' in html
    async with browser.http.get(f"{bridge.url}{PREFIX}/static/app.js") as response:
        assert response.status == 200 and response.headers["X-Content-Type-Options"] == "nosniff"
        script = await response.text()
    assert not re.search(r"[А-Яа-яЁё]", script)  # the words live in the templates


async def test_a_manager_named_like_a_script_renders_as_text(
    bridge: Bridge, browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/managers") as response:
        html = await response.text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Хакер" in html
    assert "обед" in html  # the manager's status, in words


async def test_the_api_key_appears_in_no_page_and_no_answer(
    bridge: Bridge, browser: Browser
) -> None:
    await browser.sign_in(bridge, A)
    urls = [f"{PREFIX}/{A}/{page}" for page in PAGES] + [
        f"{PREFIX}/api/{what}/{A}" for what in
        ("config", "managers", "internal-phones", "user-extensions", "journal", "diagnostics")]
    for url in urls:
        async with browser.http.get(bridge.url + url) as response:
            assert response.status == 200, url
            assert KEY not in await response.text(), url
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/connection") as response:
        html = await response.text()
    assert 'name="api_key" type="password" value=""' in html
    assert f'placeholder="••••••••{KEY[-4:]}"' in html


async def test_the_journal_page_pages_and_says_what_filter_is_wrong(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    ids = await _deliveries(pool, 3)
    await browser.sign_in(bridge, A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/journal?limit=2") as response:
        html = await response.text()
    assert html.index(f'data-event-id="{ids[2]}"') < html.index(f'data-event-id="{ids[1]}"')
    assert f'data-event-id="{ids[0]}"' not in html
    nxt = re.search(r'id="next-page" href="([^"]+)"', html)
    assert nxt is not None and f"before={ids[1]}" in nxt.group(1)
    async with browser.http.get(bridge.url + nxt.group(1).replace("&amp;", "&")) as response:
        html = await response.text()
    assert f'data-event-id="{ids[0]}"' in html and f'data-event-id="{ids[1]}"' not in html
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/journal?date=вчера") as response:
        assert response.status == 200
        assert "Проверьте фильтр «date»" in await response.text()


async def test_an_unknown_page_is_an_html_404(bridge: Bridge, browser: Browser) -> None:
    await browser.sign_in(bridge, A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/nothing-here") as response:
        assert response.status == 404


async def test_a_mismatch_with_retailcrm_is_shown_and_synchronised(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool, admin_sim: Simulator
) -> None:
    await pool.execute("""UPDATE enterprises SET integrations_config = jsonb_set(
        integrations_config, '{retailcrm,user_extensions}', '{"1": "101"}')
        WHERE number = $1""", A)
    assert (await bridge.rt.adapter.register(A)).ok
    telephony = admin_sim.state.modules["vochi-telephony"]["integrations"]["telephony"]
    telephony["additionalCodes"] = [{"userId": "1", "code": "103"}]  # edited in RetailCRM
    await browser.sign_in(bridge, A)
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/managers") as response:
        html = await response.text()
    assert "Расхождения с RetailCRM" in html and 'data-action="sync"' in html
    async with browser.http.post(f"{bridge.url}{PREFIX}/api/sync-extensions/{A}",
                                 headers=browser.headers()) as response:
        assert response.status == 200 and (await response.json())["ok"] is True
    telephony = admin_sim.state.modules["vochi-telephony"]["integrations"]["telephony"]
    assert telephony["additionalCodes"] == [{"userId": "1", "code": "101"}]
    async with browser.http.get(f"{bridge.url}{PREFIX}/{A}/managers") as response:
        assert "Расхождения с RetailCRM" not in await response.text()


async def test_an_attempt_is_shown_masked_even_if_a_secret_slipped_into_its_row(
    bridge: Bridge, browser: Browser, pool: asyncpg.Pool
) -> None:
    (event_id,) = await _deliveries(pool, 1)
    await pool.execute(
        "INSERT INTO integration_logs (enterprise_number, integration_type, event_type, "
        "request_data, response_data, status, error_message) "
        "VALUES ($1, 'retailcrm', 'hangup', $2, $3, 'error', $4)", A,
        {"event_id": event_id, "note": f"key {KEY}", "apiKey": "visible?"},
        {"echo": KEY}, f"refused {KEY}")
    await browser.sign_in(bridge, A)
    async with browser.http.get(
            f"{bridge.url}{PREFIX}/api/journal/{A}/deliveries/{event_id}") as response:
        text = await response.text()
    assert response.status == 200 and KEY not in text and "visible?" not in text
