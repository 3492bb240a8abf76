"""Stall detection: a stage with records waiting and no commit is reported by /readyz and `loket status`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.stack import LoketStack, wait_until
from workers.pipeline import bus
from workers.pipeline.stage import Stage
from workers.runtime import metrics
from workers.runtime.metrics import StageProgress

KANNEL_SECRET = "kannel-stall-secret-0123"

# --- the progress record (pure) -------------------------------------------------------------


def test_records_waiting_without_a_commit_count_as_a_stall() -> None:
    progress = StageProgress("t")
    progress.started("p0", 10, now=100.0)
    progress.observe("p0", 15, now=101.0)
    assert progress.waiting_seconds(now=130.0) == 30.0
    progress.committed("p0", 15, highwater=15, now=131.0)
    assert progress.waiting_seconds(now=500.0) == 0.0  # nothing waits: idle, not stalled


def test_a_commit_with_more_waiting_starts_the_clock_again() -> None:
    progress = StageProgress("t")
    progress.started("p0", 0, now=0.0)
    progress.committed("p0", 5, highwater=9, now=50.0)
    assert progress.waiting_seconds(now=60.0) == 10.0


def test_an_idle_stage_that_gets_work_starts_counting_then() -> None:
    progress = StageProgress("t")
    progress.started("p0", 0, now=0.0)
    progress.committed("p0", 5, highwater=5, now=1.0)
    progress.started("p0", 5, now=1000.0)  # an hour later, a new record
    assert progress.waiting_seconds(now=1001.0) == 1.0


def test_a_restart_on_the_same_record_keeps_counting() -> None:
    progress = StageProgress("t")
    progress.started("p0", 7, now=0.0)
    progress.started("p0", 7, now=40.0)  # the consumer crashed and read the same batch again
    assert progress.waiting_seconds(now=50.0) == 50.0


def test_a_record_done_inside_a_long_batch_is_progress() -> None:
    progress = StageProgress("ocr")
    progress.started("p0", 3, now=0.0)
    progress.started("p1", 8, now=0.0)
    progress.working(now=100.0)  # one fax of the batch recognised; nothing committed yet
    assert progress.waiting_seconds(now=130.0) == 30.0
    progress.committed("p0", 5, highwater=5, now=140.0)
    progress.working(now=150.0)  # an idle partition stays idle
    assert progress.partitions["p0"].waiting_since is None
    assert progress.waiting_seconds(now=160.0) == 10.0


def test_partitions_moved_elsewhere_are_forgotten() -> None:
    progress = StageProgress("t")
    progress.started("p0", 0, now=0.0)
    progress.keep_only(set())
    assert progress.waiting_seconds(now=100.0) == 0.0


# --- an in-process Stage whose handler blocks ------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    server = TansuBroker.start(log_dir=tmp_path_factory.mktemp("stall-tansu"))
    yield server
    server.stop()


@pytest.mark.slow
async def test_a_blocked_handler_is_reported_stalled_until_it_commits(broker: TansuBroker) -> None:
    name = f"blocked-{uuid.uuid4().hex[:8]}"
    topic = f"loket.test.{name}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = bus.make_producer(broker.bootstrap, idempotence=False)
    await producer.start()
    await bus.publish_all(producer, [bus.Publish(topic, b'{"n": 1}')])
    release = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        await release.wait()
        return []

    stage = Stage(name=name, topics=[topic], handle=handle, bootstrap=broker.bootstrap,
                      producer=producer)  # fmt: skip
    running = asyncio.create_task(stage.run())
    try:
        for _ in range(200):
            if name in metrics.stalled_stages(1.0):
                break
            await asyncio.sleep(0.1)
        assert name in metrics.stalled_stages(1.0)
        release.set()
        for _ in range(100):
            if name not in metrics.stalled_stages(1.0):
                break
            await asyncio.sleep(0.1)
        assert name not in metrics.stalled_stages(1.0)
    finally:
        release.set()
        stage.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, timeout=15)
        await producer.stop()


# --- end to end: a running loket whose ticketing stage waits on a lock -----------------------


class TableLock:
    """Holds `LOCK TABLE ... IN SHARE MODE` on its own connection until released: inserts wait,
    reads go on."""

    def __init__(self, url: str, table: str):
        self.url, self.table = url, table
        self.held = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.release: asyncio.Event | None = None
        self.done: Any = None

    def __enter__(self) -> TableLock:
        async def hold() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                async with conn.transaction():
                    await conn.execute(f"LOCK TABLE {self.table} IN SHARE MODE")
                    self.release = asyncio.Event()
                    self.held.set()
                    await self.release.wait()
            finally:
                await conn.close()

        self.done = asyncio.run_coroutine_threadsafe(hold(), self.loop)
        assert self.held.wait(timeout=10), "lock not taken"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.release is not None
        self.loop.call_soon_threadsafe(self.release.set)
        self.done.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def stall_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoketStack]:
    url = db.create_database("loket_stall")
    own_broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("stall-stack-tansu"))
    running = LoketStack(
        database_url=url,
        bootstrap=own_broker.bootstrap,
        config_text=f"""
