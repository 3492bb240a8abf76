"""Fax end to end: fax-to-email mail in Dovecot, OCR, a fax-identified ticket, PDF replies via SMTP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import db, faxgen
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow

FAX_ACCOUNT = "fax-main"
FAX_USER = "faxin"
FAX_PASSWORD = "fax-imap-secret-456"
FAX_ADDRESS = "faxin@helpdesk.example.org"
SERVICE = "Layanan Faks <faxmail@faxgateway.example.net>"
NUMBER = "021-7418780"
NUMBER_E164 = "+62217418780"
NO_NUMBER = "sender unknown: no fax number found"


@dataclass
class FaxSetup:
    stack: LoketStack
    dovecot: DovecotServer
    smtp: SmtpServer
    pg_url: str


def fax_config(dovecot: DovecotServer, smtp: SmtpServer) -> str:
    return f"""
[[channels.fax]]
name = "{FAX_ACCOUNT}"
address = "{FAX_ADDRESS}"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_user = "{FAX_USER}"
imap_password = "env:TEST_FAX_IMAP_PASSWORD"
imap_tls = "none"
number_source = "subject"
gateway_address = "{{number}}@fax.example.net"
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
smtp_tls = "none"
"""


@pytest.fixture(scope="module")
def fax(
    dovecot: DovecotServer, smtp: SmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaxSetup]:
    """A stack of its own (database, broker) reading the `faxin` mailbox of the session Dovecot."""
    dovecot.add_user(FAX_USER, FAX_PASSWORD)
    pg_url = db.create_database("loket_fax")
    broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("fax-tansu"))
    stack = LoketStack(
        database_url=pg_url, bootstrap=broker.bootstrap, config_text=fax_config(dovecot, smtp),
        workdir=tmp_path_factory.mktemp("loket-fax"), extra_env={"TEST_FAX_IMAP_PASSWORD": FAX_PASSWORD},
    )  # fmt: skip
    try:
        stack.up()
        yield FaxSetup(stack, dovecot, smtp, pg_url)
    finally:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)


@pytest.fixture(scope="module")
def agent(fax: FaxSetup) -> Iterator[httpx.Client]:
    client = fax.stack.client()
    yield client
    client.close()


def fax_mail(subject: str, cover: str, documents: list[tuple[str, str, bytes]]) -> EmailMessage:
    """A fax-to-email message: cover text and the fax as attachments (filename, MIME type, bytes)."""
    message = EmailMessage()
    message["From"] = SERVICE
    message["To"] = FAX_ADDRESS
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="faxgateway.example.net")
    message.set_content(cover)
    for filename, mime, data in documents:
        maintype, subtype = mime.split("/")
        message.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return message


def deliver(fax: FaxSetup, message: EmailMessage) -> dict[str, Any]:
    """Put the fax in the mailbox and wait for its message row (OCR included)."""
    fax.dovecot.append(FAX_USER, message.as_bytes())
    external_id = message["Message-ID"]

    def stored() -> list[dict[str, Any]]:
        return db.fetch(
            fax.pg_url,
            "SELECT * FROM messages WHERE direction = 'in' AND external_id = $1",
            external_id,
        )

    [row] = wait_until(stored, timeout=90, what=f"fax {external_id} stored")
    return row


def attachments_of(pg_url: str, message_id: int) -> list[dict[str, Any]]:
    return db.fetch(
        pg_url, "SELECT * FROM attachments WHERE message_id = $1 ORDER BY id", message_id
    )


def identities_of(pg_url: str, caller_id: int) -> list[tuple[str, str]]:
    rows = db.fetch(
        pg_url, "SELECT kind, value FROM identities WHERE caller_id = $1 ORDER BY id", caller_id
    )
    return [(r["kind"], r["value"]) for r in rows]


def meta_of(row: dict[str, Any]) -> dict[str, str]:
    meta = row["meta"]
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def pdf_text(data: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reply.pdf"
        path.write_bytes(data)
        done = subprocess.run(
            ["pdftotext", str(path), "-"], capture_output=True, check=True, timeout=30
        )
    return done.stdout.decode()


def test_pdf_fax_becomes_ticket_and_reply_goes_out_as_pdf(fax: FaxSetup, agent: httpx.Client,
                                                          artifacts: Path) -> None:  # fmt: skip
    pdf = faxgen.text_pdf()
    cover = "Anda menerima faks 2 halaman."
    row = deliver(
        fax, fax_mail(f"Fax from {NUMBER}", cover, [("faks.pdf", "application/pdf", pdf)])
    )
    assert row["channel"] == "fax" and row["account"] == FAX_ACCOUNT
    body = row["body_text"]
    assert body.startswith(cover)
    for words in (
        "Pusat Layanan Kementerian",
        "mengakses internet sejak Senin",
        "komputer laboratorium",
    ):
        assert words in body, body
    assert row["problems"] == []
    assert identities_of(fax.pg_url, row["caller_id"]) == [("fax", NUMBER_E164)]
    [stored] = attachments_of(fax.pg_url, row["id"])
    assert stored["filename"] == "faks.pdf" and stored["content_type"] == "application/pdf"
    assert stored["sha256"] == hashlib.sha256(pdf).hexdigest()
    meta = meta_of(row)
    assert meta["fax_number"] == NUMBER and meta["ocr_pages"] == "2"
    seconds = float(meta["ocr_seconds_per_page"])
    assert seconds > 0
    (artifacts / "fax_ocr_pdf.json").write_text(
        json.dumps({"ocr_seconds_per_page": seconds, "pages": 2})
    )
    print(f"\nOCR of a text PDF: {seconds:.3f} s per page")

    ticket = agent.get(f"/api/tickets/{row['ticket_id']}").json()
    assert ticket["channel"] == "fax" and ticket["status"] == "open"
    response = agent.post(f"/api/tickets/{row['ticket_id']}/replies",
                          json={"body": "Teknisi kami akan datang hari Kamis."})  # fmt: skip
    assert response.status_code == 201, response.text
    reply = response.json()
    assert reply["channel"] == "fax"
    gateway = f"{NUMBER_E164[1:]}@fax.example.net"
    received = fax.smtp.wait_for(lambda m: gateway in m.rcpt_tos, timeout=30)
    out = received.message
    assert out["From"] == FAX_ADDRESS
    [attached] = [
        part for part in out.iter_attachments() if part.get_content_type() == "application/pdf"
    ]
    document = attached.get_content()
    assert document.startswith(b"%PDF")
    assert "Teknisi kami akan datang hari Kamis." in pdf_text(document)

    def sent() -> dict[str, Any] | None:
        rows = db.fetch(
            fax.pg_url, "SELECT status, provider_id FROM messages WHERE id = $1", reply["id"]
        )
        return rows[0] if rows and rows[0]["status"] == "sent" else None

    assert wait_until(sent, what="reply marked sent")["provider_id"] == out["Message-ID"]


def test_tiff_fax_is_read_page_by_page(fax: FaxSetup, artifacts: Path) -> None:
    tiff = faxgen.multipage_tiff()
    row = deliver(fax, fax_mail(f"Fax from {NUMBER}", "", [("faks.tif", "image/tiff", tiff)]))
    for words in ("Kepala Sekolah", "tidak dapat digunakan untuk ujian"):
        assert words in row["body_text"], row["body_text"]
    assert identities_of(fax.pg_url, row["caller_id"]) == [("fax", NUMBER_E164)]
    [stored] = attachments_of(fax.pg_url, row["id"])
    assert (
        stored["content_type"] == "image/tiff"
        and stored["sha256"] == hashlib.sha256(tiff).hexdigest()
    )
    meta = meta_of(row)
    assert meta["ocr_pages"] == "2"
    seconds = float(meta["ocr_seconds_per_page"])
    (artifacts / "fax_ocr_tiff.json").write_text(
        json.dumps({"ocr_seconds_per_page": seconds, "pages": 2})
    )
    print(f"\nOCR of a G4 TIFF: {seconds:.3f} s per page")


def test_corrupt_pdf_fax_is_kept_and_flagged(fax: FaxSetup) -> None:
    broken = b"%PDF-1.4\n" + os.urandom(2048)
    row = deliver(
        fax, fax_mail("Fax from 0274-512345", "", [("rusak.pdf", "application/pdf", broken)])
    )
    assert any(
        "rusak.pdf" in problem and "could not be read" in problem for problem in row["problems"]
    ), row
    [stored] = attachments_of(fax.pg_url, row["id"])
    assert stored["sha256"] == hashlib.sha256(broken).hexdigest()
    assert identities_of(fax.pg_url, row["caller_id"]) == [("fax", "+62274512345")]
    ticket = db.fetch(fax.pg_url, "SELECT status FROM tickets WHERE id = $1", row["ticket_id"])
    assert ticket == [{"status": "open"}]


def test_fax_without_number_is_ingested_as_sender_unknown(
    fax: FaxSetup, agent: httpx.Client
) -> None:
    row = deliver(fax, fax_mail("Faks masuk", "Nomor pengirim disembunyikan.",
                                [("faks.pdf", "application/pdf", faxgen.text_pdf())]))  # fmt: skip
    assert NO_NUMBER in row["problems"]
    assert "Pusat Layanan Kementerian" in row["body_text"]
    assert "fax_number" not in meta_of(row)
    assert identities_of(fax.pg_url, row["caller_id"]) == []
    # Nobody to fax back to: the reply fails for good, with the reason shown to the agent.
    reply = agent.post(
        f"/api/tickets/{row['ticket_id']}/replies", json={"body": "Mohon sertakan nomor."}
    ).json()

    def failed() -> dict[str, Any] | None:
        rows = db.fetch(
            fax.pg_url, "SELECT status, status_reason FROM messages WHERE id = $1", reply["id"]
        )
        return rows[0] if rows and rows[0]["status"] == "failed" else None

    assert (
        wait_until(failed, what="reply failed")["status_reason"]
        == "no fax number known for this caller"
    )
