"""The agent console in headless Chromium against a running loket: login, queue, callers, tickets."""

from __future__ import annotations

import json
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow
HELPDESK = "helpdesk@helpdesk.example.org"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
PASSWORD = "rahasia-konsol-123"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def login(browser: Browser, stack: LoketStack, role: str = "agent") -> Page:
    """A fresh browser context logged in through the login form as a new agent."""
    username = f"{role}-{uuid.uuid4().hex[:8]}"
    stack.add_agent(username, role, PASSWORD)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{stack.url}/")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("form[action='/login'] button")
    expect(page.locator("h1")).to_have_text("Antrean tiket")
    return page


def mail(sender: str, subject: str, body: str, html: str | None = None,
         attachments: list[tuple[str, str, bytes]] | None = None) -> bytes:  # fmt: skip
    message = EmailMessage()
    message["From"] = f"Guru Uji <{sender}>"
    message["To"] = HELPDESK
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="sekolah.example.id")
    message.set_content(body)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for filename, content_type, data in attachments or []:
        maintype, subtype = content_type.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message.as_bytes()


def ticket_of(pg_url: str, sender: str) -> int | None:
    return db.fetchval(
        pg_url, "SELECT ticket_id FROM messages WHERE sender = $1 ORDER BY id LIMIT 1", sender
    )


def unique_mobile() -> str:
    digits = f"{uuid.uuid4().int % 10**8:08d}"
    return f"0813{digits}"


# --- login ---------------------------------------------------------------------------------


