"""Ops end to end: metrics move with traffic, status sees a stopped stage, shunt and replay, traces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from channels.types import Identity, InboundMessage, MatchedInbound, RawInbound
from tests.conftest import email_config
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.ports import free_port
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until
from workers.pipeline import registry

pytestmark = pytest.mark.slow
PASSWORD = "ops-secret-123"
ACCOUNT = "ops"
WORKERS = ("http", "pollers", "normalizer", "ticketing", "relay", "delivery", "receipts", "kb")
RAW = "loket.inbound.raw"
MATCHED = "loket.inbound.matched"
EVENTS = "loket.events"


@dataclass
class OpsStack:
    """Separate `loket worker` processes on their own broker and database, each with /metrics."""

    stack: LoketStack
    pg_url: str
    broker: TansuBroker
    dovecot: DovecotServer
    user: str
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.user}@helpdesk.example.org"

    def start(self, stage: str) -> None:
        if stage == "http":
            self.stack.env.pop("LOKET_METRICS_ADDR", None)
        else:
            port = self.metrics_ports.setdefault(stage, free_port())
            self.stack.env["LOKET_METRICS_ADDR"] = f"127.0.0.1:{port}"
        self.stack.start(stage, "worker", stage)

    def loket(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the `loket` CLI against this stack (a wide terminal, so tables are not cut)."""
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env={**self.stack.env, "COLUMNS": "140", **(env or {})},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def status(self, *args: str) -> tuple[int, dict[str, Any]]:
        done = self.loket("status", "--json", "--stall-seconds", "8", *args)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)

    def scrape(self, stage: str) -> list[Any]:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_ports[stage]}/metrics", timeout=5).text
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def send_mail(self, data: bytes) -> None:
        self.dovecot.append(self.user, data)

    def log(self, stage: str) -> str:
        return self.stack.log_path(stage).read_text(errors="replace")


def metric(samples: list[Any], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def ops(
    dovecot: DovecotServer, smtp: SmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpsStack]:
    user = f"ops{uuid.uuid4().hex[:6]}"
    dovecot.add_user(user, PASSWORD)
    workdir = tmp_path_factory.mktemp("ops")
    broker = TansuBroker.start(log_dir=workdir)
    pg_url = db.create_database()
    stack = LoketStack(
        database_url=pg_url, bootstrap=broker.bootstrap,
        config_text=email_config(dovecot, smtp, user=user, name=ACCOUNT),
        workdir=workdir / "loket",
        extra_env={"TEST_IMAP_PASSWORD": PASSWORD, "LOKET_LOG_JSON": "true", "LOKET_IMAP_POLL_SECONDS": "2"},
    )  # fmt: skip
    running = OpsStack(stack, pg_url, broker, dovecot, user)
    try:
        subprocess.run([sys.executable, "-m", "workers.cli", "migrate"], env=stack.env, check=True,
                       capture_output=True)  # fmt: skip
        for stage in WORKERS:
            running.start(stage)
        stack.wait_ready()

        def consuming() -> bool:
            _, status = running.status()
            members = {s["stage"]: s["members"] for s in status["stages"]}
            return all(
                members.get(s, 0) >= 1
                for s in ("normalizer", "ticketing", "receipts", "delivery-email", "kb-suggest")
            )

        wait_until(consuming, timeout=60, interval=1, what="every stage in its consumer group")
        yield running
    finally:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)


def person() -> str:
    return f"kepsek.{uuid.uuid4().hex[:10]}@sekolah.example.id"


def mail(sender: str, to: str, subject: str, body: str) -> bytes:
    message = EmailMessage()
    message["From"] = f"Kepala Sekolah <{sender}>"
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="sekolah.example.id")
    message.set_content(body)
    return message.as_bytes()


def inbound_from(pg_url: str, sender: str) -> list[dict[str, Any]]:
    return db.fetch(
        pg_url, "SELECT * FROM messages WHERE sender = $1 AND direction = 'in' ORDER BY id", sender
    )


def publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Publish (key, value) records in order and wait for the broker's acks."""

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    asyncio.run(run())


