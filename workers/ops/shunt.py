"""The shunt topic: list, show and replay the records stages could not handle."""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from aiokafka import TopicPartition

from workers.ops.status import (
    partitions_of,
    plain_consumer,
    true_end_offsets,
)
from workers.pipeline import bus

log = logging.getLogger(__name__)


@dataclass
class ShuntEntry:
    """One record of the shunt topic and whether it was replayed already."""

    partition: int
    offset: int
    record: bus.ShuntRecord | None  # None when the shunt record itself cannot be read
    raw: bytes = b""
    replayed_at: datetime | None = None

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def payload(self) -> bytes:
        """The original message's bytes, exactly as they were consumed."""
        assert self.record is not None
        if self.record.value_b64:
            return base64.b64decode(self.record.value_b64)
        return self.record.value.encode("utf-8")

    def summary(self) -> dict[str, Any]:
        r = self.record
        return {
            "id": self.id, "partition": self.partition, "offset": self.offset,
            "stage": r.stage if r else None, "topic": r.topic if r else None,
            "source_partition": r.partition if r else None, "source_offset": r.offset if r else None,
            "key": r.key if r else None, "error": r.error if r else "unreadable shunt record",
            "attempts": r.attempts if r else None, "trace_id": r.trace_id if r else None,
            "at": datetime.fromtimestamp(r.at, UTC).isoformat() if r else None,
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
        }  # fmt: skip

    def full(self) -> dict[str, Any]:
        document = self.summary()
        if self.record is not None:
            document["traceback"] = self.record.traceback
            document["payload"] = self.record.value
            document["payload_b64"] = self.record.value_b64
        else:
            document["payload"] = self.raw.decode("utf-8", "replace")
        return document


_shunt_decoder = msgspec.json.Decoder(bus.ShuntRecord)


async def read_shunt(bootstrap: str, within: float = 30.0) -> list[ShuntEntry]:
    """Every record on the shunt topic, read from the beginning without a consumer group."""
    consumer = plain_consumer(bootstrap)
    await consumer.start()
    try:
        partitions = (await partitions_of(consumer, [bus.SHUNT])).get(bus.SHUNT, [])
        tps = [TopicPartition(bus.SHUNT, p) for p in partitions]
        if not tps:
            return []
        end = await true_end_offsets(consumer, tps)
        waiting = {tp for tp in tps if end[tp] > 0}
        bus.seek_to_start(consumer, tps)
        entries: list[ShuntEntry] = []
        deadline = time.monotonic() + within
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the shunt topic was not read to its end in {within:.0f}s")
            batches = await consumer.getmany(*waiting, timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    try:
                        decoded: bus.ShuntRecord | None = _shunt_decoder.decode(record.value or b"")
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        decoded = None
                    entries.append(
                        ShuntEntry(tp.partition, record.offset, decoded, record.value or b"")
                    )
            for tp in list(waiting):
                # Also ends a partition whose records retention removed (its start is its end).
                if await consumer.position(tp) >= end[tp]:
                    waiting.discard(tp)
        entries.sort(key=lambda e: (e.record.at if e.record else 0.0, e.partition, e.offset))
        return entries
    finally:
        await consumer.stop()


async def shunt_entries(bootstrap: str, conn: asyncpg.Connection | None) -> list[ShuntEntry]:
    """The shunt with each record's replay, when the database knows of one."""
    entries = await read_shunt(bootstrap)
    if conn is None or not entries:
        return entries
    replays = {
        (r["partition"], r["offset"]): r
        for r in await conn.fetch(
            'SELECT partition, "offset", shunted_at, replayed_at FROM shunt_replays WHERE topic = $1',
            bus.SHUNT,
        )
    }
    for entry in entries:
        replay = replays.get((entry.partition, entry.offset))
        if (
            replay is not None
            and entry.record is not None
            and replay["shunted_at"] == entry.record.at
        ):
            entry.replayed_at = replay["replayed_at"]
    return entries


class ShuntSelectionError(Exception):
    """The records asked for do not exist (or the request names none)."""


def select(
    entries: list[ShuntEntry], ids: list[str], stage: str | None, everything: bool
) -> list[ShuntEntry]:
    """Records by id (`PARTITION:OFFSET`, or an offset found in only one partition), stage, or all."""
    if everything:
        return list(entries)
    if stage is not None:
        return [e for e in entries if e.record is not None and e.record.stage == stage]
    if not ids:
        raise ShuntSelectionError("name records (PARTITION:OFFSET), or use --stage or --all")
    chosen = []
    for wanted in ids:
        if ":" in wanted:
            part, _, off = wanted.partition(":")
            found = [e for e in entries if str(e.partition) == part and str(e.offset) == off]
        else:
            found = [e for e in entries if str(e.offset) == wanted]
            if len(found) > 1:
                raise ShuntSelectionError(
                    f"offset {wanted} is in several partitions: say which ({', '.join(e.id for e in found)})"
                )
        if not found:
            raise ShuntSelectionError(f"no shunted record {wanted}")
        chosen.extend(found)
    return chosen


@dataclass
class ReplayResult:
    entry: ShuntEntry
    outcome: str  # "replayed to TOPIC" or "skipped: why"


async def replay(
    bootstrap: str, conn: asyncpg.Connection, entries: list[ShuntEntry], *, force: bool = False
) -> list[ReplayResult]:
    """Republish each record's original payload to its original topic with its original key.

    The replay is written down after the broker acknowledged it; a record replayed before is
    skipped unless `force` (a second copy is harmless anyway: ticketing's natural key).
    """
    results: list[ReplayResult] = []
    todo: list[ShuntEntry] = []
    for entry in entries:
        if entry.record is None:
            results.append(ReplayResult(entry, "skipped: the shunt record cannot be read"))
        elif entry.record.value_cut_from is not None:
            results.append(ReplayResult(entry, "skipped: its payload was cut to fit the shunt"))
        elif entry.replayed_at is not None and not force:
            results.append(
                ReplayResult(entry, f"skipped: replayed already at {entry.replayed_at.isoformat()}")
            )
        else:
            todo.append(entry)
    if not todo:
        return results
    producer = bus.make_producer(bootstrap, idempotence=False)
    await producer.start()
    try:
        for entry in todo:
            record = entry.record
            assert record is not None
            key = record.key.encode("utf-8") if record.key is not None else None
            await bus.publish_all(producer, [bus.Publish(record.topic, entry.payload(), key)])
            replayed_at = await conn.fetchval(
                'INSERT INTO shunt_replays (topic, partition, "offset", shunted_at, stage, source)'
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (topic, partition, \"offset\") DO UPDATE"
                " SET shunted_at = excluded.shunted_at, stage = excluded.stage, source = excluded.source,"
                " replayed_at = now() RETURNING replayed_at",
                bus.SHUNT, entry.partition, entry.offset, record.at, record.stage,
                f"{record.topic}:{record.partition}:{record.offset}",
            )  # fmt: skip
            entry.replayed_at = replayed_at
            results.append(ReplayResult(entry, f"replayed to {record.topic}"))
    finally:
        await producer.stop()
    return results
