"""E-mail end to end: Dovecot in, tickets in PostgreSQL, replies out through SMTP."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import pytest

from tests.support import db
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures" / "mail"
HELPDESK = "helpdesk@helpdesk.example.org"


def person() -> str:
    return f"guru.{uuid.uuid4().hex[:10]}@sekolah.example.id"


def mail(sender: str, subject: str, body: str, **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Ibu Guru <{sender}>"
    message["To"] = HELPDESK
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="sekolah.example.id")
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content(body)
    return message


def tickets_of(pg_url: str, sender: str) -> list[dict]:
    return db.fetch(
        pg_url,
        "SELECT DISTINCT t.id, t.status FROM tickets t JOIN messages m ON m.ticket_id = t.id"
        " WHERE m.sender = $1 ORDER BY t.id",
        sender,
    )


def messages_from(pg_url: str, sender: str) -> list[dict]:
    return db.fetch(pg_url, "SELECT * FROM messages WHERE sender = $1 ORDER BY id", sender)


def test_mail_becomes_ticket_and_reply_threads_back(
    stack: LoketStack, dovecot: DovecotServer, smtp: SmtpServer, pg_url: str
) -> None:
    sender = person()
    dovecot.append(
        "helpdesk", mail(sender, "Internet sekolah putus", "Sejak Senin internet mati.").as_bytes()
    )
    rows = wait_until(lambda: messages_from(pg_url, sender), what="mail ingested")
    ticket_id = rows[0]["ticket_id"]

    agent = stack.client()
    ticket = agent.get(f"/api/tickets/{ticket_id}").json()
    assert ticket["status"] == "open" and ticket["tier"] == "agent"
    assert ticket["subject"] == "Internet sekolah putus"
    [inbound] = ticket["messages"]
    assert inbound["direction"] == "in" and inbound["channel"] == "email"
    assert "internet mati" in inbound["body_text"]
    original_id = db.fetchval(
        pg_url, "SELECT headers->>'message-id' FROM messages WHERE id = $1", inbound["id"]
    )

    response = agent.post(
        f"/api/tickets/{ticket_id}/replies", json={"body": "Mohon restart router sekolah."}
    )
    assert response.status_code == 201, response.text
    reply_id = response.json()["id"]
    received = smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30)
    out = received.message
    assert f"[#{ticket_id}]" in out["Subject"]
    assert out["In-Reply-To"] == original_id
    assert original_id in out["References"]
    assert out["Message-ID"].startswith("<loket.")
    assert f"+t{ticket_id}@" in out["Reply-To"]
    assert "restart router" in out.get_content()
    wait_until(
        lambda: (
            db.fetchval(pg_url, "SELECT status FROM messages WHERE id = $1", reply_id) == "sent"
        ),
        what="reply marked sent",
    )

    # The person answers from another address (a colleague), threaded only by our headers.
    colleague = person()
    answer = mail(
        colleague,
        f"Re: {out['Subject']}",
        "Sudah direstart, masih mati.\n\n> Mohon restart",
        In_Reply_To=out["Message-ID"],
        References=out["Message-ID"],
    )
    dovecot.append("helpdesk", answer.as_bytes())
    rows = wait_until(lambda: messages_from(pg_url, colleague), what="answer ingested")
    assert rows[0]["ticket_id"] == ticket_id
    assert rows[0]["body_display"].strip() == "Sudah direstart, masih mati."


def test_same_mail_delivered_twice_is_one_message(
    stack: LoketStack, dovecot: DovecotServer, pg_url: str
) -> None:
    sender = person()
    data = mail(sender, "Dapodik tidak bisa login", "Akun operator terkunci.").as_bytes()
    dovecot.append_many("helpdesk", [data, data])
    follow = mail(sender, "Tambahan", "Ini pesan berikutnya.").as_bytes()
    dovecot.append("helpdesk", follow)
    wait_until(lambda: len(messages_from(pg_url, sender)) >= 2, what="both mails ingested")
    rows = messages_from(pg_url, sender)
    assert len(rows) == 2
    assert len({r["ticket_id"] for r in rows}) == 1


def test_malformed_mail_is_kept_and_the_next_still_flows(
    stack: LoketStack, dovecot: DovecotServer, pg_url: str
) -> None:
    corpus = sorted(FIXTURES.glob("*.eml"))
    assert len(corpus) >= 10
    marker = uuid.uuid4().hex
    batch = []
    for path in corpus:
        data = path.read_bytes()
        # Give every fixture a fresh Message-ID so reruns against one mailbox stay distinct.
        batch.append(b"Message-ID: <" + f"{marker}.{path.stem}@fixtures".encode() + b">\r\n" + data)
    sender = person()
    batch.append(mail(sender, "Setelah korpus", "Pesan normal sesudah pesan rusak.").as_bytes())
    dovecot.append_many("helpdesk", batch)
    wait_until(
        lambda: messages_from(pg_url, sender), timeout=60, what="normal mail after the corpus"
    )

    def stored() -> int:
        return db.fetchval(
            pg_url, "SELECT count(*) FROM messages WHERE external_id LIKE $1", f"<{marker}.%"
        )

    # The parser keeps whatever parses, so every one of them must be stored, problems noted.
    wait_until(
        lambda: stored() == len(corpus), timeout=60, what=f"all {len(corpus)} corpus mails stored"
    )
    noted = db.fetchval(
        pg_url,
        "SELECT count(*) FROM messages WHERE external_id LIKE $1 AND cardinality(problems) > 0",
        f"<{marker}.%",
    )
    assert noted >= 3


def test_auto_reply_does_not_loop(
    stack: LoketStack, dovecot: DovecotServer, smtp: SmtpServer, pg_url: str
) -> None:
    sender = person()
    dovecot.append(
        "helpdesk", mail(sender, "Printer rusak", "Printer kantor tidak menyala.").as_bytes()
    )
    ticket_id = wait_until(lambda: messages_from(pg_url, sender), what="mail ingested")[0][
        "ticket_id"
    ]
    agent = stack.client()
    agent.post(
        f"/api/tickets/{ticket_id}/replies", json={"body": "Sudah kami catat."}
    ).raise_for_status()
    ours = smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30).message
    closed = agent.post(
        f"/api/tickets/{ticket_id}/transitions",
        json={"action": "close", "reason": "resolved", "solution": "Kabel daya diganti."},
    )
    assert closed.status_code == 200, closed.text
    sent_before = len([m for m in smtp.received if sender in m.rcpt_tos])

    auto = mail(
        sender,
        f"Automatic reply: {ours['Subject']}",
        "Saya sedang cuti sampai Senin.",
        Auto_Submitted="auto-replied",
        In_Reply_To=ours["Message-ID"],
    )
    dovecot.append("helpdesk", auto.as_bytes())
    wait_until(lambda: len(messages_from(pg_url, sender)) == 2, what="auto-reply stored")
    stored = messages_from(pg_url, sender)[-1]
    assert stored["auto_reply"] is True
    assert stored["ticket_id"] == ticket_id
    status = db.fetchval(pg_url, "SELECT status FROM tickets WHERE id = $1", ticket_id)
    assert status == "closed"  # an auto-reply never reopens a ticket
    events = db.fetch(pg_url, "SELECT kind FROM ticket_events WHERE ticket_id = $1", ticket_id)
    assert "reopened" not in {e["kind"] for e in events}
    outbound = db.fetchval(
        pg_url,
        "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'out'",
        ticket_id,
    )
    assert outbound == 1
    assert len([m for m in smtp.received if sender in m.rcpt_tos]) == sent_before


def test_bounce_marks_the_reply_failed(
    stack: LoketStack, dovecot: DovecotServer, smtp: SmtpServer, pg_url: str
) -> None:
    sender = person()
    dovecot.append(
        "helpdesk", mail(sender, "Akun email sekolah", "Tolong buatkan akun.").as_bytes()
    )
    ticket_id = wait_until(lambda: messages_from(pg_url, sender), what="mail ingested")[0][
        "ticket_id"
    ]
    agent = stack.client()
    reply_id = agent.post(
        f"/api/tickets/{ticket_id}/replies", json={"body": "Akun dibuat."}
    ).json()["id"]
    ours = smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30).message
    bounce = dsn(ours["Message-ID"], sender)
    dovecot.append("helpdesk", bounce)
    wait_until(
        lambda: (
            db.fetchval(pg_url, "SELECT status FROM messages WHERE id = $1", reply_id) == "failed"
        ),
        what="reply marked failed",
    )
    reason = db.fetchval(pg_url, "SELECT status_reason FROM messages WHERE id = $1", reply_id)
    assert "5.1.1" in reason
    detail = agent.get(f"/api/tickets/{ticket_id}").json()
    assert [m["status"] for m in detail["messages"] if m["id"] == reply_id] == ["failed"]


def test_smtp_4xx_is_retried_and_5xx_fails(
    stack: LoketStack, dovecot: DovecotServer, smtp: SmtpServer, pg_url: str
) -> None:
    sender = person()
    dovecot.append("helpdesk", mail(sender, "Nilai rapor", "Nilai tidak muncul.").as_bytes())
    ticket_id = wait_until(lambda: messages_from(pg_url, sender), what="mail ingested")[0][
        "ticket_id"
    ]
    agent = stack.client()
    smtp.fail_next(1, code=451, text="4.3.0 try again later")
    reply_id = agent.post(
        f"/api/tickets/{ticket_id}/replies", json={"body": "Sedang dicek."}
    ).json()["id"]
    wait_until(
        lambda: (
            db.fetchval(pg_url, "SELECT status_reason FROM messages WHERE id = $1", reply_id) or ""
        ).startswith("retrying"),
        what="retry noted",
    )
    smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=40)
    wait_until(
        lambda: (
            db.fetchval(pg_url, "SELECT status FROM messages WHERE id = $1", reply_id) == "sent"
        ),
        what="sent after retry",
    )

    smtp.fail_next(1, code=550, text="5.7.1 relaying denied")
    failed_id = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": "Kedua."}).json()[
        "id"
    ]
    wait_until(
        lambda: (
            db.fetchval(pg_url, "SELECT status FROM messages WHERE id = $1", failed_id) == "failed"
        ),
        what="permanent failure",
    )
    assert "550" in db.fetchval(
        pg_url, "SELECT status_reason FROM messages WHERE id = $1", failed_id
    )


def dsn(original_message_id: str, recipient: str) -> bytes:
    """A Postfix-style delivery status notification for one of our replies."""
    boundary = "DSN-" + uuid.uuid4().hex
    return f"""Return-Path: <>
From: MAILER-DAEMON@mx.sekolah.example.id (Mail Delivery System)
To: {HELPDESK}
Subject: Undelivered Mail Returned to Sender
Date: {format_datetime(datetime.now(UTC))}
Message-ID: <{uuid.uuid4().hex}@mx.sekolah.example.id>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"

--{boundary}
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.sekolah.example.id.
I'm sorry to have to inform you that your message could not be delivered.

--{boundary}
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sekolah.example.id

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown

--{boundary}
Content-Type: text/rfc822-headers

From: {HELPDESK}
To: {recipient}
Subject: Re: Akun email sekolah
Message-ID: {original_message_id}

--{boundary}--
""".replace("\n", "\r\n").encode()
