"""E-mail identity, quote stripping, auto-reply and bounce detection, threading markers."""

from __future__ import annotations

import pytest

from channels.types import Identity, RawInbound
from normalizer.email import bounce_info, email_identity, is_auto_reply, strip_quoted
from normalizer.threading import (
    make_message_id,
    make_reply_address,
    subject_token,
    ticket_hints,
)


def raw_mail(
    headers: dict[str, str] | None = None, subject: str | None = None, **meta: str
) -> RawInbound:
    return RawInbound(
        channel="email",
        account="helpdesk",
        external_id="1",
        sender="budi@example.org",
        subject=subject,
        headers=headers or {},
        meta=dict(meta),
    )


# --- identity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "name", "expected"),
    [
        (
            "Budi.Santoso@Gmail.COM",
            "Budi Santoso",
            Identity("email", "budi.santoso@gmail.com", "Budi Santoso"),
        ),
        (" <siti@yahoo.co.id> ", None, Identity("email", "siti@yahoo.co.id", None)),
        ("mailto:andi@example.co.id", "", Identity("email", "andi@example.co.id", None)),
        ("Rina <rina@example.net>", None, Identity("email", "rina@example.net", "Rina")),
        (
            "user+tag@sub.example.org",
            '"Quoted\u200b Name"',
            Identity("email", "user+tag@sub.example.org", "Quoted Name"),
        ),
    ],
)
def test_email_identity(address: str, name: str | None, expected: Identity) -> None:
    assert email_identity(address, name) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        "budi",
        "budi@",
        "@example.org",
        "a@b@c.org",
        "budi@localhost",
        "bu di@example.org",
        "a\x00@b.org",
        "x" * 65 + "@example.org",
    ],
)
def test_email_identity_rejects_garbage(address: str) -> None:
    assert email_identity(address, "Nama") is None


# --- quoted replies --------------------------------------------------------------------------


def test_strip_gmail_english_attribution() -> None:
    text = (
        "Thanks, that solved it.\n\n"
        "On Mon, Jun 3, 2024 at 10:15 AM Loket Helpdesk <helpdesk@helpdesk.example.org> wrote:\n\n"
        "> Please restart the application.\n>\n> Regards\n"
    )
    assert strip_quoted(text) == "Thanks, that solved it."


def test_strip_gmail_indonesian_two_line_attribution() -> None:
    text = (
        "Baik, saya tunggu kabarnya.\n\n"
        "Pada Sel, 4 Jun 2024 pukul 09.00 Loket Helpdesk <helpdesk@helpdesk.example.org>\n"
        "menulis:\n\n"
        "> Berkas Anda sedang kami proses.\n"
    )
    assert strip_quoted(text) == "Baik, saya tunggu kabarnya."


def test_strip_interleaved_reply_keeps_answers() -> None:
    text = (
        "On Tue, 4 Jun 2024, Loket wrote:\n"
        "> Nomor KTP Anda?\n"
        "3171234567890001\n"
        "> Alamat?\n"
        "Jl. Merdeka 10, Jakarta\n"
    )
    assert strip_quoted(text) == "3171234567890001\nJl. Merdeka 10, Jakarta"


def test_strip_attribution_followed_by_unmarked_quote() -> None:
    text = "Sudah saya kirim ulang.\n\nOn 4 Jun 2024, at 09:00, Loket wrote:\n\nMohon kirim ulang berkas.\n"
    assert strip_quoted(text) == "Sudah saya kirim ulang."


def test_strip_outlook_original_message() -> None:
    text = (
        "Please find the form attached.\r\n\r\n"
        "-----Original Message-----\r\n"
        "From: Loket Helpdesk [mailto:helpdesk@helpdesk.example.org]\r\n"
        "Sent: Tuesday, June 4, 2024 9:00 AM\r\n"
        "Subject: RE: Form [#5]\r\n\r\nPlease send the form.\r\n"
    )
    assert strip_quoted(text) == "Please find the form attached."


def test_strip_outlook_header_block_in_indonesian() -> None:
    text = (
        "Terima kasih, datanya sudah kami terima.\n\nWahyu\n\n"
        "________________________________\n"
        "Dari: Loket Helpdesk <helpdesk@helpdesk.example.org>\n"
        "Dikirim: Selasa, 11 Juni 2024 16.02\n"
        "Kepada: Wahyu Pratama\n\nBerikut data statistik yang Bapak minta.\n"
    )
    assert strip_quoted(text) == "Terima kasih, datanya sudah kami terima.\n\nWahyu"


def test_strip_outlook_english_header_block() -> None:
    text = (
        "Confirmed.\n\nFrom: Loket Helpdesk <helpdesk@helpdesk.example.org>\n"
        "Sent: Tuesday, June 4, 2024 9:00 AM\nTo: Sarah\nSubject: Visa letter\n\nDear Sarah,\n"
    )
    assert strip_quoted(text) == "Confirmed."


@pytest.mark.parametrize(
    "trailer",
    [
        "-- \nBudi Santoso\nStaf TU",
        "Sent from my iPhone",
        "Dikirim dari iPhone saya",
        "Dikirim dari Yahoo Mail di Android",
    ],
)
def test_strip_signatures_and_mobile_trailers(trailer: str) -> None:
    assert strip_quoted(f"Saya sudah di loket 3.\n\n{trailer}\n") == "Saya sudah di loket 3."


def test_strip_keeps_plain_text_and_a_from_line_without_header_block() -> None:
    text = "From: my experience the queue is slow.\nPlease fix it."
    assert strip_quoted(text) == text


def test_strip_never_returns_empty() -> None:
    only_quote = "> Semua teks dikutip.\n> Tidak ada jawaban.\n"
    assert strip_quoted(only_quote) == only_quote
    assert strip_quoted("") == ""
    only_signature = "-- \nBudi"
    assert strip_quoted(only_signature) == only_signature


