"""E-mail under faults: a mailbox filled while loket was down, stages killed mid-batch."""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from tests.conftest import email_config
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow
PASSWORD = "backlog-secret-123"


def mails(count: int, tag: str) -> list[bytes]:
    out = []
    for i in range(count):
        message = EmailMessage()
        message["From"] = f"Operator {i} <op{i % 50}.{tag}@sekolah.example.id>"
        message["To"] = "backlog@helpdesk.example.org"
        message["Subject"] = f"Laporan {tag} nomor {i}"
        message["Message-ID"] = make_msgid(idstring=f"{tag}.{i}", domain="sekolah.example.id")
        message.set_content(f"Isi laporan nomor {i}: koneksi Dapodik terputus.\n")
        out.append(message.as_bytes())
    return out


def stored(pg_url: str, tag: str) -> tuple[int, int]:
    row = db.fetch(
        pg_url,
        "SELECT count(*) AS n, count(DISTINCT external_id) AS distinct_ids FROM messages"
        " WHERE direction = 'in' AND subject LIKE $1",
        f"Laporan {tag} %",
    )[0]
    return row["n"], row["distinct_ids"]


@pytest.fixture
def own_stack(
    dovecot: DovecotServer, smtp: SmtpServer, tmp_path: Path
) -> Iterator[tuple[LoketStack, str, str]]:
    """A stack with its own broker, database and mailbox user, so faults stay here."""
    user = f"backlog{uuid.uuid4().hex[:6]}"
    dovecot.add_user(user, PASSWORD)
    broker = TansuBroker.start(log_dir=tmp_path)
    pg_url = db.create_database()
    stack = LoketStack(
        database_url=pg_url,
        bootstrap=broker.bootstrap,
        config_text=email_config(dovecot, smtp, user=user, name="backlog"),
        workdir=tmp_path / "loket",
        extra_env={"TEST_IMAP_PASSWORD": PASSWORD},
    )
    try:
        yield stack, pg_url, user
    finally:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)


def test_mailbox_filled_while_down_is_fully_ingested(
    own_stack: tuple[LoketStack, str, str], dovecot: DovecotServer
) -> None:
    stack, pg_url, user = own_stack
    tag = uuid.uuid4().hex[:8]
    stack.up()
    dovecot.append_many(user, mails(5, tag))
    wait_until(lambda: stored(pg_url, tag)[0] == 5, what="first mails")
    stack.stop()

    dovecot.append_many(user, mails(300, tag)[5:] + mails(305, tag)[300:])
    stack.up()
    wait_until(lambda: stored(pg_url, tag)[0] >= 305, timeout=120, what="backlog ingested")
    time.sleep(1)
    assert stored(pg_url, tag) == (305, 305)


def test_stages_killed_mid_batch_lose_and_duplicate_nothing(
    own_stack: tuple[LoketStack, str, str], dovecot: DovecotServer
) -> None:
    stack, pg_url, user = own_stack
    tag = uuid.uuid4().hex[:8]
    count = 2000
    dovecot.append_many(user, mails(count, tag))
    for stage in ("http", "pollers", "normalizer", "ticketing", "relay"):
        stack.start(stage, "worker", stage)
    stack.wait_ready()
    started = time.monotonic()
    wait_until(lambda: stored(pg_url, tag)[0] > 200, timeout=120, what="ingestion under way")
    for stage in ("ticketing", "normalizer", "pollers"):
        stack.kill(stage)  # SIGKILL: no chance to commit offsets or cursors
        time.sleep(0.3)
        stack.start(stage, "worker", stage)
    wait_until(
        lambda: stored(pg_url, tag)[0] >= count, timeout=240, what="all mails after the kills"
    )
    elapsed = time.monotonic() - started
    time.sleep(2)  # anything redelivered after the restarts has had time to land
    assert stored(pg_url, tag) == (count, count)
    callers = db.fetchval(
        pg_url,
        "SELECT count(DISTINCT caller_id) FROM messages WHERE subject LIKE $1",
        f"Laporan {tag} %",
    )
    assert callers == 50  # 50 distinct senders, no caller created twice in the race
    print(f"\n{count} mails through three SIGKILLed stages in {elapsed:.1f}s")


def test_append_to_ticket_latency(
    own_stack: tuple[LoketStack, str, str], dovecot: DovecotServer
) -> None:
    """Correctness of the live path one mail at a time; prints the append-to-ticket latency."""
    stack, pg_url, user = own_stack
    stack.up()
    latencies = []
    for i in range(15):
        tag = uuid.uuid4().hex[:8]
        start = time.monotonic()
        dovecot.append(user, mails(1, tag)[0])
        wait_until(lambda tag=tag: stored(pg_url, tag)[0] == 1, interval=0.02, what=f"mail {i}")
        latencies.append(time.monotonic() - start)
    assert len(latencies) == 15
    print(
        f"\nappend -> ticket row: median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} mails"
    )
