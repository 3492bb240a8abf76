"""The stage consumer against the real broker: where a consumer group starts reading."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from tests.support import burst
from tests.support.broker import TansuBroker
from workers.pipeline import bus
from workers.pipeline.stage import ASSIGN_TIMEOUT, CLOSE_TIMEOUT, Stage, _StartNewPartitionsAtZero


@pytest.fixture
def broker() -> Iterator[TansuBroker]:
    with TansuBroker.start() as started:
        yield started


ROUNDS = 240


async def two_producers_at_once(bootstrap: str, topics: list[str]) -> set[str]:
    """Two producer processes write each topic's first batches at the same moment."""
    start = time.time() + 3  # both processes are up by then
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.burst", bootstrap, tag, str(start), "0.05", *topics,
            stdout=asyncio.subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]  # fmt: skip
    sent: set[str] = set()
    for process in processes:
        out, _ = await process.communicate()
        assert process.returncode == 0
        sent.update(line.split()[3] for line in out.decode().splitlines())
    assert len(sent) == 2 * len(topics) * burst.PER_TOPIC
    return sent


async def _create_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


async def _run_stage(
    bootstrap: str, name: str, topics: list[str], handle: bus.BatchHandler,
    until: asyncio.Event, seconds: float,
) -> None:  # fmt: skip
    """Run a stage over `topics` until `until` is set or `seconds` pass."""
    producer = bus.make_producer(bootstrap, idempotence=False)
    await producer.start()
    stage = Stage(name=name, topics=topics, handle=handle, bootstrap=bootstrap,
                      producer=producer)  # fmt: skip
    running = asyncio.create_task(stage.run())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), timeout=seconds)
    finally:
        stage.stop()
        await running
        await producer.stop()


@pytest.mark.slow
async def test_a_new_group_reads_every_record_of_partitions_written_concurrently(
    broker: TansuBroker,
) -> None:
    # Tansu can report a partition's start as the second batch's offset when two producers
    # wrote the first two batches at once; a group that started there lost the first batch.
    topics = [f"loket.test.start.{n}" for n in range(ROUNDS)]
    await _create_topics(broker.bootstrap, topics, partitions=4)
    sent = await two_producers_at_once(broker.bootstrap, topics)

    received: set[str] = set()
    everything = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        received.update(json.loads(r.value) for r in records)
        if received >= sent:
            everything.set()
        return []

    await _run_stage(broker.bootstrap, "start-test", topics, handle, everything, seconds=30)
    missing = sent - received
    assert not missing, (
        f"{len(missing)} of {len(sent)} records never read, e.g. {sorted(missing)[:5]}"
    )


async def _numbers_on_one_partition(bootstrap: str, topic: str, count: int) -> None:
    """A one-partition `topic` holding 0, 1, … `count - 1`, so the order read is the order written."""
    await _create_topics(bootstrap, [topic], partitions=1)
    producer = bus.make_producer(bootstrap, idempotence=False)
    await producer.start()
    try:
        await bus.publish_all(producer, [bus.Publish(topic, str(n).encode()) for n in range(count)])
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str, want: int) -> list[int]:
    """What a stage in group `reset-test` reads from `topic` until it has `want` records."""
    got: list[int] = []
    enough = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        got.extend(int(r.value) for r in records)
        if len(got) >= want:
            enough.set()
        return []

    await _run_stage(bootstrap, "reset-test", [topic], handle, enough, seconds=20)
    return got


async def _committed(bootstrap: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id="loket.reset-test")
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


@pytest.mark.slow
async def test_a_commit_past_the_end_left_by_a_reset_does_not_skip_the_new_log(
    broker: TansuBroker,
) -> None:
    topic = "loket.test.reset"
    await _numbers_on_one_partition(broker.bootstrap, topic, 20)
    # A member that kept its positions from the broker's earlier life commits offset 1500.
    stale = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap,
                             group_id="loket.reset-test", enable_auto_commit=False)  # fmt: skip
    await stale.start()
    try:
        await stale.getmany(timeout_ms=2000)
        await stale.commit({TopicPartition(topic, 0): 1500})
    finally:
        await stale.stop()
    assert await _committed(broker.bootstrap, topic) == 1500

    # The stage sees a commit past the end, and reads the log from its start.
    assert await _read_all(broker.bootstrap, topic, 20) == list(range(20))
    assert await _committed(broker.bootstrap, topic) == 20


