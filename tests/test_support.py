"""The test harness itself: SMTP sink, Tansu broker, Dovecot and port helpers."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import aiosmtplib
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.ports import free_port, port_open, wait_port
from tests.support.smtp import SmtpServer


def outbound_mail(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "pengaduan@example.go.id"
    message["To"] = "warga@example.id"
    message["Subject"] = subject
    message.set_content("Tiket Anda sedang kami proses.")
    return message


# -- ports ---------------------------------------------------------------------------------


def test_free_port_is_bindable_and_wait_port_sees_a_listener() -> None:
    port = free_port()
    assert not port_open("127.0.0.1", port)
    with pytest.raises(TimeoutError):
        wait_port("127.0.0.1", port, timeout=0.1)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        wait_port("127.0.0.1", port, timeout=2)


# -- SMTP ----------------------------------------------------------------------------------


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer.start() as server:
        yield server


async def test_smtp_refuses_then_accepts(smtp: SmtpServer) -> None:
    smtp.fail_next(2, code=451, text="4.7.1 Greylisted, try again")
    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await aiosmtplib.send(outbound_mail("Tiket #1"), hostname=smtp.host, port=smtp.port)
        assert refused.value.code == 451
        assert "Greylisted" in refused.value.message
    assert smtp.received == []

    await aiosmtplib.send(outbound_mail("Tiket #1"), hostname=smtp.host, port=smtp.port)
    mail = await smtp.wait_for_async(lambda m: m.message["Subject"] == "Tiket #1", timeout=5)
    assert mail.mail_from == "pengaduan@example.go.id"
    assert mail.rcpt_tos == ["warga@example.id"]
    assert b"Tiket Anda sedang kami proses." in mail.raw
    assert mail.message.get_content().strip() == "Tiket Anda sedang kami proses."


async def test_smtp_refusal_for_one_recipient_lets_other_mail_through(smtp: SmtpServer) -> None:
    smtp.fail_next(1, code=550, text="5.1.1 Mailbox does not exist", to="Warga@Example.id")
    other = outbound_mail("Tiket lain")
    other.replace_header("To", "tetangga@example.id")
    await aiosmtplib.send(other, hostname=smtp.host, port=smtp.port)  # not for it: accepted
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await aiosmtplib.send(outbound_mail("Tiket #4"), hostname=smtp.host, port=smtp.port)
    assert refused.value.code == 550
    await aiosmtplib.send(outbound_mail("Tiket #5"), hostname=smtp.host, port=smtp.port)
    assert [m.message["Subject"] for m in smtp.received] == ["Tiket lain", "Tiket #5"]


async def test_smtp_permanent_refusal_and_blocking_wait(smtp: SmtpServer) -> None:
    smtp.fail_next(1, code=550)
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await aiosmtplib.send(outbound_mail("Tiket #2"), hostname=smtp.host, port=smtp.port)
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.7.1")

    await aiosmtplib.send(outbound_mail("Tiket #3"), hostname=smtp.host, port=smtp.port)
    # The server runs in its own thread, so a blocking wait works once the send is done.
    mail = await asyncio.to_thread(smtp.wait_for, lambda m: "#3" in m.message["Subject"], 5)
    assert mail.message["Subject"] == "Tiket #3"
    with pytest.raises(TimeoutError):
        smtp.wait_for(lambda m: m.message["Subject"] == "Tiket #2", timeout=0.2)


# Plain AUTH on loopback is what this test means to check.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_smtp_with_auth_requires_login() -> None:
    with SmtpServer.start(auth=("relay", "rahasia")) as server:
        with pytest.raises(aiosmtplib.SMTPResponseException):
            await aiosmtplib.send(
                outbound_mail("tanpa login"), hostname=server.host, port=server.port
            )
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await aiosmtplib.send(
                outbound_mail("salah"),
                hostname=server.host,
                port=server.port,
                username="relay",
                password="keliru",
            )
        await aiosmtplib.send(
            outbound_mail("dengan login"),
            hostname=server.host,
            port=server.port,
            username="relay",
            password="rahasia",
        )
        assert [m.message["Subject"] for m in server.received] == ["dengan login"]


# -- Tansu broker --------------------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    with TansuBroker.start() as started:
        yield started


async def produce_and_consume(bootstrap: str, topic: str, values: list[bytes]) -> list[bytes]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=b"caller-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list[bytes] = []
    try:
        async with asyncio.timeout(20):
            while len(received) < len(values):
                batches = await consumer.getmany(timeout_ms=500)
                received.extend(record.value for records in batches.values() for record in records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return received


@pytest.mark.slow
async def test_broker_accepts_produce_and_consume(broker: TansuBroker) -> None:
    values = [f"pesan {n}".encode() for n in range(20)]
    # One key, one partition: order is kept.
    assert await produce_and_consume(broker.bootstrap, "loket.test", values) == values


@pytest.mark.slow
async def test_broker_restart_keeps_port_and_loses_topics(broker: TansuBroker) -> None:
    await produce_and_consume(broker.bootstrap, "before.restart", [b"x"])
    port = broker.port
    await asyncio.to_thread(broker.restart)
    assert broker.port == port and broker.running

    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        assert "before.restart" not in await admin.list_topics()
    finally:
        await admin.close()
    assert await produce_and_consume(broker.bootstrap, "after.restart", [b"y"]) == [b"y"]


def test_broker_kill_frees_the_port(broker: TansuBroker) -> None:
    broker.kill()
    assert not broker.running
    assert not port_open(broker.host, broker.port)


# -- Dovecot -------------------------------------------------------------------------------


def test_dovecot_users_append_count_and_restart() -> None:
    with DovecotServer.start() as server:
        server.add_user("siti", "pw-siti")
        assert server.count("siti") == 0
        first = server.append("siti", b"Subject: satu\r\n\r\nisi\r\n")
        more = server.append_many("siti", [b"Subject: dua\r\n\r\nisi\r\n"] * 3)
        assert more == [first + 1, first + 2, first + 3]
        # A user added while the server runs can log in at once.
        server.add_user("budi", "pw-budi")
        server.append("budi", b"Subject: tiga\r\n\r\nisi\r\n", folder="Arsip")
        assert server.count("budi", "Arsip") == 1
        assert "\\Seen" not in server.flags("siti", first)

        server.restart()
        assert server.count("siti") == 4
        assert server.append("siti", b"Subject: lima\r\n\r\nisi\r\n") == first + 4
        root = server.root
    assert not server.running
    assert not root.exists()
