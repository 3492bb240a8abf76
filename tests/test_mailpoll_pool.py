"""Mail poller backlog: parsed in worker processes, published in UID order, a dead worker costs nothing."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from channels.email import parse_email
from channels.email.imap import ImapAccount, ImapMailbox
from channels.email.smtp import EmailAccount
from channels.types import RawInbound, raw_decoder
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from workers.pipeline import bus, mailpoll
from workers.pipeline.mailpoll import MailCursor, MailPoller
from workers.runtime.runtime import Runtime
from workers.runtime.settings import Settings
from workers.runtime.supervisor import open_runtime

pytestmark = pytest.mark.slow
PASSWORD = "pool-secret-123"


def backlog(count: int, tag: str) -> list[bytes]:
    out = []
    for i in range(count):
        message = EmailMessage()
        message["From"] = f"Guru {i} <guru{i % 7}.{tag}@sekolah.example.id>"
        message["To"] = "pool@helpdesk.example.org"
        message["Subject"] = f"Laporan {tag} {i}"
        if i % 10:  # every tenth has no Message-ID: its key is its place in the mailbox
            message["Message-ID"] = f"<{tag}.{i}@sekolah.example.id>"
        message.set_content(f"Isi laporan {i}.\n")
        if i % 25 == 3:
            message.add_attachment(b"%PDF-1.4 " + bytes(range(256)) * 4, "application", "pdf",
                                   filename=f"surat-{i}.pdf")  # fmt: skip
        out.append(message.as_bytes())
    # Garbage is parsed in the workers too, and never stops the backlog.
    out.insert(40, b"\x00\xff not a mail at all \r\n\r\n\x00")
    return out


@pytest.fixture
async def runtime(tmp_path: Path, session_broker: TansuBroker) -> AsyncIterator[Runtime]:
    url = db.create_database()
    settings = Settings(database_url=url, kafka_bootstrap=session_broker.bootstrap,
                        data_dir=tmp_path / "data", partitions=4, kafka_idempotence=False)  # fmt: skip
    try:
        async with open_runtime(settings) as rt:
            yield rt
    finally:
        db.drop_database(url)


async def published(bootstrap: str, account: str) -> list[RawInbound]:
    consumer = AIOKafkaConsumer(bus.RAW, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    found: list[RawInbound] = []
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1500)
            if not batches:
                return found
            for records in batches.values():
                for record in records:
                    raw = raw_decoder.decode(record.value)
                    if raw.account == account:
                        found.append(raw)
    finally:
        await consumer.stop()


async def run_sync(rt: Runtime, dovecot: DovecotServer, user: str) -> tuple[MailPoller, MailCursor]:
    account = EmailAccount(name=user, address=f"{user}@helpdesk.example.org", imap_host=dovecot.host,
                           imap_port=dovecot.port, imap_user=user, imap_password=PASSWORD,
                           imap_tls="none")  # fmt: skip
    poller = MailPoller(rt, account)
    mailbox = ImapMailbox(ImapAccount(host=dovecot.host, port=dovecot.port, user=user,
                                      password=PASSWORD, tls="none"))  # fmt: skip
    uidvalidity = await mailbox.connect()
    try:
        cursor = MailCursor(uidvalidity)
        await poller.sync(mailbox, cursor)
    finally:
        await mailbox.close()
    return poller, cursor


async def test_backlog_parsed_by_workers_matches_inline_parsing(
    runtime: Runtime, dovecot: DovecotServer
) -> None:
    user = f"pool{uuid.uuid4().hex[:6]}"
    dovecot.add_user(user, PASSWORD)
    mails = backlog(250, user)
    uids = dovecot.append_many(user, mails)
    _, cursor = await run_sync(runtime, dovecot, user)
    assert str(runtime.blobs.root) in mailpoll._pools  # chunks this big went to the workers
    assert cursor.acked == max(uids)
    assert sorted(cursor.pending) == sorted(uids)
    raws = await published(runtime.bootstrap, user)
    assert sorted(int(r.meta["imap_uid"]) for r in raws) == sorted(uids)
    # Within a partition (one key = one sender) the order is the mailbox's UID order.
    by_key: dict[str, list[int]] = {}
    for raw in raws:
        by_key.setdefault(raw.key().decode(), []).append(int(raw.meta["imap_uid"]))
    assert all(order == sorted(order) for order in by_key.values())
    # What the workers produced is what parsing in the poller produces.
    by_uid = {int(r.meta["imap_uid"]): r for r in raws}
    for uid, data in zip(uids, mails, strict=True):
        raw = by_uid[uid]
        # The blob is what the server sent: CRLF line ends, NUL bytes turned into 0x80.
        original = runtime.blobs.get(raw.meta["original_sha256"])
        sent = data.replace(b"\r\n", b"\n").replace(b"\x00", b"\x80")
        assert original.replace(b"\r\n", b"\n") == sent
        inline = parse_email(original, account=user, external_id="", blobs=runtime.blobs)
        assert (raw.sender, raw.subject, raw.body_text, raw.headers, raw.problems) == (
            inline.sender, inline.subject, inline.body_text, inline.headers, inline.problems
        )  # fmt: skip
        assert raw.attachments == inline.attachments
        assert raw.meta["original_sha256"] == inline.meta["original_sha256"]
        for attachment in raw.attachments:
            assert runtime.blobs.exists(attachment.sha256)
    assert len({r.external_id for r in raws}) == len(uids)


async def test_killed_parser_processes_fall_back_to_the_poller(
    runtime: Runtime, dovecot: DovecotServer
) -> None:
    user = f"pool{uuid.uuid4().hex[:6]}"
    dovecot.add_user(user, PASSWORD)
    uids = dovecot.append_many(user, backlog(120, user))
    root = str(runtime.blobs.root)
    pool = mailpoll._parse_pool(root)
    # Start the workers, then kill them: the next chunk meets a broken pool.
    pool.submit(os.getpid).result(timeout=60)
    for process in list(pool._processes.values()):
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
    _, cursor = await run_sync(runtime, dovecot, user)
    assert cursor.acked == max(uids)
    raws = await published(runtime.bootstrap, user)
    assert sorted(int(r.meta["imap_uid"]) for r in raws) == sorted(uids)
    assert all(r.meta["original_sha256"] for r in raws)
    # The broken pool was dropped; the next backlog gets fresh workers.
    assert mailpoll._pools.get(root) is not pool
    more = dovecot.append_many(user, backlog(30, user + "b"))
    poller, cursor = await run_sync(runtime, dovecot, user)
    assert cursor.acked == max(more)
    assert root in mailpoll._pools
