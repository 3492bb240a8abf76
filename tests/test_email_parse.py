"""MIME parsing and reply composing: real-world fixtures, hostile input, threading round trip."""

from __future__ import annotations

import hashlib
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.blobs import DiskBlobStore
from channels.email import (
    MAX_DEPTH,
    MAX_PARTS,
    compose_reply,
    html_to_text,
    parse_email,
    reply_subject,
)
from channels.types import ChannelError, OutboundReply, RawInbound
from normalizer.email import bounce_info, is_auto_reply, strip_quoted
from normalizer.threading import ticket_hints

FIXTURES = Path(__file__).parent / "fixtures" / "mail"
FIXTURE_FILES = sorted(FIXTURES.glob("*.eml"))
FIXTURE_BYTES = [path.read_bytes() for path in FIXTURE_FILES]


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    return DiskBlobStore(tmp_path / "blobs")


def parse(name: str, store: DiskBlobStore, **options: int) -> RawInbound:
    data = (FIXTURES / name).read_bytes()
    return parse_email(data, account="helpdesk", external_id=name, blobs=store, **options)


def test_there_are_enough_fixtures() -> None:
    assert len(FIXTURE_FILES) >= 15


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[path.name for path in FIXTURE_FILES])
def test_every_fixture_parses_and_keeps_the_original(path: Path, store: DiskBlobStore) -> None:
    data = path.read_bytes()
    started = time.monotonic()
    raw = parse_email(data, account="helpdesk", external_id=path.name, blobs=store)
    assert time.monotonic() - started < 5
    assert isinstance(raw, RawInbound)
    assert raw.channel == "email" and raw.account == "helpdesk" and raw.external_id == path.name
    assert store.get(raw.meta["original_sha256"]) == data
    assert raw.sender and "@" in raw.sender and raw.sender == raw.sender.lower()
    assert raw.body_text.strip()
    assert raw.headers["message-id"].startswith("<")
    for text in [raw.body_text, raw.subject or "", *raw.headers.values(), *raw.problems]:
        assert "\x00" not in text
        text.encode("utf-8")  # no lone surrogates
    for attachment in raw.attachments:
        if attachment.sha256:
            assert hashlib.sha256(store.get(attachment.sha256)).hexdigest() == attachment.sha256
            assert len(store.get(attachment.sha256)) == attachment.size


def test_gmail_plain_message(store: DiskBlobStore) -> None:
    raw = parse("gmail_plain.eml", store)
    assert raw.sender == "budi.santoso@gmail.com"
    assert raw.sender_name == "Budi Santoso"
    assert raw.subject == "Permohonan legalisir ijazah"
    assert "prosedur legalisir ijazah S1" in raw.body_text
    assert "\r" not in raw.body_text
    assert raw.body_html is not None and "legalisir" in raw.body_html
    assert raw.headers["delivered-to"] == "helpdesk@helpdesk.example.org"
    assert raw.received_at == pytest.approx(1717380757.0)  # 2024-06-03 09:12:37 +0700
    assert raw.attachments == [] and raw.problems == []


def test_gmail_reply_carries_threading_headers(store: DiskBlobStore) -> None:
    raw = parse("gmail_reply_quoting.eml", store)
    assert raw.headers["in-reply-to"] == "<loket.5.t7@helpdesk.example.org>"
    assert "<loket.5.t7@helpdesk.example.org>" in raw.headers["references"]
    assert ticket_hints(raw) == [7]
    display = strip_quoted(raw.body_text)
    assert display.startswith("Baik, terima kasih informasinya.")
    assert "Legalisir dapat dilakukan" not in display
    assert "menulis" not in display


