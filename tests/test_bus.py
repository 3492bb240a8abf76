"""The stage consumer against the real broker: where a consumer group starts reading."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from tests.support import burst
from tests.support.broker import TansuBroker
from workers import bus


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


@pytest.mark.slow
async def test_a_new_group_reads_every_record_of_partitions_written_concurrently(
    broker: TansuBroker,
) -> None:
    # Tansu can report a partition's start as the second batch's offset when two producers
    # wrote the first two batches at once; a group that started there lost the first batch.
    topics = [f"loket.test.start.{n}" for n in range(ROUNDS)]
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=4, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()
    sent = await two_producers_at_once(broker.bootstrap, topics)

    received: set[str] = set()
    everything = asyncio.Event()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        received.update(json.loads(r.value) for r in records)
        if received >= sent:
            everything.set()
        return []

    producer = bus.make_producer(broker.bootstrap, idempotence=False)
    await producer.start()
    stage = bus.Stage(name="start-test", topics=topics, handle=handle,
                      bootstrap=broker.bootstrap, producer=producer)  # fmt: skip
    running = asyncio.create_task(stage.run())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), timeout=30)
    finally:
        stage.stop()
        await running
        await producer.stop()
    missing = sent - received
    assert not missing, (
        f"{len(missing)} of {len(sent)} records never read, e.g. {sorted(missing)[:5]}"
    )