def test_login_page_wrong_password_and_logout(
    browser: Browser, stack: LoketStack, artifacts: Path
) -> None:
    page = browser.new_context().new_page()
    page.goto(f"{stack.url}/callers?phone=0812")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.screenshot(path=artifacts / "console-login.png")
    page.fill("#username", "nobody-" + uuid.uuid4().hex[:6])
    page.fill("#password", "wrong-password")
    with page.expect_response(
        lambda r: r.url.endswith("/login") and r.request.method == "POST"
    ) as answer:
        page.click("form[action='/login'] button")
    assert answer.value.status == 401
    expect(page.locator("[role=alert]")).to_contain_text("salah")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert "loket_session" not in cookies

    agent = login(browser, stack)
    session = {c["name"]: c for c in agent.context.cookies()}["loket_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    agent.click("header form[action='/logout'] button")
    expect(agent).to_have_url(re.compile(r"/login$"))
    assert "loket_session" not in {c["name"] for c in agent.context.cookies()}
    agent.goto(f"{stack.url}/")
    expect(agent).to_have_url(re.compile(r"/login\?next="))


def test_login_throttled_after_five_failures(browser: Browser, stack: LoketStack) -> None:
    username = f"throttled-{uuid.uuid4().hex[:6]}"
    stack.add_agent(username, "agent", PASSWORD)
    page = browser.new_context().new_page()
    statuses = []
    for attempt in range(6):
        page.goto(f"{stack.url}/login")
        page.fill("#username", username)
        page.fill("#password", PASSWORD if attempt == 5 else f"salah-{attempt}")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("form[action='/login'] button")
        statuses.append(answer.value.status)
    # Five failures, then even the right password is refused for a while, with a clear message.
    assert statuses == [401] * 5 + [429]
    expect(page.locator("[role=alert]")).to_contain_text("Terlalu banyak percobaan")
    assert "loket_session" not in {c["name"] for c in page.context.cookies()}


def test_forms_refuse_posts_without_the_csrf_token(stack: LoketStack) -> None:
    username = f"csrf-{uuid.uuid4().hex[:6]}"
    stack.add_agent(username, "agent", PASSWORD)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        page = client.get("/login")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        refused = client.post(
            "/login", data={"username": username, "password": PASSWORD, "csrf": "forged"}
        )
        assert refused.status_code == 403
        logged_in = client.post(
            "/login", data={"username": username, "password": PASSWORD, "csrf": token}
        )
        assert logged_in.status_code == 303 and "loket_session" in client.cookies
        # A cross-site form cannot know the token: its post changes nothing.
        for path, data in (("/logout", {}), ("/lang", {"lang": "en"}), ("/callers", {"name": "X"})):
            assert client.post(path, data=data).status_code == 403, path
        assert client.get("/").status_code == 200


# --- the procedure: caller look-up, a call, transitions --------------------------------------


def test_call_from_unknown_number_then_lookup_in_another_format(
    browser: Browser, stack: LoketStack, pg_url: str, artifacts: Path
) -> None:
    page = login(browser, stack)
    number = unique_mobile()  # e.g. 0813xxxxxxxx
    page.click("nav >> text=Cari penelepon")
    page.fill("#phone", f"{number[:4]}-{number[4:8]}-{number[8:]}")
    page.keyboard.press("Enter")
    expect(page.locator("#register-title")).to_be_visible()
    assert page.input_value("#r-phone") == f"{number[:4]}-{number[4:8]}-{number[8:]}"
    page.fill("#r-name", "Ibu Kartini Uji, S.Pd")
    page.fill("#r-org", "SD Negeri Uji 1")
    page.screenshot(path=artifacts / "console-caller-register.png", full_page=True)
    page.click("form[method=post][action='/callers'] button")
    expect(page).to_have_url(re.compile(r"/callers/\d+$"))
    caller_id = int(page.url.rsplit("/", 1)[1])

    # The same number typed as +62 with spaces finds the caller's card.
    page.click("nav >> text=Cari penelepon")
    international = f"+62 {number[1:4]} {number[4:8]} {number[8:]}"
    page.fill("#phone", international)
    page.keyboard.press("Enter")
    card = page.locator(f"#caller-card-{caller_id}")
    expect(card).to_contain_text("Ibu Kartini Uji, S.Pd")
    expect(card).to_contain_text("SD Negeri Uji 1")
    expect(page.locator("#register-title")).to_have_count(0)
    page.screenshot(path=artifacts / "console-caller-card.png", full_page=True)

    # Open a ticket for this call.
    card.locator("text=Buka tiket untuk panggilan ini").click()
    page.select_option("#c-channel", "phone")
    page.fill("#c-subject", "Akun Dapodik terkunci")
    page.fill("#c-body", "Penelepon tidak bisa masuk ke Dapodik sejak kemarin.")
    page.click("#new-ticket button")
    expect(page).to_have_url(re.compile(r"/tickets/\d+$"))
    ticket_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("h1")).to_contain_text("Akun Dapodik terkunci")
    expect(page.locator(".timeline")).to_contain_text("tidak bisa masuk ke Dapodik")

    # The agent on the call takes the ticket; "my tickets" in the queue shows it.
    expect(page.locator("#ticket-assignee")).to_have_text("belum diambil")
    page.click("#take-ticket")
    owner = db.fetchval(pg_url, "SELECT a.username FROM tickets t JOIN agents a ON a.id = t.assignee_id"
                                " WHERE t.id = $1", ticket_id)  # fmt: skip
    assert owner is not None
    expect(page.locator("#ticket-assignee")).to_have_text(owner)
    expect(page.locator("#take-ticket")).to_have_count(0)
    expect(page.locator(".timeline")).to_contain_text(f"Diserahkan kepada {owner}")
    page.goto(f"{stack.url}/?assignee=me&tier=")
    expect(page.locator(f"#queue tr[data-ticket='{ticket_id}']")).to_contain_text(owner)
    page.goto(f"{stack.url}/?assignee=none&tier=")
    expect(page.locator(f"#queue tr[data-ticket='{ticket_id}']")).to_have_count(0)
    page.goto(f"{stack.url}/tickets/{ticket_id}")

    # An internal note, then pend, escalate twice, close with the solution.
    page.fill("#note-body", "Penelepon akan dihubungi lagi sore ini.")
    page.click("#notes button")
    expect(page.locator(".note-item")).to_contain_text("dihubungi lagi sore ini")
    page.click("#transitions button[value=pend]")
    expect(page.locator("#ticket-status")).to_have_text("Tertunda")
    page.click("#transitions button[value=escalate]")
    expect(page.locator("#ticket-tier")).to_have_text("Dukungan")
    page.fill("#t-note", "Dukungan butuh keputusan pimpinan")
    page.click("#transitions button[value=escalate]")
    expect(page.locator("#ticket-tier")).to_have_text("Manajemen")
    page.screenshot(path=artifacts / "console-ticket-call.png", full_page=True)

    # Resolved without a solution is refused with the procedure's reason; with one it closes.
    page.select_option("#t-reason", "resolved")
    page.click(".close-form button")
    expect(page.locator("[role=alert]")).to_be_visible()
    assert db.fetchval(pg_url, "SELECT status FROM tickets WHERE id = $1", ticket_id) == "open"
    page.select_option("#t-reason", "resolved")
    page.fill("#t-solution", "Kata sandi direset oleh tim pusat.")
    page.click(".close-form button")
    expect(page.locator("#ticket-status")).to_have_text("Ditutup")
    expect(page.locator(".solution")).to_contain_text("Kata sandi direset")
    page.screenshot(path=artifacts / "console-ticket-closed.png", full_page=True)

    ticket = db.fetch(
        pg_url, "SELECT status, tier, close_reason, solution FROM tickets WHERE id = $1", ticket_id
    )[0]
    assert ticket == {"status": "closed", "tier": "management", "close_reason": "resolved",
                      "solution": "Kata sandi direset oleh tim pusat."}  # fmt: skip
    kinds = [
        r["kind"]
        for r in db.fetch(
            pg_url, "SELECT kind FROM ticket_events WHERE ticket_id = $1 ORDER BY id", ticket_id
        )
    ]
    assert kinds[-5:] == ["note", "pended", "escalated", "escalated", "closed"]
    article_id = db.fetchval(
        pg_url, "SELECT id FROM kb_articles WHERE source_ticket_id = $1", ticket_id
    )
    assert article_id is not None

    # Once that solution is published, the next call about the same problem is shown it.
    manager = stack.client(role="manager")
    published = manager.patch(f"/api/kb/{article_id}", json={"status": "published"})
    assert published.status_code == 200, published.text
    page.goto(f"{stack.url}/callers/{caller_id}")
    page.fill("#c-subject", "Akun Dapodik terkunci lagi")
    page.fill("#c-body", "Penelepon kembali tidak bisa masuk ke Dapodik.")
    page.click("#new-ticket button")
    expect(page.locator("#kb")).to_contain_text("Kata sandi direset oleh tim pusat.")
    page.screenshot(path=artifacts / "console-ticket-kb.png", full_page=True)