def test_outlook_html_only_with_inline_image(store: DiskBlobStore) -> None:
    raw = parse("outlook_html_inline_image.eml", store)
    assert raw.sender == "sarah.oconnor@contoso-partners.com"
    assert raw.sender_name == "Sarah O'Connor"
    # Only HTML was sent: the text is rendered from it, without the style sheet.
    assert "visa sponsorship form" in raw.body_text
    assert "MsoNormal" not in raw.body_text and "<p" not in raw.body_text
    assert raw.body_html is not None and "<style" not in raw.body_html
    [image] = raw.attachments
    assert image.filename == "image001.png" and image.content_type == "image/png"
    assert store.get(image.sha256).startswith(b"\x89PNG\r\n\x1a\n")


def test_rfc2047_q_encoded_latin1(store: DiskBlobStore) -> None:
    raw = parse("rfc2047_q_latin1.eml", store)
    assert raw.subject == "Solicitud de información - café y año"
    assert raw.sender_name == "José García"
    assert raw.sender == "jose.garcia@correo.example.es"
    assert "¿pueden enviarme la información" in raw.body_text


def test_rfc2047_b_encoded_utf8(store: DiskBlobStore) -> None:
    raw = parse("rfc2047_b_utf8.eml", store)
    assert raw.subject == "Pengaduan layanan: antrean daring tidak bisa dibuka 🙏"
    assert raw.sender_name == "Siti Rahma Nur’aini"
    assert "aplikasi antrean daring" in raw.body_text


def test_declared_us_ascii_with_utf8_bytes(store: DiskBlobStore) -> None:
    raw = parse("wrong_charset.eml", store)
    assert "Rp 150.000 – mohon dicek. Terima kasih 🙏" in raw.body_text
    assert any("us-ascii" in problem and "UTF-8" in problem for problem in raw.problems)


def test_unknown_charset_decoded_as_latin1(store: DiskBlobStore) -> None:
    raw = parse("unknown_charset.eml", store)
    assert "bekerja di café dekat kantor" in raw.body_text
    assert "charset x-unknown-8859 unknown, decoded as latin-1" in raw.problems


def test_missing_closing_boundary_keeps_parts(store: DiskBlobStore) -> None:
    raw = parse("missing_closing_boundary.eml", store)
    assert "daftar dokumen" in raw.body_text
    [listing] = raw.attachments
    assert listing.filename == "daftar.txt"
    assert b"Kartu Keluarga" in store.get(listing.sha256)
    assert any("closing boundary" in problem for problem in raw.problems)


def test_missing_boundary_parameter_is_recovered(store: DiskBlobStore) -> None:
    raw = parse("missing_boundary_param.eml", store)
    assert (
        raw.body_text.strip() == "Bagaimana status permohonan paspor saya dengan nomor 2024-0611?"
    )
    assert raw.body_html is not None and "<p>" in raw.body_html
    assert any("boundary" in problem for problem in raw.problems)


def test_deeply_nested_multipart_is_capped(store: DiskBlobStore) -> None:
    raw = parse("deeply_nested.eml", store)
    assert "Pesan utama ada di sini." in raw.body_text
    assert "bagian terdalam" not in raw.body_text
    assert any(f"deeper than {MAX_DEPTH}" in problem for problem in raw.problems)


def test_nul_bytes_are_removed(store: DiskBlobStore) -> None:
    raw = parse("nul_bytes.eml", store)
    assert "Formulir yang saya isi tidak tersimpan." in raw.body_text
    assert "Mohon bantuan." in raw.body_text
    assert any("NUL" in problem for problem in raw.problems)


def test_huge_header_is_cut_not_fatal(store: DiskBlobStore) -> None:
    raw = parse("huge_header.eml", store)
    assert raw.subject == "Diskusi panjang tentang layanan"
    assert raw.headers["references"].startswith("<thread.0.")
    assert len(raw.headers["references"]) <= 16 * 1024
    assert any("references header" in problem for problem in raw.problems)


def test_pdf_attachment_is_stored(store: DiskBlobStore) -> None:
    raw = parse("attachment_pdf.eml", store)
    assert "Terlampir surat permohonan" in raw.body_text
    [pdf] = raw.attachments
    assert pdf.filename == "Surat Permohonan.pdf"
    assert pdf.content_type == "application/pdf"
    assert pdf.dropped is None
    content = store.get(pdf.sha256)
    assert content.startswith(b"%PDF-1.4") and len(content) == pdf.size


