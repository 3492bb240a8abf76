"""The IMAP client against a real Dovecot, plus its response parsers."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from channels.email.imap import ImapAccount, ImapError, ImapMailbox, parse_fetch, parse_search
from tests.support.dovecot import DovecotServer
from tests.support.ports import free_port

_user_numbers = itertools.count(1)


def make_message(number: int, subject: str = "Keluhan layanan") -> bytes:
    """A small RFC 5322 message with CRLF line ends, as IMAP hands it back."""
    message = EmailMessage()
    message["From"] = f"Warga {number} <warga{number}@example.id>"
    message["To"] = "pengaduan@example.go.id"
    message["Subject"] = f"{subject} #{number}"
    message["Message-ID"] = f"<msg-{number}-{time.monotonic_ns()}@example.id>"
    message.set_content(f"Nomor pengaduan {number}.\nMohon ditindaklanjuti. Terima kasih.\n")
    return message.as_bytes(policy=SMTP)


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    with DovecotServer.start() as server:
        yield server


@pytest.fixture
def account(dovecot: DovecotServer) -> ImapAccount:
    """A fresh mailbox user per test, so tests on the shared server do not see each other."""
    user = f"desk{next(_user_numbers)}"
    dovecot.add_user(user, f"pw-{user}")
    return ImapAccount(dovecot.host, dovecot.port, user, f"pw-{user}", tls="none")


async def collect(
    mailbox: ImapMailbox, last_uid: int, chunk: int = 100
) -> list[list[tuple[int, bytes]]]:
    return [batch async for batch in mailbox.fetch_new(last_uid, chunk=chunk)]


async def test_fetch_new_yields_appended_messages_in_uid_order(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    messages = [make_message(n) for n in range(3)]
    uids = dovecot.append_many(account.user, messages)

    async with ImapMailbox(account) as mailbox:
        assert mailbox.uidvalidity > 0
        batches = await collect(mailbox, 0)
        assert batches == [list(zip(uids, messages, strict=True))]
        assert uids == sorted(uids)
        assert await mailbox.uids_after(max(uids)) == []
        assert await mailbox.uids_after(max(uids) + 50) == []
        assert await mailbox.uids_after(uids[0]) == uids[1:]


async def test_fetch_new_splits_into_chunks(dovecot: DovecotServer, account: ImapAccount) -> None:
    messages = [make_message(n) for n in range(5)]
    uids = dovecot.append_many(account.user, messages)

    async with ImapMailbox(account) as mailbox:
        batches = await collect(mailbox, 0, chunk=2)
        assert [len(batch) for batch in batches] == [2, 2, 1]
        assert [uid for batch in batches for uid, _ in batch] == uids
        assert await collect(mailbox, uids[2]) == [list(zip(uids[3:], messages[3:], strict=True))]


async def test_fetch_of_expunged_or_unknown_uid_is_skipped(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    uid = dovecot.append(account.user, make_message(1))
    async with ImapMailbox(account) as mailbox:
        assert await mailbox.fetch([uid, uid + 1000]) == [
            (uid, make_message_like(dovecot, account, uid))
        ]
        assert await mailbox.fetch([]) == []


def make_message_like(dovecot: DovecotServer, account: ImapAccount, uid: int) -> bytes:
    import imaplib

    client = imaplib.IMAP4(dovecot.host, dovecot.port)
    try:
        client.login(account.user, account.password)
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
        return bytes(data[0][1])
    finally:
        client.logout()


async def test_fetch_leaves_messages_unseen(dovecot: DovecotServer, account: ImapAccount) -> None:
    uids = dovecot.append_many(account.user, [make_message(n) for n in range(2)])
    async with ImapMailbox(account) as mailbox:
        fetched = await collect(mailbox, 0)
    assert [uid for uid, _ in fetched[0]] == uids
    for uid in uids:
        assert "\\Seen" not in dovecot.flags(account.user, uid)


@pytest.mark.slow
async def test_backlog_of_2000_messages_is_fetched_completely(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    messages = [make_message(n) for n in range(2000)]
    uids = dovecot.append_many(account.user, messages)

    async with ImapMailbox(account) as mailbox:
        started = time.perf_counter()
        fetched = [pair for batch in await collect(mailbox, 0) for pair in batch]
        elapsed = time.perf_counter() - started

    assert [uid for uid, _ in fetched] == uids
    assert [raw for _, raw in fetched] == messages
    rate = len(fetched) / elapsed
    print(f"fetched {len(fetched)} messages in {elapsed:.2f}s: {rate:.0f} msgs/s")
    assert rate > 200  # far below what a local Dovecot gives; catches a per-message round trip


async def test_idle_wakes_when_another_connection_appends(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    dovecot.append(account.user, make_message(1))
    async with ImapMailbox(account) as mailbox:
        await collect(mailbox, 0)
        waiter = asyncio.create_task(mailbox.wait_for_new(timeout=10))
        await asyncio.sleep(0.3)
        appended_at = time.monotonic()
        new_uid = await asyncio.to_thread(dovecot.append, account.user, make_message(2))
        assert await waiter is True
        woke_after = time.monotonic() - appended_at
        assert woke_after < 2.0, f"IDLE reported new mail after {woke_after:.2f}s"
        # The connection is usable again after IDLE.
        assert await mailbox.uids_after(new_uid - 1) == [new_uid]


async def test_idle_times_out_without_mail(account: ImapAccount) -> None:
    async with ImapMailbox(account) as mailbox:
        started = time.monotonic()
        assert await mailbox.wait_for_new(timeout=0.5) is False
        assert 0.4 < time.monotonic() - started < 2.0
        assert await mailbox.uids_after(0) == []


async def test_idle_reports_mail_that_arrived_before_it_started(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    async with ImapMailbox(account) as mailbox:
        assert await mailbox.uids_after(0) == []
        uid = dovecot.append(account.user, make_message(1))
        assert await mailbox.wait_for_new(timeout=5) is True
        assert await mailbox.uids_after(0) == [uid]


async def test_polling_without_idle_sees_new_mail(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    async with ImapMailbox(account, use_idle=False, poll_interval=0.1) as mailbox:
        assert await mailbox.uids_after(0) == []
        assert await mailbox.wait_for_new(timeout=0.3) is False
        waiter = asyncio.create_task(mailbox.wait_for_new(timeout=10))
        await asyncio.sleep(0.2)
        uid = await asyncio.to_thread(dovecot.append, account.user, make_message(1))
        assert await waiter is True
        assert await mailbox.uids_after(0) == [uid]


async def test_folder_with_a_space_in_its_name(
    dovecot: DovecotServer, account: ImapAccount
) -> None:
    folder = "Pengaduan Warga"
    dovecot.create_folder(account.user, folder)
    message = make_message(7)
    uid = dovecot.append(account.user, message, folder=folder)
    inbox_uid = dovecot.append(account.user, make_message(8))
    account = ImapAccount(
        account.host, account.port, account.user, account.password, "none", folder
    )
    async with ImapMailbox(account) as mailbox:
        assert await collect(mailbox, 0) == [[(uid, message)]]
    assert inbox_uid  # INBOX has its own message, not returned above


async def test_wrong_password_raises_auth_error(account: ImapAccount) -> None:
    wrong = ImapAccount(account.host, account.port, account.user, "not-the-password", tls="none")
    mailbox = ImapMailbox(wrong)
    with pytest.raises(ImapError) as raised:
        await mailbox.connect()
    assert raised.value.kind == "auth"
    assert "not-the-password" not in str(raised.value)
    assert "not-the-password" not in repr(wrong)


async def test_connection_refused_raises_connect_error() -> None:
    account = ImapAccount("127.0.0.1", free_port(), "nobody", "x", tls="none")
    with pytest.raises(ImapError) as raised:
        await ImapMailbox(account, timeout=5).connect()
    assert raised.value.kind == "connect"
    assert str(account.port) in raised.value.reason


async def test_missing_folder_raises_folder_error(account: ImapAccount) -> None:
    missing = ImapAccount(
        account.host, account.port, account.user, account.password, "none", "Tidak Ada"
    )
    with pytest.raises(ImapError) as raised:
        await ImapMailbox(missing).connect()
    assert raised.value.kind == "folder"
    assert "Tidak Ada" in raised.value.reason


async def test_operations_before_connect_raise() -> None:
    mailbox = ImapMailbox(ImapAccount("127.0.0.1", 1, "u", "p", tls="none"))
    with pytest.raises(ImapError):
        await mailbox.uids_after(0)
    await mailbox.close()  # closing an unconnected mailbox is harmless


@pytest.fixture
def own_dovecot() -> Iterator[DovecotServer]:
    """A server for one test that stops and starts it."""
    with DovecotServer.start() as server:
        server.add_user("outage", "pw-outage")
        yield server


async def test_restart_keeps_uidvalidity_and_messages(own_dovecot: DovecotServer) -> None:
    account = ImapAccount(own_dovecot.host, own_dovecot.port, "outage", "pw-outage", tls="none")
    messages = [make_message(n) for n in range(3)]
    uids = own_dovecot.append_many("outage", messages)

    mailbox = ImapMailbox(account, timeout=5)
    uidvalidity = await mailbox.connect()
    await asyncio.to_thread(own_dovecot.restart)

    # The old session is gone: the next command fails at once instead of hanging.
    started = time.monotonic()
    with pytest.raises(ImapError) as raised:
        await mailbox.uids_after(0)
    assert raised.value.kind == "closed"
    assert time.monotonic() - started < 2

    assert await mailbox.connect() == uidvalidity
    try:
        assert await collect(mailbox, 0) == [list(zip(uids, messages, strict=True))]
    finally:
        await mailbox.close()


async def test_server_going_away_during_idle_raises(own_dovecot: DovecotServer) -> None:
    account = ImapAccount(own_dovecot.host, own_dovecot.port, "outage", "pw-outage", tls="none")
    async with ImapMailbox(account, timeout=5) as mailbox:
        waiter = asyncio.create_task(mailbox.wait_for_new(timeout=30))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_dovecot.stop)
        with pytest.raises(ImapError) as raised:
            await asyncio.wait_for(waiter, 5)
        assert raised.value.kind == "closed"


@pytest.fixture(scope="module")
def tls_dovecot() -> Iterator[DovecotServer]:
    with DovecotServer.start(tls=True) as server:
        server.add_user("secure", "pw-secure")
        yield server


@pytest.fixture
def trusting(tls_dovecot: DovecotServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_dovecot.cert_file))


@pytest.mark.parametrize("mode", ["ssl", "starttls"])
async def test_tls_modes_fetch_mail(
    tls_dovecot: DovecotServer, trusting: ssl.SSLContext, mode: str
) -> None:
    message = make_message(42, subject=f"Lewat {mode}")
    uid = tls_dovecot.append("secure", message)
    port = tls_dovecot.ssl_port if mode == "ssl" else tls_dovecot.port
    account = ImapAccount(tls_dovecot.host, port, "secure", "pw-secure", tls=mode)  # type: ignore[arg-type]
    async with ImapMailbox(account, ssl_context=trusting) as mailbox:
        assert (uid, message) in await mailbox.fetch([uid])


async def test_untrusted_certificate_raises_tls_error(tls_dovecot: DovecotServer) -> None:
    account = ImapAccount(tls_dovecot.host, tls_dovecot.ssl_port, "secure", "pw-secure", tls="ssl")
    with pytest.raises(ImapError) as raised:
        await ImapMailbox(account, timeout=5).connect()
    assert raised.value.kind == "tls"


async def test_starttls_against_server_without_it_raises(account: ImapAccount) -> None:
    plain_only = ImapAccount(account.host, account.port, account.user, account.password, "starttls")
    with pytest.raises(ImapError) as raised:
        await ImapMailbox(plain_only, timeout=5).connect()
    assert raised.value.kind == "tls"


# -- parsers -----------------------------------------------------------------------------


def test_parse_fetch_pairs_literals_with_uids_before_or_after() -> None:
    lines = [
        b"1 FETCH (UID 7 BODY[] {5}",
        bytearray(b"hello"),
        b")",
        b"2 FETCH (BODY[] {3}",
        bytearray(b"abc"),
        b" UID 9)",
        b"3 FETCH (FLAGS (\\Seen) UID 11)",
        b'4 FETCH (UID 12 BODY[] "")',
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    assert parse_fetch(lines) == [(7, b"hello"), (9, b"abc"), (12, b"")]


def test_parse_fetch_keeps_literal_text_that_looks_like_protocol() -> None:
    body = bytearray(b"Subject: 5 FETCH (UID 99 BODY[] {1}\r\n\r\nx")
    assert parse_fetch([b"1 FETCH (UID 3 BODY[] {40}", body, b")"]) == [(3, bytes(body))]


def test_parse_search() -> None:
    assert parse_search([b"3 4 10", b"Search completed."]) == [3, 4, 10]
    assert parse_search([b"SEARCH 3 4", b"Search completed."]) == [3, 4]
    assert parse_search([b"", b"Search completed."]) == []
    assert parse_search([b"Search completed (0.001 + 0.000 secs)."]) == []