# --- live queue, reply ---------------------------------------------------------------------


def test_new_mail_appears_in_queue_without_reload_and_reply_goes_out(
    browser: Browser, stack: LoketStack, dovecot: DovecotServer, smtp: SmtpServer, pg_url: str,
    artifacts: Path,
) -> None:  # fmt: skip
    page = login(browser, stack)
    token = uuid.uuid4().hex[:8]
    # Narrow the queue to this test's mail; the filter stays in force for live refreshes.
    page.fill("input[name=q]", f"Rapor {token}")
    expect(page).to_have_url(re.compile(rf"q=Rapor(\+|%20){token}"))
    expect(page.locator("#queue")).to_contain_text("Tidak ada tiket")
    page.evaluate("window.loketNoReload = true")
    page.wait_for_timeout(1500)  # the event stream is connected and positioned

    sender = f"guru.{token}@sekolah.example.id"
    dovecot.append(
        "helpdesk", mail(sender, f"Rapor {token} tidak terkirim", "e-Rapor gagal kirim nilai.")
    )
    row = page.locator("#queue tr[data-ticket]", has_text=f"Rapor {token}")
    expect(row).to_be_visible(timeout=45_000)
    assert page.evaluate("window.loketNoReload") is True, "the page was reloaded"
    page.screenshot(path=artifacts / "console-queue-live.png", full_page=True)

    row.locator("a.subject").click()
    expect(page.locator(".timeline")).to_contain_text("e-Rapor gagal kirim nilai.")
    assert page.input_value("#reply-channel") == "email"
    page.fill("#reply-body", f"Silakan coba kirim ulang, Bu. [{token}]")
    page.click("#reply button")
    outbound = page.locator(".msg.out", has_text=token)
    expect(outbound).to_be_visible()
    received = smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30)
    assert token in received.message.get_content()
    ticket_id = ticket_of(pg_url, sender)
    wait_until(
        lambda: db.fetchval(pg_url, "SELECT status FROM messages WHERE ticket_id = $1 AND direction = 'out'",
                            ticket_id) == "sent",
        what="reply marked sent",
    )  # fmt: skip
    page.reload()
    expect(page.locator(".msg.out", has_text=token).locator(".badge")).to_have_text("terkirim")
    page.screenshot(path=artifacts / "console-ticket-email-reply.png", full_page=True)