def test_attachment_over_the_limit_is_dropped(store: DiskBlobStore) -> None:
    raw = parse("attachment_large.eml", store, max_attachment_bytes=10_000)
    [pdf] = raw.attachments
    assert pdf.filename == "Pindaian KTP – Lina.pdf"  # RFC 2231 filename decoded
    assert pdf.sha256 == ""
    assert pdf.dropped == f"too large: {pdf.size} bytes > limit 10000"
    assert pdf.size > 10_000
    assert any("dropped" in problem for problem in raw.problems)
    # With the default limit the same file is kept.
    [kept] = parse("attachment_large.eml", store).attachments
    assert kept.dropped is None and len(store.get(kept.sha256)) == kept.size


def test_hostile_attachment_filename_is_sanitized(store: DiskBlobStore) -> None:
    raw = parse("outlook_reply_bad_filename.eml", store)
    assert strip_quoted(raw.body_text) == "Terima kasih, datanya sudah kami terima.\n\nWahyu"
    assert ticket_hints(raw) == [12]
    [attachment] = raw.attachments
    assert attachment.filename == "passwd.txt"
    assert store.get(attachment.sha256).startswith(b"root:x:0:0")


def test_out_of_office_reply(store: DiskBlobStore) -> None:
    raw = parse("out_of_office.eml", store)
    assert raw.headers["auto-submitted"] == "auto-replied"
    assert raw.headers["x-auto-response-suppress"] == "All"
    assert is_auto_reply(raw.headers, raw.subject)
    assert ticket_hints(raw) == [12]


def test_bulk_newsletter(store: DiskBlobStore) -> None:
    raw = parse("newsletter_bulk.eml", store)
    assert raw.headers["precedence"] == "bulk"
    assert raw.headers["list-id"] == "Buletin Kota <buletin.news.kota.example.id>"
    assert raw.headers["list-unsubscribe"].startswith("<https://news.kota.example.id/unsubscribe")
    assert is_auto_reply(raw.headers, raw.subject)


def test_postfix_bounce(store: DiskBlobStore) -> None:
    raw = parse("dsn_postfix_bounce.eml", store)
    assert raw.sender == "mailer-daemon@mx.helpdesk.example.org"
    assert raw.meta["dsn_original_message_id"] == "<loket.9.t3@helpdesk.example.org>"
    assert raw.meta["dsn_action"] == "failed"
    assert raw.meta["dsn_status"] == "5.1.1"
    assert raw.meta["dsn_diagnostic"].startswith("550 5.1.1 <tidak.ada@example.co.id>")
    assert "User unknown" in raw.meta["dsn_diagnostic"]
    assert raw.meta["dsn_recipient"] == "tidak.ada@example.co.id"
    original, reason = bounce_info(raw) or ("", "")
    assert original == "<loket.9.t3@helpdesk.example.org>"
    assert "5.1.1" in reason and "User unknown" in reason
    assert is_auto_reply(raw.headers, raw.subject)


def test_html_payloads_are_sanitized(store: DiskBlobStore) -> None:
    raw = parse("html_xss.eml", store)
    html = raw.body_html or ""
    assert "Selamat! Anda memenangkan hadiah." in html
    lowered = html.lower()
    for payload in (
        "<script",
        "onerror",
        "onload",
        "onmouseover",
        "javascript:",
        "<iframe",
        "alert(",
    ):
        assert payload not in lowered
    assert "judul tersembunyi" not in html
    assert "Selamat! Anda memenangkan hadiah." in raw.body_text
    assert "document.cookie" not in raw.body_text and "alert" not in raw.body_text


def test_html_to_text_keeps_structure() -> None:
    text = html_to_text(
        "<p>Satu&nbsp;dua</p><ul><li>tiga</li><li>empat</li></ul><br>lima &amp; enam"
    )
    assert text.splitlines() == ["Satu dua", "", "- tiga", "- empat", "", "lima & enam"]


