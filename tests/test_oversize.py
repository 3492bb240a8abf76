"""Oversized messages never stall the pipeline: cut at the edge, and a record the broker refuses is shunted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from channels.budget import TEXT_FILENAME
from tests.conftest import email_config
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until
from workers.pipeline import bus
from workers.pipeline.stage import Stage
from workers.runtime import metrics

TG_SECRET = "tg-oversize-secret-42"
KANNEL_SECRET = "kannel-oversize-secret-0123"
MAIL_USER = "oversize"
MAIL_PASSWORD = "oversize-imap-123"
BIG = 1_200_000  # bytes: over the broker's 1 MiB record limit


# --- the shunt record itself stays under the limit ------------------------------------------


def shunt_of(value: str) -> bus.ShuntRecord:
    return bus.ShuntRecord(
        stage="normalizer", topic=bus.RAW, partition=0, offset=7, key="telegram:1",
        value=value, error="UnwritableOutput: too large", traceback="Traceback ...", attempts=1,
    )  # fmt: skip


def test_a_small_shunt_record_keeps_its_payload() -> None:
    encoded = bus.fit_shunt(shunt_of('{"body_text": "halo"}'))
    decoded = msgspec.json.decode(encoded, type=bus.ShuntRecord)
    assert decoded.value == '{"body_text": "halo"}' and decoded.value_cut_from is None


def test_a_shunt_record_over_the_limit_has_its_payload_cut_and_says_so() -> None:
    # Quotes double in size when the payload is embedded as a JSON string.
    payload = '{"body_text": "' + '\\"' * 450_000 + '"}'
    encoded = bus.fit_shunt(shunt_of(payload))
    assert len(encoded) <= bus.MAX_SHUNT_BYTES
    decoded = msgspec.json.decode(encoded, type=bus.ShuntRecord)
    assert decoded.value_cut_from == len(payload.encode())
    assert payload.startswith(decoded.value) and len(decoded.value) < len(payload)
    assert "payload cut" in decoded.error


# --- a Stage against the real broker --------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    # Its own broker: these stages write the shunt topic.
    server = TansuBroker.start(log_dir=tmp_path_factory.mktemp("oversize-tansu"))
    yield server
    server.stop()


async def make_topics(bootstrap: str, *topics: str) -> None:
    await bus.ensure_topics(bootstrap, partitions=1)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


async def read_all(
    bootstrap: str, topic: str, want: int, within: float = 30
) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_wait_ms=100)  # fmt: skip
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        found: list[ConsumerRecord] = []
        deadline = time.monotonic() + within
        while len(found) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=300)
            found.extend(batches.get(tp, []))
        return found
    finally:
        await consumer.stop()


async def run_oversize_stage(bootstrap: str, *, traced: bool) -> tuple[str, list[Any], list[Any]]:
    """Five inputs, the third of which makes an output over the limit; returns what came out."""
    name = f"oversize-{uuid.uuid4().hex[:8]}"
    source, target = f"loket.test.{name}.in", f"loket.test.{name}.out"
    await make_topics(bootstrap, source, target)
    producer = bus.make_producer(bootstrap, idempotence=False)
    await producer.start()
    inputs = []
    for n in range(5):
        document: dict[str, Any] = {"n": n, "big": n == 2}
        if traced:
            document["trace_id"] = f"{name}-{n}"
        inputs.append(bus.Publish(source, json.dumps(document).encode(), b"same-key"))
    await bus.publish_all(producer, inputs)

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        out = []
        for record in records:
            document = json.loads(record.value)
            pad = "x" * BIG if document["big"] else ""
            value = {"trace_id": document.get("trace_id"), "n": document["n"], "pad": pad}
            out.append(bus.Publish(target, json.dumps(value).encode(), record.key))
        return out

    stage = Stage(name=name, topics=[source], handle=handle, bootstrap=bootstrap,
                      producer=producer)  # fmt: skip
    running = asyncio.create_task(stage.run())
    try:
        outputs = await read_all(
            bootstrap, target, want=4 if traced else 8, within=30 if traced else 8
        )
        shunts = [
            msgspec.json.decode(r.value, type=bus.ShuntRecord)
            for r in await read_all(bootstrap, bus.SHUNT, want=1, within=10)
        ]
        shunts = [s for s in shunts if s.stage == name]
        committed = await wait_committed(name, 5)
    finally:
        stage.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, timeout=15)
        await producer.stop()
    assert committed, f"stage {name} did not commit past the oversized output"
    return name, [json.loads(r.value) for r in outputs], shunts


async def wait_committed(name: str, offset: int, within: float = 20) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        parts = metrics.progress_of(name).partitions
        if parts and all(p.committed >= offset for p in parts.values()):
            return True
        await asyncio.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("traced", [True, False], ids=["by-trace-id", "one-by-one"])
async def test_an_output_over_the_broker_limit_is_shunted_and_the_partition_goes_on(
    broker: TansuBroker, traced: bool
) -> None:
    name, outputs, shunts = await run_oversize_stage(broker.bootstrap, traced=traced)
    # Without trace ids the batch runs again record by record: copies are allowed (at least once).
    assert {o["n"] for o in outputs} == {0, 1, 3, 4}
    (shunt,) = shunts
    assert shunt.offset == 2 and json.loads(shunt.value)["n"] == 2
    assert "MessageSizeTooLargeError" in shunt.error
    assert shunt.value_cut_from is None


@pytest.mark.slow
async def test_an_outage_is_still_waited_out(tmp_path: Path) -> None:
    server = TansuBroker.start(log_dir=tmp_path)
    producer = bus.make_producer(server.bootstrap, idempotence=False)
    await producer.start()
    try:
        stage = Stage(name=f"outage-{uuid.uuid4().hex[:6]}", topics=["loket.test.unused"],
                          handle=handle_nothing, bootstrap=server.bootstrap, producer=producer)  # fmt: skip
        server.kill()
        publishing = asyncio.create_task(
            stage._publish_with_patience([bus.Publish("loket.test.outage", b"{}")])
        )
        await asyncio.sleep(3)
        assert not publishing.done(), "a broker out of reach must be waited for, not given up on"
        server.restart()
        refused = await asyncio.wait_for(publishing, timeout=90)
        assert refused == []
    finally:
        await producer.stop()
        server.stop()


async def handle_nothing(records: list[ConsumerRecord]) -> list[bus.Publish]:
    return []


# --- end to end: a running loket ------------------------------------------------------------


def oversize_config(dovecot: DovecotServer, smtp: SmtpServer) -> str:
    return (
        email_config(dovecot, smtp, user=MAIL_USER, name=MAIL_USER)
        + f"""