@pytest.mark.slow
async def test_a_batch_read_before_a_reset_is_not_committed(broker: TansuBroker) -> None:
    topic = "loket.test.fence"
    await _numbers_on_one_partition(broker.bootstrap, topic, 5)
    epoch = [0]
    got: list[int] = []

    async def reset_during_the_batch(records: list[ConsumerRecord]) -> list[bus.Publish]:
        got.extend(int(r.value) for r in records)
        epoch[0] += 1  # the broker was reset while this batch was in hand
        return []

    producer = bus.make_producer(broker.bootstrap, idempotence=False)
    await producer.start()
    stage = Stage(name="reset-test", topics=[topic], handle=reset_during_the_batch,
                      bootstrap=broker.bootstrap, producer=producer, epoch=lambda: epoch[0])  # fmt: skip
    try:
        await asyncio.wait_for(stage.run(), timeout=20)  # ends by itself on the new epoch
    finally:
        await producer.stop()
    assert got == list(range(5))
    assert await _committed(broker.bootstrap, topic) is None  # the next consumer reads it again


@pytest.mark.slow
async def test_a_broker_lost_while_a_member_learns_its_positions_does_not_hold_the_stage(
    broker: TansuBroker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The embedded broker died as a new member asked where its partitions stood; the stage
    # saw the reset and stopped its consumer, whose close then waited for ever for that
    # question to be answered (aiokafka retries it endlessly once the consumer is closing).
    topic = "loket.test.assign"
    await _numbers_on_one_partition(broker.bootstrap, topic, 5)
    epoch = [0]

    class BrokerDiesWhileAssigning(_StartNewPartitionsAtZero):
        async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
            broker.kill()
            epoch[0] += 1  # loket noticed, as Runtime.watch_broker does
            await super().on_partitions_assigned(assigned)

    monkeypatch.setattr(
        "workers.pipeline.stage._StartNewPartitionsAtZero", BrokerDiesWhileAssigning
    )
    got: list[ConsumerRecord] = []

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        got.extend(records)
        return []

    producer = bus.make_producer(broker.bootstrap, idempotence=False)
    await producer.start()
    stage = Stage(name="assign-test", topics=[topic], handle=handle,
                      bootstrap=broker.bootstrap, producer=producer, epoch=lambda: epoch[0])  # fmt: skip
    try:
        # Ends by itself, its consumer closed: the supervisor starts a fresh one.
        await asyncio.wait_for(stage.run(), timeout=ASSIGN_TIMEOUT + CLOSE_TIMEOUT + 10)
    finally:
        await producer.stop()
    assert epoch[0] == 1  # the broker did die during the assignment
    assert got == []
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]


@pytest.mark.slow
async def test_an_idle_stage_lets_the_broker_hold_its_fetches_longer(
    session_broker: TansuBroker,
) -> None:
    """The idle wait is set where aiokafka reads it for each fetch, on a started consumer; a
    record read brings it back to the short wait (a renamed attribute would fail here)."""
    from workers.pipeline.stage import _fetch_wait

    topic = f"idle-wait-{time.monotonic_ns()}"
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=session_broker.bootstrap,
                                fetch_max_wait_ms=bus.FETCH_MAX_WAIT_MS)  # fmt: skip
    await consumer.start()
    try:
        _fetch_wait(consumer, bus.LIVE_IDLE_FETCH_MAX_WAIT_MS)
        assert consumer._fetcher._fetch_max_wait_ms == bus.LIVE_IDLE_FETCH_MAX_WAIT_MS
        _fetch_wait(consumer, bus.FETCH_MAX_WAIT_MS)
        assert consumer._fetcher._fetch_max_wait_ms == bus.FETCH_MAX_WAIT_MS
    finally:
        await consumer.stop()
    assert bus.IDLE_FETCH_MAX_WAIT_MS / 1000 < ASSIGN_TIMEOUT  # a held fetch delays a rebalance