# --- hostile structures built on the fly ------------------------------------------------------


def test_nesting_deeper_than_the_parser_can_recurse(store: DiskBlobStore) -> None:
    levels = 5000
    data = b"From: Tester <tester@example.org>\r\nSubject: sangat dalam\r\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(levels)
    )
    raw = parse_email(data, account="helpdesk", external_id="deep", blobs=store)
    assert raw.sender == "tester@example.org"
    assert raw.subject == "sangat dalam"
    assert raw.problems


def test_thousands_of_parts_are_capped(store: DiskBlobStore) -> None:
    parts = b"".join(
        b'--p\r\nContent-Type: application/octet-stream; name="f%d.bin"\r\n\r\nisi %d\r\n' % (i, i)
        for i in range(2000)
    )
    data = (
        b"From: a@example.org\r\nSubject: banyak\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n"
        b"--p\r\nContent-Type: text/plain\r\n\r\nbadan pesan\r\n" + parts + b"--p--\r\n"
    )
    raw = parse_email(data, account="helpdesk", external_id="many", blobs=store)
    assert raw.body_text.strip() == "badan pesan"
    assert len(raw.attachments) == MAX_PARTS - 2  # the container and the text part count too
    assert any(f"more than {MAX_PARTS}" in problem for problem in raw.problems)


def test_missing_from_falls_back_to_return_path(store: DiskBlobStore) -> None:
    data = b"Return-Path: <Bounce@Example.ORG>\r\nSubject: x\r\n\r\nisi\r\n"
    raw = parse_email(data, account="helpdesk", external_id="nofrom", blobs=store)
    assert raw.sender == "bounce@example.org"
    assert any("Return-Path" in problem for problem in raw.problems)
    empty = parse_email(
        b"Subject: x\r\n\r\nisi", account="helpdesk", external_id="none", blobs=store
    )
    assert empty.sender == ""
    assert any("no sender" in problem for problem in empty.problems)


def test_unparsable_date_uses_now(store: DiskBlobStore) -> None:
    data = b"From: a@example.org\r\nDate: kemarin sore\r\n\r\nisi\r\n"
    before = time.time()
    raw = parse_email(data, account="helpdesk", external_id="date", blobs=store)
    assert before <= raw.received_at <= time.time()
    assert any("Date header" in problem for problem in raw.problems)


def test_codec_names_that_are_not_text_encodings(store: DiskBlobStore) -> None:
    data = b"From: a@example.org\r\nContent-Type: text/plain; charset=zlib_codec\r\n\r\nhalo\r\n"
    raw = parse_email(data, account="helpdesk", external_id="zlib", blobs=store)
    assert raw.body_text.strip() == "halo"
    assert any("zlib_codec" in problem for problem in raw.problems)


# --- property tests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> DiskBlobStore:
    return DiskBlobStore(tmp_path_factory.mktemp("fuzz-blobs"))


def _check(raw: object) -> None:
    assert isinstance(raw, RawInbound)
    assert isinstance(raw.body_text, str) and "\x00" not in raw.body_text
    raw.body_text.encode("utf-8")
    for value in raw.headers.values():
        value.encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise(shared_store: DiskBlobStore, data: bytes) -> None:
    _check(parse_email(data, account="fuzz", external_id="x", blobs=shared_store))


