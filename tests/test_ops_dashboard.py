"""The live ops dashboard and the queue's outage banner, in headless Chromium against an
embedded `loket up` whose e-mail account cannot reach its mail server."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import db
from tests.support.embedded import Up, add_agent, database_url, start_up
from tests.support.ports import free_port
from tests.support.stack import wait_until
from tests.test_console_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.slow
PASSWORD = "rahasia-ops-321"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """An embedded `loket up` with one e-mail account whose IMAP server does not answer."""
    workdir = tmp_path_factory.mktemp("opsboard")
    dead = free_port()
    config = workdir / "loket.toml"
    config.write_text(f"""
[[channels.email]]
name = "helpdesk"
address = "helpdesk@helpdesk.example.org"
imap_host = "127.0.0.1"
imap_port = {dead}
imap_user = "helpdesk"
imap_password = "not-used-here"
imap_tls = "none"
smtp_host = "127.0.0.1"
smtp_port = {dead}
smtp_tls = "none"
""")
    running = start_up(workdir, "data", LOKET_CONFIG=str(config), LOKET_IMAP_POLL_SECONDS="1")
    try:
        url = database_url(running)
        down = "SELECT count(*) FROM channel_health WHERE state = 'down' AND account = 'helpdesk'"
        wait_until(lambda: db.fetchval(url, down) == 1, timeout=60, what="e-mail account down")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def login(browser: Browser, up: Up, role: str) -> Page:
    username = f"{role}-{uuid.uuid4().hex[:8]}"
    add_agent(up, username, role, PASSWORD)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{up.url}/login")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("form[action='/login'] button")
    expect(page.locator("h1")).to_have_text(re.compile("Antrean tiket|Ticket queue"))
    return page


def test_the_queue_says_when_a_channel_is_down(browser: Browser, up: Up) -> None:
    page = login(browser, up, "agent")
    banner = page.locator("#pipeline-alerts")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("E-mail helpdesk mati")
    expect(banner).to_contain_text("belum pernah")  # it never reached its server
    banner.locator("a[href='/ops']").click()
    expect(page.locator("h1")).to_have_text("Ops")


def test_the_dashboard_shows_the_pipeline_live_in_both_languages(
    browser: Browser, up: Up, artifacts: Path
) -> None:
    page = login(browser, up, "manager")
    page.goto(f"{up.url}/ops")
    board = page.locator("#ops-board")
    expect(board.locator("h2#ops-flow")).to_have_text("Alur pesan")
    # The broker and the database are named with their state, not as nulls.
    expect(board.locator("[data-part=broker]")).to_contain_text("baik")
    expect(board.locator("[data-part=database]")).to_contain_text("baik")
    assert "null" not in board.inner_text()
    for stage in ("normalizer", "ticketing", "receipts", "delivery-email", "kb-suggest"):
        expect(board.locator(f"[data-stage='{stage}']")).to_contain_text("per menit")
    # The outage is on top, and the account's row names the error.
    expect(board.locator(".verdict")).to_contain_text("Gangguan")
    row = board.locator("tr[data-channel='email/helpdesk']")
    expect(row).to_contain_text("mati")
    assert row.locator("td.error").inner_text().strip()
    expect(board.locator("svg.chart")).to_have_count(2)
    # Live: the board is fetched again and swapped in place without a reload.
    with page.expect_response(lambda r: r.url.endswith("/ops/board") and r.status == 200):
        pass
    expect(page.locator("#ops-board")).to_have_count(1)
    page.screenshot(path=artifacts / "console-ops-board.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollHeight") < 3000

    page.click("header button[value=en]")
    expect(page.locator("h2#ops-flow")).to_have_text("Pipeline")
    expect(page.locator(".verdict")).to_contain_text("Outage")
    expect(page.locator("tr[data-channel='email/helpdesk']")).to_contain_text("down")
    page.screenshot(path=artifacts / "console-ops-board-en.png", full_page=True)


def test_an_agent_without_the_shunt_role_cannot_list_it(browser: Browser, up: Up) -> None:
    page = login(browser, up, "agent")
    response = page.goto(f"{up.url}/ops/shunt")
    assert response is not None and response.status == 403