[[channels.telegram]]
name = "tg-big"
token = "333333:big-token"
secret_token = "{TG_SECRET}"
api_url = "http://127.0.0.1:9"

[[channels.sms]]
name = "kannel-big"
provider = "kannel"
sender = "1500123"
sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "{KANNEL_SECRET}"
"""
    )


@pytest.fixture(scope="module")
def big_stack(
    dovecot: DovecotServer, smtp: SmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoketStack]:
    dovecot.add_user(MAIL_USER, MAIL_PASSWORD)
    url = db.create_database("loket_oversize")
    own_broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("big-tansu"))
    running = LoketStack(
        database_url=url,
        bootstrap=own_broker.bootstrap,
        config_text=oversize_config(dovecot, smtp),
        workdir=tmp_path_factory.mktemp("big-loket"),
        extra_env={"TEST_IMAP_PASSWORD": MAIL_PASSWORD, "LOKET_IMAP_POLL_SECONDS": "1"},
    )
    try:
        running.up()
        yield running
    finally:
        running.stop()
        own_broker.stop()
        db.drop_database(url)


def inbound(stack: LoketStack, channel: str, external_id: str) -> dict[str, Any] | None:
    rows = db.fetch(
        stack.database_url,
        "SELECT * FROM messages WHERE channel = $1 AND external_id = $2 AND direction = 'in'",
        channel, external_id,
    )  # fmt: skip
    return rows[0] if rows else None


def blob(stack: LoketStack, sha256: str) -> bytes:
    return (stack.workdir / "data" / "blobs" / sha256[:2] / sha256[2:4] / sha256).read_bytes()


def telegram_update(user: int, text: str) -> dict[str, Any]:
    ident = time.time_ns() // 1000
    return {
        "update_id": ident % 2_000_000_000,
        "message": {
            "message_id": ident % 1_000_000_000,
            "from": {"id": user, "is_bot": False, "first_name": "Siti"},
            "chat": {"id": user, "first_name": "Siti", "type": "private"},
            "date": int(time.time()),
            "text": text,
        },
    }


@pytest.mark.slow
def test_a_huge_telegram_message_is_cut_and_does_not_hold_up_other_channels(
    big_stack: LoketStack,
) -> None:
    text = ("Laporan kerusakan jalan di desa kami. " * 16_000)[:600_000]
    update = telegram_update(7_000_001, text)
    response = httpx.post(
        f"{big_stack.url}/webhooks/telegram",
        content=json.dumps(update).encode(),
        headers={"x-telegram-bot-api-secret-token": TG_SECRET, "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    # Another channel, right after it: stored promptly, not stuck behind the big one.
    sent = time.monotonic()
    kannel_id = f"kannel-{uuid.uuid4().hex[:10]}"
    sms = httpx.get(f"{big_stack.url}/webhooks/sms/kannel", params={
        "account": "kannel-big", "secret": KANNEL_SECRET, "from": "081234500001", "to": "1500123",
        "text": "Halo, saya menunggu jawaban", "id": kannel_id,
    }, timeout=30)  # fmt: skip
    assert sms.status_code in (200, 202), sms.text
    wait_until(lambda: inbound(big_stack, "sms", kannel_id), timeout=20, what="the SMS stored")
    assert time.monotonic() - sent < 20

    external_id = f"{update['message']['chat']['id']}:{update['message']['message_id']}"
    stored = wait_until(lambda: inbound(big_stack, "telegram", external_id), timeout=20,
                        what="the big Telegram message stored")  # fmt: skip
    assert len(stored["body_text"]) < 64_500
    assert text.startswith(stored["body_text"].split("\n\n[loket:")[0])
    assert "message cut" in stored["body_text"]

    agent = big_stack.client()
    ticket = agent.get(f"/api/tickets/{stored['ticket_id']}").json()
    (message,) = [m for m in ticket["messages"] if m["id"] == stored["id"]]
    assert any("text cut" in problem for problem in message["problems"])
    (original,) = [a for a in message["attachments"] if a["filename"] == TEXT_FILENAME]
    assert original["size"] == len(text.encode())
    assert blob(big_stack, original["sha256"]).decode() == text


@pytest.mark.slow
def test_a_3_mb_email_is_stored_cut_with_its_parts_attached(
    big_stack: LoketStack, dovecot: DovecotServer
) -> None:
    text = ("Dengan hormat, berikut lampiran laporan lengkap kami.\n" * 30_000)[:1_600_000]
    html = (
        "<html><body>"
        + "<p>Laporan lengkap kami, halaman demi halaman.</p>" * 30_000
        + "</body></html>"
    )
    mail = EmailMessage()
    mail["From"] = "Budi Santoso <budi.santoso@example.org>"
    mail["To"] = f"{MAIL_USER}@helpdesk.example.org"
    mail["Subject"] = "Laporan yang sangat panjang"
    mail["Date"] = format_datetime(datetime.now(UTC))
    message_id = make_msgid(domain="example.org")
    mail["Message-ID"] = message_id
    mail.set_content(text)
    mail.add_alternative(html, subtype="html")
    data = mail.as_bytes()
    assert len(data) > 3_000_000
    dovecot.append(MAIL_USER, data)

    stored = wait_until(lambda: inbound(big_stack, "email", message_id), timeout=60,
                        what="the 3 MB mail stored")  # fmt: skip
    assert "message cut" in stored["body_text"] and len(stored["body_text"]) < 64_500
    assert stored["body_html"] is None
    files = db.fetch(big_stack.database_url,
                     "SELECT filename, size, sha256 FROM attachments WHERE message_id = $1", stored["id"])  # fmt: skip
    names = {f["filename"]: f for f in files}
    assert {TEXT_FILENAME, "original.html"} <= set(names)
    assert blob(big_stack, names[TEXT_FILENAME]["sha256"]).decode().startswith("Dengan hormat")