@st.composite
def mutated_fixtures(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(FIXTURE_BYTES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        operation = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        if operation == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif operation == "insert":
            data[position:position] = draw(
                st.sampled_from(
                    [b"\x00", b"\r\n", b"--", b"=?", b"?=", b";", b'"', b"\xff\xfe", b"=\r\n"]
                )
                | st.binary(max_size=16)
            )
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif operation == "truncate":
            del data[position:]
        elif operation == "duplicate":
            data[position:position] = data[position : position + draw(st.integers(1, 512))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_fixtures())
def test_mutated_fixtures_never_raise(shared_store: DiskBlobStore, data: bytes) -> None:
    _check(parse_email(data, account="fuzz", external_id="x", blobs=shared_store))


_HEADER_VALUES = st.sampled_from(
    [
        "=?utf-8?b?w6k=?=",
        "=?x-bogus?q?abc?=",
        "=?utf-8?q?broken",
        '"unterminated <a@b',
        "a@b, , <>, (comment",
        "Group: a@b, c@d;",
        "\udcff\udcfe",
        "<loket.1.t2@x> <loket.3",
    ]
) | st.text(max_size=60)


@st.composite
def structured_messages(draw: st.DrawFn) -> bytes:
    charset = draw(
        st.sampled_from(["utf-8", "us-ascii", "x-bogus", "utf-7", "iso-2022-jp", "zlib_codec", ""])
    )
    encoding = draw(
        st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "bogus"])
    )
    subtype = draw(
        st.sampled_from(
            ["plain", "html", "mixed", "alternative", "report", "rfc822", "delivery-status"]
        )
    )
    maintype = {"mixed": "multipart", "alternative": "multipart", "report": "multipart"}.get(
        subtype, "text"
    )
    if subtype in ("rfc822", "delivery-status"):
        maintype = "message"
    headers = [
        f"{name}: {draw(_HEADER_VALUES)}"
        for name in draw(
            st.lists(
                st.sampled_from(
                    ["From", "To", "Subject", "Date", "References", "In-Reply-To", "Sender"]
                ),
                max_size=6,
            )
        )
    ]
    boundary = draw(st.sampled_from(["", "; boundary=b", '; boundary="b"', "; boundary="]))
    headers.append(
        f"Content-Type: {maintype}/{subtype}; charset={charset}{boundary}; report-type=delivery-status"
    )
    headers.append(f"Content-Transfer-Encoding: {encoding}")
    body = draw(st.binary(max_size=512))
    parts = draw(st.lists(st.binary(max_size=128), max_size=4))
    text = "\r\n".join(headers).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body
    for part in parts:
        text += b"\r\n--b\r\n" + part
    if draw(st.booleans()):
        text += b"\r\n--b--\r\n"
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=structured_messages())
def test_structured_garbage_never_raises(shared_store: DiskBlobStore, data: bytes) -> None:
    _check(parse_email(data, account="fuzz", external_id="x", blobs=shared_store))


# --- composing replies ------------------------------------------------------------------------


def _reply(**changes: object) -> OutboundReply:
    fields: dict[str, object] = {
        "message_id": 15,
        "ticket_id": 7,
        "channel": "email",
        "account": "helpdesk",
        "recipient": "budi.santoso@gmail.com",
        "subject": "Re: Re: Permohonan legalisir ijazah [#7]",
        "body_text": "Selamat siang Bapak Budi,\n\nBerkas sudah kami terima — terima kasih.\n",
        "headers": {
            "in-reply-to": "<CAF3x9vR2pQ+1t0Uv9XwYz8nB7cD6eF5gH4iJ3kL2mN1oP0qR9s@mail.gmail.com>",
            "references": "<loket.5.t7@helpdesk.example.org>",
        },
    }
    fields.update(changes)
    return OutboundReply(**fields)  # type: ignore[arg-type]


def test_compose_reply_headers() -> None:
    message = compose_reply(
        _reply(), from_address="helpdesk@helpdesk.example.org", from_name="Loket Helpdesk"
    )
    assert message["To"] == "budi.santoso@gmail.com"
    assert message["From"] == "Loket Helpdesk <helpdesk@helpdesk.example.org>"
    assert message["Subject"] == "Re: Permohonan legalisir ijazah [#7]"
    assert message["Message-ID"] == "<loket.15.t7@helpdesk.example.org>"
    assert message["In-Reply-To"] == _reply().headers["in-reply-to"]
    assert message["References"].split() == [
        "<loket.5.t7@helpdesk.example.org>",
        _reply().headers["in-reply-to"],
    ]
    assert message["Reply-To"] == "helpdesk+t7@helpdesk.example.org"
    assert message["Date"]
    assert message.get_content_charset() == "utf-8"
    assert message.get_content() == _reply().body_text


