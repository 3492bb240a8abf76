"""An in-memory broker for driving the real `Stage` loop in milliseconds.

It speaks the small part of aiokafka's consumer and producer that `workers.pipeline.bus`
uses: a group's committed offsets, fetches from a position, high watermarks, and sends
whose futures resolve at once. What only a real broker shows (rebalances, resets, the wire)
stays with the tests against Tansu.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

# What a producer's send meets for one record: None to append it, or the error to raise.
Refusal = Callable[[str, bytes], KafkaError | None]


@dataclass
class MemoryBroker:
    """Topics of one partition each, and the offsets groups committed."""

    topics: dict[str, list[ConsumerRecord]] = field(default_factory=dict)
    committed: dict[tuple[str, TopicPartition], int] = field(default_factory=dict)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    refuse: Refusal = lambda topic, value: None  # noqa: E731

    def append(self, topic: str, value: bytes, key: bytes | None = None) -> ConsumerRecord:
        log = self.topics.setdefault(topic, [])
        record = ConsumerRecord(topic, 0, len(log), 0, 0, key, value, None,
                                len(key or b""), len(value), [])  # fmt: skip
        log.append(record)
        return record

    def values(self, topic: str) -> list[bytes]:
        return [r.value for r in self.topics.get(topic, [])]

    def consumer(self, group: str) -> MemoryConsumer:
        return MemoryConsumer(self, group)

    def producer(self) -> MemoryProducer:
        return MemoryProducer(self)


@dataclass
class MemoryConsumer:
    """One member that holds every partition of the topics it subscribed to."""

    broker: MemoryBroker
    group: str
    _topics: list[str] = field(default_factory=list)
    _listener: Any = None
    _positions: dict[TopicPartition, int] = field(default_factory=dict)

    def subscribe(self, topics: Sequence[str], listener: Any = None) -> None:
        self._topics, self._listener = list(topics), listener

    async def start(self) -> None:
        assigned = [TopicPartition(t, 0) for t in self._topics]
        for tp in assigned:
            self._positions[tp] = self.broker.committed.get((self.group, tp), 0)
        if self._listener is not None:
            await self._listener.on_partitions_assigned(assigned)

    async def stop(self) -> None:
        pass

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._positions)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.broker.topics.get(tp.topic, []))

    async def position(self, tp: TopicPartition) -> int:
        return self._positions[tp]

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.broker.committed.get((self.group, tp))

    async def end_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.highwater(tp) for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        found: dict[TopicPartition, list[ConsumerRecord]] = {}
        for tp, position in self._positions.items():
            log = self.broker.topics.get(tp.topic, [])
            records = log[position : position + max_records if max_records else None]
            if records:
                found[tp] = records
                self._positions[tp] = records[-1].offset + 1
        if not found:
            await asyncio.sleep(min(timeout_ms / 1000, 0.005))
        return found

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.broker.commits.append(dict(offsets))
        for tp, offset in offsets.items():
            self.broker.committed[(self.group, tp)] = offset


@dataclass
class MemoryProducer:
    broker: MemoryBroker

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[Any]:
        refusal = self.broker.refuse(topic, value)
        if refusal is not None:
            raise refusal
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(self.broker.append(topic, value, key))
        return done