def test_language_switch_and_role_default_queue(
    browser: Browser, stack: LoketStack, artifacts: Path
) -> None:
    page = login(browser, stack, role="support")
    # Support sees the support tier by default.
    assert page.input_value("select[name=tier]") == "support"
    page.click("header button[value=en]")
    expect(page.locator("h1")).to_have_text("Ticket queue")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    assert {c["name"]: c["value"] for c in page.context.cookies()}["lang"] == "en"
    page.screenshot(path=artifacts / "console-queue-en.png", full_page=True)
    page.click("nav >> text=Caller lookup")
    expect(page.locator("h1")).to_have_text("Caller lookup")
    page.click("header button[value=id]")
    expect(page.locator("h1")).to_have_text("Cari penelepon")
    page.goto(f"{stack.url}/reports")
    assert "manajer" in page.locator("[role=alert]").inner_text()

    manager = login(browser, stack, role="manager")
    assert manager.input_value("select[name=tier]") == "management"
    manager.click("nav >> text=Laporan")
    expect(manager.locator("h1")).to_have_text("Laporan tiket terbuka")
    manager.screenshot(path=artifacts / "console-reports.png", full_page=True)
    manager.click("nav >> text=Ops")
    expect(manager.locator("h1")).to_have_text("Ops")
    manager.screenshot(path=artifacts / "console-ops.png", full_page=True)


# --- hostile content -----------------------------------------------------------------------


def test_hostile_message_renders_as_text(
    browser: Browser, stack: LoketStack, dovecot: DovecotServer, pg_url: str, artifacts: Path
) -> None:
    token = uuid.uuid4().hex[:8]
    sender = f"penyerang.{token}@contoh.example"
    subject = f"<script>alert('subjek')</script> Tolong {token}"
    body = f"Halo <img src=x onerror=alert('isi')> <script>alert(1)</script> {token}"
    html = f"<p>Halo <img src=x onerror=alert('html')><script>alert(2)</script> {token}</p>"
    page_html = b"<html><script>alert('lampiran')</script></html>"
    dovecot.append(
        "helpdesk", mail(sender, subject, body, html, [("laporan.html", "text/html", page_html)])
    )
    ticket_id = wait_until(lambda: ticket_of(pg_url, sender), what="hostile mail stored")

    page = login(browser, stack)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{stack.url}/?q={token}")
    row = page.locator("#queue tr[data-ticket]", has_text=token)
    expect(row).to_contain_text("<script>alert('subjek')</script>")
    page.goto(f"{stack.url}/tickets/{ticket_id}")
    expect(page.locator(".timeline .body")).to_contain_text("<img src=x onerror=alert('isi')>")
    page.locator(".timeline details summary").click()  # the sanitized HTML, sandboxed
    page.wait_for_timeout(1000)

    assert dialogs == []
    assert page.locator("img[src='x']").count() == 0
    # Only the console's own scripts, loaded from /static/, are on the page.
    sources = page.eval_on_selector_all("script", "nodes => nodes.map(n => n.getAttribute('src'))")
    assert sources == ["/static/htmx.min.js", "/static/console.js"]
    frame = page.frame_locator(".timeline iframe")
    expect(frame.locator("body")).to_contain_text(f"Halo {token}")  # the sanitized HTML is shown
    assert frame.locator("script").count() == 0
    assert frame.locator("[onerror]").count() == 0
    page.screenshot(path=artifacts / "console-xss.png", full_page=True)

    # The attachment is a download, never a page of ours.
    link = page.locator(".attachments a", has_text="laporan.html")
    response = page.request.get(stack.url + link.get_attribute("href"))
    assert response.status == 200 and response.body() == page_html
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert page.request.get(stack.url + link.get_attribute("href") + "?inline=1").headers[
        "content-type"] == "application/octet-stream"  # fmt: skip
    assert dialogs == []