def test_compose_reply_rejects_a_bad_recipient() -> None:
    with pytest.raises(ChannelError) as failure:
        compose_reply(
            _reply(recipient="bukan alamat"), from_address="helpdesk@helpdesk.example.org"
        )
    assert failure.value.permanent


def test_reply_subject_forms() -> None:
    assert reply_subject("Permohonan", 7, replying=True) == "Re: Permohonan [#7]"
    assert reply_subject("RE: re: Permohonan [#7]", 7, replying=True) == "Re: Permohonan [#7]"
    assert reply_subject("Re: [#7] Re: Permohonan", 7, replying=True) == "Re: Permohonan [#7]"
    assert reply_subject("Permohonan [#7]", 7, replying=False) == "Permohonan [#7]"
    assert reply_subject(None, 7, replying=False) == "[#7]"
    assert reply_subject("Line\r\nbreak", 7, replying=False) == "Line break [#7]"


def test_threading_round_trip(store: DiskBlobStore) -> None:
    reply = _reply(body_text="Mohon datang ke loket 3. " * 40 + "\nSalam — Tim Helpdesk 🙏\n")
    message = compose_reply(reply, from_address="helpdesk@helpdesk.example.org", from_name="Loket")
    wire = message.as_bytes(policy=policy.SMTP)
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    raw = parse_email(wire, account="helpdesk", external_id="rt", blobs=store)
    assert raw.problems == []
    assert raw.sender == "helpdesk@helpdesk.example.org"
    assert raw.subject == "Re: Permohonan legalisir ijazah [#7]"
    assert raw.body_text == reply.body_text
    assert raw.headers["message-id"] == "<loket.15.t7@helpdesk.example.org>"

    # The customer's answer to it: threading works through each marker alone.
    answer = (
        "From: Budi <budi.santoso@gmail.com>\r\n"
        "To: Loket <helpdesk+t7@helpdesk.example.org>\r\n"
        f"Subject: Re: {raw.subject}\r\n"
        f"In-Reply-To: {raw.headers['message-id']}\r\n"
        f"References: {message['References']} {raw.headers['message-id']}\r\n"
        "\r\nBaik, terima kasih.\r\n"
    ).encode()
    answered = parse_email(answer, account="helpdesk", external_id="answer", blobs=store)
    assert ticket_hints(answered) == [7]
    only_address = BytesParser(policy=policy.default).parsebytes(answer)
    del only_address["In-Reply-To"], only_address["References"], only_address["Subject"]
    parsed = parse_email(bytes(only_address), account="helpdesk", external_id="addr", blobs=store)
    assert ticket_hints(parsed) == [7]


def test_unknown_charset_in_encoded_words(store: DiskBlobStore) -> None:
    data = (
        b"From: =?x-foo?q?Bud=E9?= <Budi@Example.ORG>\r\n"
        b"Subject: Re: =?x-foo?q?caf=E9?= dan =?utf-8?q?kopi?= ok\r\n\r\nhalo\r\n"
    )
    raw = parse_email(data, account="helpdesk", external_id="words", blobs=store)
    assert raw.sender == "budi@example.org"
    assert raw.sender_name == "Budé"
    assert raw.subject == "Re: café dan kopi ok"
    assert "subject header: charset x-foo unknown, decoded as latin-1" in raw.problems


def test_raw_utf8_headers(store: DiskBlobStore) -> None:
    data = "From: Budi Śantoso <budi@example.org>\r\nSubject: Tolong – café\r\n\r\nhalo\r\n"
    raw = parse_email(data.encode(), account="helpdesk", external_id="8bit", blobs=store)
    assert raw.sender_name == "Budi Śantoso"
    assert raw.subject == "Tolong – café"