[[channels.sms]]
name = "kannel-stall"
provider = "kannel"
sender = "1500123"
sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "{KANNEL_SECRET}"
""",
        workdir=tmp_path_factory.mktemp("stall-loket"),
        extra_env={"LOKET_STALL_SECONDS": "3"},
    )
    try:
        running.up()
        yield running
    finally:
        running.stop()
        own_broker.stop()
        db.drop_database(url)


def send_sms(stack: LoketStack, text: str) -> str:
    kannel_id = f"kannel-{uuid.uuid4().hex[:10]}"
    response = httpx.get(f"{stack.url}/webhooks/sms/kannel", params={
        "account": "kannel-stall", "secret": KANNEL_SECRET, "from": "081298700001",
        "to": "1500123", "text": text, "id": kannel_id,
    }, timeout=30)  # fmt: skip
    assert response.status_code in (200, 202), response.text
    return kannel_id


def stored(stack: LoketStack, kannel_id: str) -> bool:
    return bool(db.fetch(stack.database_url,
                         "SELECT 1 FROM messages WHERE channel = 'sms' AND external_id = $1", kannel_id))  # fmt: skip


def loket_status(stack: LoketStack) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "status"],
        env={**stack.env, "COLUMNS": "160"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_a_stalled_stage_fails_readyz_and_status_until_it_moves(stall_stack: LoketStack) -> None:
    first = send_sms(stall_stack, "Sebelum macet")
    wait_until(lambda: stored(stall_stack, first), what="a message stored first")
    assert httpx.get(f"{stall_stack.url}/readyz").status_code == 200

    with TableLock(stall_stack.database_url, "messages"):
        waiting = send_sms(stall_stack, "Saat ticketing macet")

        def not_ready() -> dict[str, Any] | None:
            response = httpx.get(f"{stall_stack.url}/readyz", timeout=10)
            return response.json() if response.status_code == 503 else None

        answer = wait_until(not_ready, timeout=30, what="/readyz reporting the stall")
        assert answer["checks"].get("stalled:ticketing") is False, json.dumps(answer)
        assert answer["stalled"]["ticketing"] >= 3

        def outage() -> subprocess.CompletedProcess[str] | None:
            done = loket_status(stall_stack)
            return done if done.returncode == 1 and "ticketing" in done.stdout else None

        down = wait_until(outage, timeout=60, interval=1, what="loket status reporting the stall")
        assert "no progress" in down.stdout and "stalled" in down.stdout, down.stdout
        assert not stored(stall_stack, waiting)

    wait_until(lambda: stored(stall_stack, waiting), timeout=60, what="the waiting message stored")
    wait_until(
        lambda: httpx.get(f"{stall_stack.url}/readyz", timeout=10).status_code == 200,
        timeout=30,
        what="/readyz ready again",
    )