def test_event_stream_announces_each_new_message(stack: LoketStack, dovecot: DovecotServer) -> None:
    username = f"sse-{uuid.uuid4().hex[:6]}"
    stack.add_agent(username, "agent", PASSWORD)
    token = uuid.uuid4().hex[:8]
    sender = f"sse.{token}@sekolah.example.id"
    with httpx.Client(base_url=stack.url, timeout=30) as browserless:
        assert browserless.get("/events/stream").status_code == 401
        csrf = re.search(r'name="csrf" value="([^"]+)"', browserless.get("/login").text).group(1)
        browserless.post("/login", data={"username": username, "password": PASSWORD, "csrf": csrf})
        sent = False
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with browserless.stream("GET", "/events/stream") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                event = None
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "ready" and not sent:
                        dovecot.append(
                            "helpdesk", mail(sender, f"Siaran {token}", "Tes aliran peristiwa.")
                        )
                        sent = True
                    elif line.startswith("data: ") and event == "message":
                        announced = json.loads(line[6:])
                        seen.append(announced)
                        ticket_id = db.fetchval(stack.database_url,
                                                "SELECT ticket_id FROM messages WHERE sender = $1", sender)  # fmt: skip
                        if ticket_id is not None and announced.get("ticket_id") == ticket_id:
                            assert set(announced) <= {
                                "type",
                                "ticket_id",
                                "caller_id",
                                "channel",
                                "outcome",
                            }
                            assert announced["channel"] == "email"
                            return
        stored = db.fetch(
            stack.database_url, "SELECT ticket_id FROM messages WHERE sender = $1", sender
        )
        raise AssertionError(
            f"no event announced the new message within 60 s: {seen}, stored {stored}"
        )


# --- 10,000 tickets --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoketStack]:
    """A loket of its own (database and broker) whose database holds 10,000 tickets."""
    broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("big-tansu"))
    url = db.create_database("loket_console_big")
    running = LoketStack(database_url=url, bootstrap=broker.bootstrap, config_text="",
                         workdir=tmp_path_factory.mktemp("loket-big"))  # fmt: skip
    running.up()
    db.fetch(
        url, "INSERT INTO callers (name) SELECT 'Penelepon ' || g FROM generate_series(1, 2000) g"
    )
    db.fetch(
        url,
        "INSERT INTO tickets (caller_id, subject, status, tier, channel, first_response_due,"
        " resolution_due, created_at, close_reason, solution)"
        " SELECT (SELECT min(id) FROM callers) + g % 2000, 'Masalah nomor ' || g, s.status,"
        " (ARRAY['agent','support','management'])[1 + g % 3],"
        " (ARRAY['email','sms','telegram','phone','facebook'])[1 + g % 5],"
        " now() + ((g % 200) - 40) * interval '1 hour', now() + ((g % 300) - 20) * interval '1 hour',"
        " now() - (g % 500) * interval '1 hour',"
        " CASE WHEN s.status = 'closed' THEN 'resolved' END, CASE WHEN s.status = 'closed' THEN 'ok' END"
        " FROM generate_series(1, 10000) g"
        " CROSS JOIN LATERAL (SELECT (ARRAY['open','open','pending','closed'])[1 + g % 4] AS status) s",
    )
    db.fetch(
        url,
        "INSERT INTO messages (ticket_id, caller_id, direction, channel, sender, body_text, body_display)"
        " SELECT id, caller_id, 'in', channel, 'uji', 'Isi pesan untuk ' || subject,"
        " 'Isi pesan untuk ' || subject FROM tickets",
    )
    yield running
    running.stop()
    broker.stop()
    db.drop_database(url)


def test_queue_page_load_with_10000_tickets(
    browser: Browser, big_stack: LoketStack, artifacts: Path
) -> None:
    assert db.fetchval(big_stack.database_url, "SELECT count(*) FROM tickets") == 10_000
    page = login(browser, big_stack, role="admin")
    timings: dict[str, dict[str, float]] = {}
    for name, query in (("first page", "/"), ("page 50 of all", "/?status=all&page=50"),
                        ("overdue at support", "/?tier=support&overdue=1")):  # fmt: skip
        loads, responses = [], []
        for _ in range(5):
            started = time.perf_counter()
            page.goto(f"{big_stack.url}{query}", wait_until="load")
            loads.append((time.perf_counter() - started) * 1000)
            assert page.locator("#queue tr[data-ticket]").count() == 100
            started = time.perf_counter()
            assert page.request.get(f"{big_stack.url}{query}").status == 200
            responses.append((time.perf_counter() - started) * 1000)
        timings[name] = {
            "browser load ms (median of 5)": round(statistics.median(loads), 1),
            "server response ms (median of 5)": round(statistics.median(responses), 1),
        }
    expect(page.locator("#queue .summary")).to_contain_text("tiket")
    page.goto(f"{big_stack.url}/")
    page.screenshot(path=artifacts / "console-queue-10000.png")
    (artifacts / "console-queue-timing.json").write_text(json.dumps(timings, indent=1))
    print(f"queue page load with 10,000 tickets (ms): {timings}")
