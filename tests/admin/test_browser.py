"""A new administrator's first visit, in a real browser (Debian's Chromium, headless, driven
by Playwright): the admin link → the token leaves the address, the cookie is set → the
connection saved against the RetailCRM simulator → tested → registered → numbers assigned
(a conflict moves a number, and the page says so) → a call event appears live in the
journal → a failed delivery is replayed and turns done. Screenshots of each step are kept
in ``test-artifacts/screenshots/`` (not committed)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from daemon.integrations.retailcrm.simulator import Simulator
from tests.admin.conftest import PREFIX, A, Bridge
from tests.retailcrm.conftest import KEY
from tests.support.daemon import ROOT
from tests.support.seed import insert_event
from tests.support.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "test-artifacts" / "screenshots"
WAIT_MS = 10_000


def _chromium() -> Path:
    """Debian's Chromium, installed with apt-get where missing and possible; else a skip
    that says why."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, env=env, check=False, timeout=900,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if CHROMIUM.exists():
        return CHROMIUM
    pytest.skip("no browser: /usr/bin/chromium is missing and could not be installed "
                "(apt-get install chromium, or deploy/devenv.sh system)")


@pytest.fixture(scope="session")
def chromium() -> Path:
    return _chromium()


@pytest_asyncio.fixture
async def page(chromium: Path) -> AsyncIterator[Any]:
    playwright = pytest.importorskip("playwright.async_api",
                                     reason="playwright is not installed (pip install .[test])")
    async with playwright.async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=str(chromium), args=FLAGS)
        context = await browser.new_context(locale="ru-RU")
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        try:
            yield tab
        finally:
            await context.close()
            await browser.close()
        assert not errors, errors  # no script error, no CSP violation


async def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def result(page: Any, title: str) -> str:
    """The text of the page's result box once its title says ``title``."""
    box = page.locator("#result")
    await box.locator("[data-part=title]", has_text=title).wait_for(timeout=WAIT_MS)
    text: str = await box.inner_text()
    return text


def hangup(uid: str) -> dict[str, Any]:
    return {"Token": f"tok{A}", "UniqueId": uid, "CallType": 0, "Phone": "+375291234567",
            "Extensions": [""], "CallStatus": "0", "DateReceived": "2025-01-09 19:19:50"}