def shunted(ops: OpsStack) -> list[dict[str, Any]]:
    done = ops.loket("dlq", "list", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def mail_and_reply(ops: OpsStack, smtp: SmtpServer, subject: str) -> tuple[dict[str, Any], int]:
    """A mail in through Dovecot, a reply out through SMTP; returns the stored mail and the reply id."""
    sender = person()
    ops.send_mail(mail(sender, ops.address, subject, "Server rapor tidak bisa diakses."))
    [stored] = wait_until(lambda: inbound_from(ops.pg_url, sender), what="mail stored")
    agent = ops.stack.client(role="agent")
    response = agent.post(
        f"/api/tickets/{stored['ticket_id']}/replies", json={"body": "Sedang kami periksa."}
    )
    assert response.status_code == 201, response.text
    reply_id = response.json()["id"]
    smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30)
    wait_until(lambda: db.fetchval(ops.pg_url, "SELECT status FROM messages WHERE id = $1", reply_id) == "sent",
               what="reply sent")  # fmt: skip
    return stored, reply_id


def test_status_without_configuration_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOKET_")}
    done = subprocess.run([sys.executable, "-m", "workers.cli", "status"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "LOKET_DATABASE_URL" in done.stderr and "LOKET_KAFKA_BOOTSTRAP" in done.stderr


def test_metrics_move_with_traffic(ops: OpsStack, smtp: SmtpServer) -> None:
    stages = ("pollers", "normalizer", "ticketing", "delivery", "relay")
    before = {stage: ops.scrape(stage) for stage in stages}
    stored, reply_id = mail_and_reply(ops, smtp, "Metrik bergerak")
    # The sender counts are updated after the database says "sent"; give the scrape a moment.
    wait_until(
        lambda: (
            metric(ops.scrape("delivery"), "loket_delivery_latency_seconds_count")
            > metric(before["delivery"], "loket_delivery_latency_seconds_count")
        ),
        what="delivery observed",
    )
    after = {stage: ops.scrape(stage) for stage in stages}

    def grew(process: str, name: str, **labels: str) -> float:
        return metric(after[process], name, **labels) - metric(before[process], name, **labels)

    assert grew("pollers", "loket_inbound_total", channel="email", account=ACCOUNT) >= 1
    assert metric(after["pollers"], "loket_channel_up", channel="email", account=ACCOUNT) == 1
    last_ok = metric(
        after["pollers"], "loket_channel_last_success_timestamp", channel="email", account=ACCOUNT
    )
    assert time.time() - last_ok < 30
    assert grew("normalizer", "loket_stage_messages_total", stage="normalizer") >= 1
    assert grew("normalizer", "loket_stage_batch_seconds_count", stage="normalizer") >= 1
    assert grew("ticketing", "loket_stage_messages_total", stage="ticketing") >= 1
    assert grew("ticketing", "loket_ingest_latency_seconds_count") >= 1
    assert grew("ticketing", "loket_ingest_latency_seconds_sum") > 0
    assert any(
        s.name == "loket_consumer_lag" and s.labels["stage"] == "ticketing"
        for s in after["ticketing"]
    )
    assert (
        grew("delivery", "loket_outbound_total", channel="email", account=ACCOUNT, result="sent")
        >= 1
    )
    assert grew("delivery", "loket_stage_messages_total", stage="delivery-email") >= 1
    assert grew("delivery", "loket_delivery_latency_seconds_count") >= 1
    assert any(s.name == "loket_outbox_backlog" for s in after["relay"])
    # The HTTP process serves its own registry at /metrics, next to /healthz and /readyz.
    assert httpx.get(f"{ops.stack.url}/metrics").status_code == 200
    assert httpx.get(f"{ops.stack.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{ops.stack.url}/readyz").json()["ready"] is True
    # The poller also keeps the channel's health in PostgreSQL for `loket status`.
    [health] = db.fetch(ops.pg_url, "SELECT * FROM channel_health WHERE channel = 'email' AND account = $1",
                        ACCOUNT)  # fmt: skip
    assert health["state"] == "up" and health["last_ok_at"] is not None


def test_trace_shows_every_hop(ops: OpsStack, smtp: SmtpServer) -> None:
    stored, reply_id = mail_and_reply(ops, smtp, "Jejak pesan")
    trace_id = stored["trace_id"]
    assert trace_id
    done = ops.loket("trace", trace_id, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["message_id"] == stored["id"] and found["ticket_id"] == stored["ticket_id"]
    hops = [h["hop"] for h in found["hops"]]
    assert hops == ["received", "matched", "ticketed", "replied", "sent"], found["hops"]
    moments = [datetime.fromisoformat(h["at"]) for h in found["hops"]]
    assert moments == sorted(moments) and moments[-1] - moments[0] < (
        datetime.now(UTC) - moments[0]
    )
    details = {h["hop"]: h["detail"] for h in found["hops"]}
    assert f"caller #{stored['caller_id']}" in details["matched"] and "email:" in details["matched"]
    assert "new ticket" in details["ticketed"]
    assert f"reply #{reply_id}" in details["sent"] and "provider id" in details["sent"]

    by_id = ops.loket("trace", str(stored["id"]))
    assert by_id.returncode == 0, by_id.stderr
    for hop in ("received", "matched", "ticketed", "replied", "sent"):
        assert hop in by_id.stdout
    agent = ops.stack.client(role="agent")
    assert agent.get(f"/api/ops/trace/{trace_id}").json()["hops"] == found["hops"]
    assert agent.get(f"/api/ops/trace/{uuid.uuid4().hex}").status_code == 404
    assert ops.loket("trace", uuid.uuid4().hex).returncode == 1


def test_poisoned_message_is_shunted_and_the_partition_flows(ops: OpsStack) -> None:
    sender = person()
    # A date far past what a timestamp can hold: valid JSON, fails in ticketing every time.
    poison = RawInbound(
        channel="email",
        account=ACCOUNT,
        external_id=f"<poison.{uuid.uuid4().hex}@x>",
        sender=sender,
        subject="Racun",
        body_text="tanggal mustahil",
        received_at=1e20,
    )
    good = RawInbound(channel="email", account=ACCOUNT, external_id=f"<good.{uuid.uuid4().hex}@x>",
                      sender=sender, subject="Sehat", body_text="pesan berikutnya")  # fmt: skip
    assert poison.key() == good.key()
    publish(
        ops.broker.bootstrap, RAW, [(poison.key(), msgspec.json.encode(r)) for r in (poison, good)]
    )

    [stored] = wait_until(
        lambda: inbound_from(ops.pg_url, sender), what="the good message after the poison"
    )
    assert stored["external_id"] == good.external_id

    def poison_entry() -> dict[str, Any] | None:
        return next((e for e in shunted(ops) if e["trace_id"] == poison.trace_id), None)

    entry = wait_until(poison_entry, what="poison in the shunt")
    assert entry["stage"] == "ticketing" and entry["topic"] == MATCHED
    assert "range" in entry["error"] or "Overflow" in entry["error"], entry["error"]
    assert entry["attempts"] == 3 and entry["replayed_at"] is None
    assert inbound_from(ops.pg_url, sender) == [stored]

    shown = ops.loket("dlq", "show", entry["id"])
    assert shown.returncode == 0, shown.stderr
    assert (
        "Traceback" in shown.stdout
        and poison.external_id in shown.stdout
        and "ticketing" in shown.stdout
    )

    # The structured log of the failing stage carries the message's trace id.
    lines = [json.loads(line) for line in ops.log("ticketing").splitlines() if line.startswith("{")]
    about = [line for line in lines if line.get("trace_id") == poison.trace_id]
    assert any("shunted" in line["msg"] for line in about), about
    assert any("attempt" in line["msg"] and line["level"] == "WARNING" for line in about)

    traced = ops.loket("trace", poison.trace_id, "--json")
    assert traced.returncode == 0, traced.stderr
    assert [h["hop"] for h in json.loads(traced.stdout)["hops"]] == ["shunted"]
    # Through the API the error is for those who may read the shunt; an agent sees the hop only.
    manager_hops = ops.stack.client(role="manager").get(f"/api/ops/trace/{poison.trace_id}")
    agent_hops = ops.stack.client(role="agent").get(f"/api/ops/trace/{poison.trace_id}")
    [for_manager], [for_agent] = manager_hops.json()["hops"], agent_hops.json()["hops"]
    assert entry["error"][:40] in for_manager["detail"], for_manager
    assert for_agent["hop"] == "shunted" and "3 attempt(s) (shunt record" in for_agent["detail"]
    assert entry["error"][:40] not in for_agent["detail"]


def test_replay_after_the_fix_stores_exactly_once(ops: OpsStack) -> None:
    caller_id = 900_000_000 + int(uuid.uuid4().int % 1_000_000)
    raw = RawInbound(channel="email", account=ACCOUNT, external_id=f"<replay.{uuid.uuid4().hex}@x>",
                     sender=person(), subject="Menunggu penelepon", body_text="penelepon belum ada")  # fmt: skip
    matched = MatchedInbound(message=InboundMessage(raw=raw, identity=Identity("email", raw.sender),
                                                    body_display=raw.body_text),
                             caller_id=caller_id, match_reason="test: caller not yet registered")  # fmt: skip
    key = str(caller_id).encode()
    publish(ops.broker.bootstrap, MATCHED, [(key, msgspec.json.encode(matched))])

    def entry() -> dict[str, Any] | None:
        return next((e for e in shunted(ops) if e["trace_id"] == raw.trace_id), None)

    shunt = wait_until(entry, what="the message in the shunt")
    assert shunt["stage"] == "ticketing" and "ForeignKey" in shunt["error"]

    def count() -> int:
        return db.fetchval(
            ops.pg_url, "SELECT count(*) FROM messages WHERE external_id = $1", raw.external_id
        )

    assert count() == 0
    _, before = ops.status()
    assert before["shunt_pending"] >= 1

    # The fix: the caller exists now.
    db.fetch(ops.pg_url, "INSERT INTO callers (id, name) VALUES ($1, 'Pak Replay')", caller_id)
    done = ops.loket("dlq", "replay", shunt["id"])
    assert done.returncode == 0, done.stderr
    assert f"{shunt['id']}: replayed to {MATCHED}" in done.stdout
    wait_until(lambda: count() == 1, what="the replayed message stored")
    assert entry()["replayed_at"] is not None  # type: ignore[index]
    _, after = ops.status()
    assert after["shunt_pending"] == before["shunt_pending"] - 1

    again = ops.loket("dlq", "replay", shunt["id"])
    assert again.returncode == 0 and "skipped: replayed already" in again.stdout
    forced = ops.loket("dlq", "replay", shunt["id"], "--force")
    assert forced.returncode == 0 and "replayed to" in forced.stdout
    # A message published after the forced copy on the same key is stored only after it.
    follow = RawInbound(channel="email", account=ACCOUNT, external_id=f"<follow.{uuid.uuid4().hex}@x>",
                        sender=raw.sender, subject="Sesudahnya", body_text="urutan per penelepon")  # fmt: skip
    later = msgspec.structs.replace(
        matched, message=msgspec.structs.replace(matched.message, raw=follow)
    )
    publish(ops.broker.bootstrap, MATCHED, [(key, msgspec.json.encode(later))])
    wait_until(lambda: db.fetchval(ops.pg_url, "SELECT count(*) FROM messages WHERE external_id = $1",
                                   follow.external_id) == 1, what="the message after the forced replay")  # fmt: skip
    assert count() == 1
    assert ops.loket("dlq", "replay", "99:99999").returncode == 1


def test_ops_api(ops: OpsStack) -> None:
    manager = ops.stack.client(role="manager")
    summary = manager.get("/api/ops/summary")
    assert summary.status_code == 200, summary.text
    body = summary.json()
    stages = {s["stage"]: s for s in body["stages"]}
    # The consuming stages the registry declares that run here or have records waiting
    # (delivery on channels this stack has no account for is left out), kb-suggest included.
    assert set(stages) <= {c.name for c in registry.consumers()}
    assert {"normalizer", "ticketing", "receipts", "delivery-email", "kb-suggest"} <= set(stages)
    assert stages["kb-suggest"]["members"] >= 1 and stages["kb-suggest"]["topic"] == EVENTS
    assert stages["ticketing"]["members"] >= 1 and stages["ticketing"]["topic"] == MATCHED
    assert {"lag", "rate_per_min", "state"} <= set(stages["normalizer"])
    assert body["outbox_due"] is not None and body["shunt_total"] >= 1
    assert any(
        c["channel"] == "email" and c["account"] == ACCOUNT and c["state"] == "up"
        for c in body["channels"]
    )
    series = body["series"]
    assert len(series["minutes"]) == len(series["inbound"]) == len(series["outbound"]) == 60
    assert sum(series["inbound"]) >= 2 and sum(series["outbound"]) >= 2
    assert "ticketing" in series["lag"]
    shunt = manager.get("/api/ops/shunt")
    assert shunt.status_code == 200 and any(e["stage"] == "ticketing" for e in shunt.json())
    assert ops.stack.client(role="agent").get("/api/ops/shunt").status_code == 403
    assert httpx.get(f"{ops.stack.url}/api/ops/summary").status_code == 401


def test_status_reports_an_unreachable_broker(ops: OpsStack) -> None:
    done = ops.loket("status", env={"LOKET_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "broker unreachable" in done.stdout


def test_stopped_stage_fails_status_until_it_is_back(ops: OpsStack, artifacts: Path) -> None:
    code, status = wait_until(lambda: (lambda r: r if r[0] == 0 else None)(ops.status()), timeout=60,
                              what="a healthy status first")  # fmt: skip
    healthy = ops.loket("status", "--stall-seconds", "8")
    assert healthy.returncode == 0, healthy.stdout

    ops.stack.kill("ticketing", signal.SIGKILL)
    senders = [person() for _ in range(6)]
    for sender in senders[:3]:
        ops.send_mail(mail(sender, ops.address, "Saat ticketing mati", "Menunggu."))

    def ticketing_lag() -> int:
        _, current = ops.status()
        return next(s["lag"] for s in current["stages"] if s["stage"] == "ticketing")

    first = wait_until(
        lambda: (lambda lag: lag if lag >= 3 else None)(ticketing_lag()), what="lag on ticketing"
    )
    for sender in senders[3:]:
        ops.send_mail(mail(sender, ops.address, "Masih mati", "Menunggu lagi."))
    grown = wait_until(lambda: (lambda lag: lag if lag >= first + 3 else None)(ticketing_lag()),
                       what="growing lag")  # fmt: skip
    assert grown > first

    def outage() -> subprocess.CompletedProcess[str] | None:
        done = ops.loket("status", "--stall-seconds", "8")
        return done if done.returncode == 1 else None

    down = wait_until(outage, timeout=90, interval=1, what="status reporting the stopped stage")
    assert "ticketing" in down.stdout and "OUTAGE" in down.stdout
    _, detail = ops.status()
    assert any("ticketing" in problem for problem in detail["problems"])
    assert all(not inbound_from(ops.pg_url, s) for s in senders)

    ops.start("ticketing")
    wait_until(
        lambda: all(inbound_from(ops.pg_url, s) for s in senders), timeout=60, what="backlog stored"
    )
    back = wait_until(lambda: (lambda d: d if d.returncode == 0 else None)(ops.loket("status", "--stall-seconds", "8")),
                      timeout=60, interval=1, what="status healthy again")  # fmt: skip
    (artifacts / "loket-status.txt").write_text(
        "$ loket status   # ticketing killed, mail still arriving\n"
        f"{down.stdout}(exit {down.returncode})\n\n"
        "$ loket status   # ticketing restarted\n"
        f"{back.stdout}(exit {back.returncode})\n"
    )
