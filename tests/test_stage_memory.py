"""The real `Stage` loop over an in-memory broker: commits, retries, the shunt, in milliseconds.

What needs a broker (rebalances, resets, where a new group starts) is in test_bus.py.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord

from tests.support.memory_bus import MemoryBroker
from workers.pipeline import bus
from workers.pipeline.stage import Stage

IN, OUT = "test.in", "test.out"
GROUP = "loket.memory-test"


def stage(broker: MemoryBroker, handle: bus.BatchHandler, **options: object) -> Stage:
    return Stage(name="memory-test", topics=[IN], handle=handle, bootstrap="",
                     producer=broker.producer(), consumer=lambda: broker.consumer(GROUP),
                     **options)  # type: ignore[arg-type]  # fmt: skip


def committed(broker: MemoryBroker) -> int | None:
    return broker.committed.get((GROUP, TopicPartition(IN, 0)))


async def run_until_committed(broker: MemoryBroker, running: Stage, offset: int) -> None:
    """Run `running` until it committed `offset` on the input topic (5 s at most)."""
    task = asyncio.create_task(running.run())
    deadline = time.monotonic() + 5
    try:
        while committed(broker) != offset:
            assert time.monotonic() < deadline, f"committed {committed(broker)}, wanted {offset}"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.001)
    finally:
        running.stop()
        await asyncio.wait_for(task, timeout=5)


def shunted(broker: MemoryBroker) -> list[bus.ShuntRecord]:
    return [msgspec.json.decode(v, type=bus.ShuntRecord) for v in broker.values(bus.SHUNT)]


def fill(broker: MemoryBroker, *values: bytes) -> None:
    for value in values:
        broker.append(IN, value)


async def test_offsets_are_committed_only_after_the_handler_and_its_publishes() -> None:
    broker = MemoryBroker()
    fill(broker, b"1", b"2", b"3")
    seen: list[tuple[int | None, int]] = []  # (committed, published) when the handler ran

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        seen.append((committed(broker), len(broker.values(OUT))))
        return [bus.Publish(OUT, r.value * 2) for r in records]

    await run_until_committed(broker, stage(broker, handle), 3)
    assert seen == [(None, 0)]  # one batch, handled before anything was committed
    assert broker.values(OUT) == [b"11", b"22", b"33"]
    assert broker.commits == [{TopicPartition(IN, 0): 3}]
    assert shunted(broker) == []


async def test_a_record_that_fails_twice_is_retried_alone_and_the_batch_goes_on() -> None:
    broker = MemoryBroker()
    fill(broker, b"a", b"flaky", b"c")
    failures = {"flaky": 2}
    done: list[bytes] = []

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        for record in records:
            if failures.get(record.value.decode(), 0) > 0:
                failures[record.value.decode()] -= 1
                raise RuntimeError("not yet")
        done.extend(r.value for r in records)
        return []

    await run_until_committed(broker, stage(broker, handle, max_attempts=3), 3)
    # The batch failed, then each record ran alone: "flaky" failed once more and then passed.
    assert done == [b"a", b"flaky", b"c"]
    assert shunted(broker) == []


async def test_a_record_that_always_fails_is_shunted_after_its_attempts() -> None:
    broker = MemoryBroker()
    fill(broker, b"a", b"bad", b"c")
    attempts: list[bytes] = []

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        attempts.extend(r.value for r in records if len(records) == 1)
        if any(r.value == b"bad" for r in records):
            raise ValueError("cannot be handled")
        return [bus.Publish(OUT, r.value) for r in records]

    await run_until_committed(broker, stage(broker, handle, max_attempts=3), 3)
    assert attempts.count(b"bad") == 3
    assert broker.values(OUT) == [b"a", b"c"]
    [shunt] = shunted(broker)
    assert (shunt.stage, shunt.topic, shunt.offset, shunt.value, shunt.attempts) == (
        "memory-test",
        IN,
        1,
        "bad",
        3,
    )
    assert shunt.error == "ValueError: cannot be handled" and "ValueError" in shunt.traceback


async def test_a_poison_message_is_shunted_at_its_first_attempt() -> None:
    broker = MemoryBroker()
    fill(broker, b"\xff not utf-8", b"ok")

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        for record in records:
            if not record.value.isascii():
                raise bus.PoisonMessage("undecodable")
        return []

    await run_until_committed(broker, stage(broker, handle), 2)
    [shunt] = shunted(broker)
    assert shunt.attempts == 1 and shunt.error == "PoisonMessage: undecodable"
    assert shunt.value_b64 is not None  # the bytes kept as they were


async def test_an_output_the_broker_can_never_take_shunts_its_input_not_the_batch() -> None:
    broker = MemoryBroker()
    broker.refuse = lambda topic, value: (
        MessageSizeTooLargeError() if topic == OUT and len(value) > 100 else None
    )
    fill(broker, b'{"trace_id": "t1"}', b'{"trace_id": "t2"}', b'{"trace_id": "t3"}')

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        outputs = []
        for record in records:
            trace = bus.trace_id_of(record.value)
            body = b"x" * 200 if trace == "t2" else record.value
            outputs.append(
                bus.Publish(OUT, msgspec.json.encode({"trace_id": trace, "body": body.decode()}))
            )
        return outputs

    await run_until_committed(broker, stage(broker, handle), 3)
    assert [bus.trace_id_of(v) for v in broker.values(OUT)] == ["t1", "t3"]
    [shunt] = shunted(broker)
    assert shunt.trace_id == "t2" and shunt.offset == 1
    assert "UnwritableOutput" in shunt.error and "MessageSizeTooLargeError" in shunt.error


async def test_a_database_outage_is_waited_out_never_shunted() -> None:
    broker = MemoryBroker()
    fill(broker, b"1", b"2")
    outages = [ConnectionRefusedError("database down")] * 3

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        if outages:
            raise outages.pop()
        return [bus.Publish(OUT, r.value) for r in records]

    await run_until_committed(broker, stage(broker, handle, max_attempts=1), 2)
    assert broker.values(OUT) == [b"1", b"2"]
    assert shunted(broker) == []


@pytest.mark.parametrize("batch_size", [1, 2, 500])
async def test_batches_follow_the_batch_size_and_keep_the_order(batch_size: int) -> None:
    broker = MemoryBroker()
    fill(broker, *(str(n).encode() for n in range(5)))
    sizes: list[int] = []

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        sizes.append(len(records))
        return [bus.Publish(OUT, r.value) for r in records]

    await run_until_committed(broker, stage(broker, handle, batch_size=batch_size), 5)
    assert broker.values(OUT) == [str(n).encode() for n in range(5)]
    assert max(sizes) == min(batch_size, 5) and sum(sizes) == 5
