"""The knowledge base end to end: a resolved mailed problem becomes an article that is suggested for the next one."""

from __future__ import annotations

import random
import string
import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import httpx
import pytest

from tests.support import db
from tests.support.dovecot import DovecotServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow
HELPDESK = "helpdesk@helpdesk.example.org"


def person() -> str:
    return f"operator.{uuid.uuid4().hex[:10]}@sekolah.example.id"


def mail(sender: str, subject: str, body: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Operator Sekolah <{sender}>"
    message["To"] = HELPDESK
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="sekolah.example.id")
    message.set_content(body)
    return message.as_bytes()


def ticket_of(pg_url: str, sender: str) -> int | None:
    return db.fetchval(
        pg_url, "SELECT ticket_id FROM messages WHERE sender = $1 ORDER BY id LIMIT 1", sender
    )


def made_up_name(prefix: str) -> str:
    """A name no other test uses, letters only so it is a word the search can correct."""
    return prefix + "".join(random.choices(string.ascii_lowercase, k=6))


def ok(response: httpx.Response, status: int = 200) -> object:
    assert response.status_code == status, response.text
    return response.json()


def test_resolved_ticket_becomes_article_suggested_for_a_similar_problem(
    stack: LoketStack, dovecot: DovecotServer, pg_url: str
) -> None:
    # A made-up application name, so articles other tests publish cannot be the match.
    app = made_up_name("Simpeg")
    first = person()
    dovecot.append(
        "helpdesk",
        mail(first, f"Aplikasi {app} tidak bisa login",
             f"Selamat pagi, sejak ganti nomor HP operator kami tidak bisa masuk ke aplikasi {app}."
             " Muncul pesan akun terblokir. Mohon bantuannya."),
    )  # fmt: skip
    ticket_id = wait_until(lambda: ticket_of(pg_url, first), what="first mail ingested")
    agent = stack.client()

    # Resolved: the procedure drafts an article from the ticket.
    solution = f"Operator membuka blokir akun {app} di menu Pengguna, lalu login ulang dengan nomor HP baru."
    closed = ok(agent.post(f"/api/tickets/{ticket_id}/transitions",
                           json={"action": "close", "reason": "resolved", "solution": solution}))  # fmt: skip
    assert closed["status"] == "closed" and closed["close_reason"] == "resolved"
    article_id = db.fetchval(
        pg_url, "SELECT id FROM kb_articles WHERE source_ticket_id = $1", ticket_id
    )
    draft = ok(agent.get(f"/api/kb/{article_id}"))
    assert draft["status"] == "draft" and draft["solution"] == solution and app in draft["problem"]
    assert article_id not in [
        a["id"] for a in ok(agent.get("/api/kb", params={"q": f"{app} login"}))
    ]
    assert article_id in [
        a["id"] for a in ok(agent.get("/api/kb", params={"status": "draft", "limit": 50}))
    ]

    # The agent reviews the draft and publishes it with a cleaner problem text.
    problem = f"Tidak bisa login ke aplikasi {app} setelah ganti nomor HP, akun terblokir"
    published = ok(agent.patch(f"/api/kb/{article_id}", json={"status": "published", "problem": problem,
                                                               "tags": ["Login", app]}))  # fmt: skip
    assert published["status"] == "published" and published["published_at"] is not None
    assert (
        published["tags"] == ["login", app.lower()] and published["source_ticket_id"] == ticket_id
    )

    # Agents find it the way callers say it, typos included.
    typo = app[:-1]  # one letter short
    hits = ok(agent.get("/api/kb", params={"q": f"{typo} tdk bisa masuk"}))
    assert hits and hits[0]["id"] == article_id, hits
    assert "<mark>" in hits[0]["snippet"] and 0 < hits[0]["score"] <= 1
    assert hits[0]["language"] == "id" and hits[0]["solution"] == solution

    # Another school writes about the same problem in other words.
    second = person()
    dovecot.append(
        "helpdesk",
        mail(second, "Mohon bantuan akun diblokir",
             f"Akun {app} sekolah kami terblokir setelah nomor handphone diganti, tidak bisa login sama sekali."),
    )  # fmt: skip
    new_ticket = wait_until(lambda: ticket_of(pg_url, second), what="second mail ingested")
    assert new_ticket != ticket_id
    suggested = wait_until(
        lambda: ok(agent.get(f"/api/tickets/{new_ticket}/suggestions")),
        timeout=60,
        what="suggestions stored",
    )
    assert suggested[0]["id"] == article_id, suggested
    assert suggested[0]["rank"] == 1 and len(suggested) <= 3
    assert db.fetchval(
        pg_url, "SELECT count(*) FROM ticket_suggestions WHERE ticket_id = $1 AND article_id = $2", new_ticket, article_id
    ) == 1  # fmt: skip

    # The article helped: counted once per ticket.
    assert (
        ok(agent.post(f"/api/kb/{article_id}/used", json={"ticket_id": new_ticket}))["usage_count"]
        == 1
    )
    assert (
        ok(agent.post(f"/api/kb/{article_id}/used", json={"ticket_id": new_ticket}))["usage_count"]
        == 1
    )
    assert agent.post(f"/api/kb/{article_id}/used", json={"ticket_id": 10**12}).status_code == 404

    # The week's report counts both tickets under the article and its tags.
    # Reports are for managers and admins (the role matrix).
    manager = stack.client(role="manager")
    assert agent.get("/api/reports/kb", params={"period": "week"}).status_code == 403
    report = ok(manager.get("/api/reports/kb", params={"period": "week"}))
    [row] = [p for p in report["frequent"] if p["article_id"] == article_id] or [None]
    assert row is not None and row["tickets"] == 2, report
    assert {"tag": app.lower(), "tickets": 2, "escalated": 0} in report["by_tag"]

    # Only managers retire; a retired article is no longer suggested or found.
    assert agent.patch(f"/api/kb/{article_id}", json={"status": "retired"}).status_code == 403
    assert (
        ok(manager.patch(f"/api/kb/{article_id}", json={"status": "retired"}))["status"]
        == "retired"
    )
    assert article_id not in [
        s["id"] for s in ok(agent.get(f"/api/tickets/{new_ticket}/suggestions"))
    ]
    assert article_id not in [
        a["id"] for a in ok(agent.get("/api/kb", params={"q": f"{app} login"}))
    ]
    assert agent.patch(f"/api/kb/{article_id}", json={"status": "published"}).status_code == 403


def test_agent_writes_an_english_article_and_finds_it(stack: LoketStack) -> None:
    agent = stack.client()
    device = made_up_name("Kiosk")
    created = ok(
        agent.post("/api/kb", json={"problem": f"The {device} attendance terminal won't connect to the school Wi-Fi",
                                    "solution": "Forget the network on the terminal and enter the WPA2 password again.",
                                    "tags": ["wifi"]}),
        201,
    )  # fmt: skip
    assert created["status"] == "published" and created["language"] == "en"
    hits = ok(agent.get("/api/kb", params={"q": f"{device.lower()} not connecting to wifi"}))
    assert hits[0]["id"] == created["id"]
    assert "<mark>connect</mark>" in hits[0]["snippet"] and "won&#x27;t" in hits[0]["snippet"]
    assert agent.post("/api/kb", json={"problem": " ", "solution": "x"}).status_code == 422
    assert agent.get("/api/kb/999999999").status_code == 404
    assert agent.get("/api/tickets/999999999/suggestions").status_code == 404