# --- auto-replies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        ({"auto-submitted": "auto-replied"}, "Re: Permohonan"),
        ({"auto-submitted": "auto-generated; owner-email=x@y.org"}, None),
        ({"precedence": "bulk"}, "Buletin"),
        ({"precedence": "Junk"}, "x"),
        ({"precedence": "list"}, "x"),
        ({"precedence": "auto_reply"}, "x"),
        ({"x-autoreply": "yes"}, "x"),
        ({"x-autorespond": "Out of office"}, "x"),
        ({"x-auto-response-suppress": "All"}, "x"),
        ({"x-auto-response-suppress": "DR, OOF, AutoReply"}, "x"),
        ({"from": "MAILER-DAEMON@mx.example.org (Mail Delivery System)"}, "x"),
        ({"from": "Postmaster <postmaster@example.co.id>"}, "x"),
        ({"return-path": "<>"}, "x"),
        ({}, "Out of Office: Budi"),
        ({}, "Automatic reply: Permohonan data [#12]"),
        ({}, "Auto: Permohonan"),
        ({}, "Balasan otomatis: Re: Permohonan data [#12]"),
        ({}, "Di luar kantor sampai 14 Juni"),
        ({}, "Re: AutoReply"),
    ],
)
def test_is_auto_reply_true(headers: dict[str, str], subject: str | None) -> None:
    assert is_auto_reply(headers, subject)


@pytest.mark.parametrize(
    ("headers", "subject"),
    [
        ({"auto-submitted": "no"}, "Permohonan legalisir"),
        ({"auto-submitted": "No"}, None),
        ({"precedence": "first-class"}, "x"),
        (
            {"from": "Budi <budi@gmail.com>", "return-path": "<budi@gmail.com>"},
            "Re: Permohonan [#7]",
        ),
        ({"x-auto-response-suppress": ""}, "x"),
        ({"x-loop": "helpdesk@helpdesk.example.org"}, "x"),  # our addresses unknown: not decisive
        ({}, "Mengenai kantor: automatic door rusak"),
        ({}, "Pertanyaan tentang office hours"),
    ],
)
def test_is_auto_reply_false(headers: dict[str, str], subject: str | None) -> None:
    assert not is_auto_reply(headers, subject)


def test_x_loop_naming_our_address() -> None:
    own = frozenset({"helpdesk@helpdesk.example.org"})
    assert is_auto_reply({"x-loop": "Helpdesk+t7@helpdesk.example.org"}, "Re: x", own)
    assert not is_auto_reply({"x-loop": "list@lists.example.org"}, "Re: x", own)


# --- bounces -------------------------------------------------------------------------------------


def test_bounce_info_for_a_failed_delivery() -> None:
    raw = raw_mail(
        dsn_original_message_id="<loket.9.t3@helpdesk.example.org>",
        dsn_action="failed",
        dsn_status="5.1.1",
        dsn_diagnostic="550 5.1.1 <tidak.ada@example.co.id>: User unknown",
        dsn_recipient="tidak.ada@example.co.id",
    )
    assert bounce_info(raw) == (
        "<loket.9.t3@helpdesk.example.org>",
        "delivery failed to tidak.ada@example.co.id (status 5.1.1): "
        "550 5.1.1 <tidak.ada@example.co.id>: User unknown",
    )


def test_bounce_info_ignores_delays_and_plain_mail() -> None:
    delayed = raw_mail(
        dsn_original_message_id="<loket.9.t3@x>", dsn_action="delayed", dsn_status="4.4.1"
    )
    assert bounce_info(delayed) is None
    assert bounce_info(raw_mail()) is None
    assert bounce_info(raw_mail(dsn_action="failed", dsn_status="5.1.1")) is None


# --- threading markers -----------------------------------------------------------------------------


def test_marker_formats() -> None:
    assert make_message_id(5, 7, "helpdesk.example.org") == "<loket.5.t7@helpdesk.example.org>"
    assert (
        make_reply_address("helpdesk@helpdesk.example.org", 7) == "helpdesk+t7@helpdesk.example.org"
    )
    assert (
        make_reply_address("helpdesk+t3@helpdesk.example.org", 7)
        == "helpdesk+t7@helpdesk.example.org"
    )
    assert subject_token(123) == "[#123]"
    with pytest.raises(ValueError):
        make_reply_address("helpdesk", 7)


def test_ticket_hints_priority_and_dedup() -> None:
    raw = raw_mail(
        {
            "in-reply-to": "<loket.20.t4@helpdesk.example.org>",
            "references": "<loket.1.t1@helpdesk.example.org> <other@x> <loket.9.t2@helpdesk.example.org>",
            "to": "Loket <helpdesk+t3@helpdesk.example.org>, someone@example.org",
            "cc": "helpdesk+t4@helpdesk.example.org",
            "delivered-to": "helpdesk+t5@helpdesk.example.org",
        },
        subject="Re: [#6] Permohonan [#3]",
    )
    assert ticket_hints(raw) == [4, 2, 1, 3, 5, 6]


def test_ticket_hints_ignore_foreign_markers() -> None:
    raw = raw_mail(
        {
            "in-reply-to": "<CAF3x9v@mail.gmail.com>",
            "references": "<loket.x.t1@helpdesk.example.org> <loket.1.t0@h.org> <loket.1.t99999999999999999999@h.org>",
            "to": "list+t9@lists.example.org",
        },
        subject="Invoice #12 [12]",
    )
    assert ticket_hints(raw) == [9]
    own = frozenset({"helpdesk@helpdesk.example.org"})
    assert ticket_hints(raw, own) == []
    assert ticket_hints(raw_mail()) == []