async def test_a_new_administrator_connects_retailcrm_and_fixes_what_failed(
    bridge: Bridge, page: Any, pool: asyncpg.Pool, admin_sim: Simulator
) -> None:
    # A new enterprise: nothing of RetailCRM stored yet, only its internal numbers.
    await pool.execute("UPDATE enterprises SET integrations_config = '{}' WHERE number = $1",
                       A)
    dialogs: list[str] = []

    async def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.accept()

    page.on("dialog", accept)

    # 1. The link from RetailCRM: the token leaves the address, a cookie stays.
    await page.goto(f"{bridge.url}{PREFIX}/?token={await bridge.link(A)}")
    assert page.url == f"{bridge.url}{PREFIX}/{A}/connection"
    (cookie,) = [c for c in await page.context.cookies() if c["name"] == "crm_bridge_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and cookie["path"] == PREFIX + "/"
    history = await page.evaluate("() => window.history.length")
    assert history <= 2 and "token" not in await page.evaluate("() => location.href")
    await shot(page, "01-connection-empty")

    # 2. Save the connection.
    await page.fill("input[name=domain]", admin_sim.url)
    await page.fill("input[name=api_key]", KEY)
    await page.check("input[name=enabled]")
    await page.fill("input[name=site_code]", "main")
    await page.fill("textarea[name=external_phones]", "0001363 = +375172000000")
    await page.click("button[data-action=save]")
    await result(page, "Настройки сохранены.")
    assert await page.get_attribute("input[name=api_key]", "placeholder") == "••••••••" + KEY[-4:]
    assert await page.input_value("input[name=api_key]") == ""

    # 3. Test it.
    await page.click("button[data-action=test]")
    await result(page, "Подключение работает.")

    # 4. Register the module.
    await page.click("button[data-action=save-register]")
    said = await result(page, "Модуль зарегистрирован в RetailCRM.")
    assert "Registered the module" in said
    assert admin_sim.state.modules["vochi-telephony"]["active"] is True
    await shot(page, "02-registered")
    assert KEY not in await page.content()

    # 5. Numbers: 101 to the first manager, then to the second: it moves, and says so.
    await page.click(f"nav a[href='{PREFIX}/{A}/managers']")
    await page.select_option("select[name='1']", "101")
    await page.click("button[data-action=save-extensions]")
    await result(page, "Номера сохранены.")
    await page.select_option("select[name='2']", "101")
    await page.click("button[data-action=save-extensions]")
    said = await result(page, "Номера сохранены.")
    first = await page.get_attribute("tr[data-user-id='1']", "data-name")
    second = await page.get_attribute("tr[data-user-id='2']", "data-name")
    assert f"Номер 101 перенесён: {first} → {second}" in said
    assert await page.input_value("select[name='1']") == ""
    assert await page.inner_text("tr[data-user-id='2'] .current") == "101"
    hacker = await page.inner_text("tr[data-user-id='4'] td:first-child")
    assert hacker.startswith("<script>alert(1)</script> Хакер")  # shown as text, never run
    assert dialogs == []
    codes = admin_sim.state.modules["vochi-telephony"]["integrations"]["telephony"]
    assert codes["additionalCodes"] == [{"userId": "2", "code": "101"}]
    await shot(page, "03-managers-moved")

    # 6. The journal: a call event appears by itself, and turns done.
    await page.click(f"nav a[href='{PREFIX}/{A}/journal']")
    await page.locator("#live-state.connected").wait_for(timeout=WAIT_MS)
    await insert_event(pool, "hangup", hangup("1757772742.95"))
    row = page.locator("tr[data-event-id]", has_text="1757772742.95")
    await row.locator("td[data-field=status]", has_text="done").wait_for(timeout=WAIT_MS)

    # 7. RetailCRM refuses one: failed. Replayed once it accepts again: done.
    admin_sim.add_fault(path="/api/v5/telephony", status=400,
                        body={"success": False, "errorMsg": "Refused by the test"})
    await insert_event(pool, "hangup", hangup("1757772742.96"))
    failed = page.locator("tr[data-event-id]", has_text="1757772742.96")
    await failed.locator("td[data-field=status]", has_text="failed").wait_for(timeout=WAIT_MS)
    await failed.locator("button[data-action=attempts]").click()
    await page.locator("tr.attempts pre", has_text="Refused by the test").wait_for(
        timeout=WAIT_MS)
    await shot(page, "04-journal-failed")
    admin_sim.clear_faults()
    # The replay's answer reaches the page only after the delivery is done and the live
    # view has said so (as on a loaded host): the row must not step back to "pending".
    delivered = asyncio.Event()

    async def late_answer(route: Any) -> None:  # a playwright Route
        answer = await route.fetch()
        await wait_until(lambda: delivered.is_set(), timeout=WAIT_MS / 1000)
        await asyncio.sleep(0.3)  # the live view's message is on the page by now
        await route.fulfill(response=answer)

    await page.route("**/deliveries/*/replay", late_answer)
    await failed.locator("button[data-action=replay]").click()
    for _ in range(WAIT_MS // 20):
        if await pool.fetchval("SELECT status FROM crm_deliveries WHERE unique_id = $1",
                               "1757772742.96") == "done":
            break
        await asyncio.sleep(0.02)
    delivered.set()
    await failed.locator("td[data-field=status]", has_text="done").wait_for(timeout=WAIT_MS)
    await page.wait_for_timeout(500)  # the replay's answer has come and gone meanwhile
    assert await failed.locator("td[data-field=status]").inner_text() == "done"
    await page.unroute("**/deliveries/*/replay")
    assert await failed.locator("button[data-action=replay]").is_hidden()
    await shot(page, "05-journal-replayed")

    # 8. Diagnostics say it is all well.
    await page.click(f"nav a[href='{PREFIX}/{A}/diagnostics']")
    assert "Refused by the test" in await page.inner_text("dl.diagnostics")
    await shot(page, "06-diagnostics")
