"""Kafka plumbing: topics, the producer, and the stage consumer with retries and the shunt."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)
from aiokafka.structs import ConsumerRecord

from channels.types import OUTBOUND_CHANNELS, outbound_topic
from ticketing.db import is_transient
from workers import metrics

log = logging.getLogger(__name__)

RAW = "loket.inbound.raw"
# Faxes wait here for OCR, so a slow fax never holds up other messages on RAW.
FAX = "loket.inbound.fax"
MATCHED = "loket.inbound.matched"
RECEIPTS = "loket.receipts"
EVENTS = "loket.events"
SHUNT = "loket.shunt"

# How long the broker may hold a fetch that finds nothing new (the latency of an idle hop).
FETCH_MAX_WAIT_MS = 50


ALL_TOPICS = [RAW, FAX, MATCHED, RECEIPTS, EVENTS, SHUNT] + [
    outbound_topic(c) for c in OUTBOUND_CHANNELS
]
# Created with the others and never written or read: a broker that lacks it has lost its
# state (the in-memory embedded broker after a restart). A pipeline topic cannot tell, since
# the first publish after such a restart creates its topic again.
MARKER = "loket.marker"


async def ensure_topics(bootstrap: str, partitions: int, replication: int = 1) -> None:
    """Create the pipeline's topics; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        # With three replicas, a write is acknowledged once two of them have it.
        configs = {"min.insync.replicas": "2"} if replication >= 3 else {}
        missing = [
            NewTopic(
                name=t,
                num_partitions=1 if t == MARKER else partitions,
                replication_factor=replication,
                topic_configs=configs,
            )
            for t in [*ALL_TOPICS, MARKER]
            if t not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # another process created them first
    finally:
        await admin.close()


def seek_to_start(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
    """Position `partitions` at their first record.

    Offset 0 rather than the broker's log-start offset: the embedded Tansu broker can answer
    that with the second batch's offset when the first two batches of a partition came from
    two producers at the same moment, and a reader starting there never sees the first batch.
    Where retention has removed offset 0 (Kafka), the fetch is out of range and the
    consumer's `auto_offset_reset="earliest"` moves it to the true start.
    """
    for tp in partitions:
        consumer.seek(tp, 0)


class _StartNewPartitionsAtZero(ConsumerRebalanceListener):  # type: ignore[misc]
    """A group's first read of a partition begins at offset 0 (see `seek_to_start`)."""

    def __init__(self, consumer: AIOKafkaConsumer):
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        fresh = [tp for tp in assigned if await self.consumer.committed(tp) is None]
        seek_to_start(self.consumer, fresh)


def make_producer(bootstrap: str, *, idempotence: bool = True) -> AIOKafkaProducer:
    """Producer with acks from all in-sync replicas and, where the broker offers it, idempotence."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=5,
        max_batch_size=256 * 1024,
        request_timeout_ms=15000,
    )


@dataclass
class Publish:
    """One record a stage wants published once its work is committed."""

    topic: str
    value: bytes
    key: bytes | None = None


async def publish_all(producer: AIOKafkaProducer, records: Sequence[Publish]) -> None:
    """Send records and wait until the broker has acknowledged every one of them."""
    if not records:
        return
    futures = [await producer.send(r.topic, r.value, key=r.key) for r in records]
    await asyncio.gather(*futures)


class PoisonMessage(Exception):
    """A message that can never succeed (undecodable, invalid): shunt it without retrying."""


class _RawTrace(msgspec.Struct):
    trace_id: str | None = None


class _MessageTrace(msgspec.Struct):
    raw: _RawTrace | None = None


class _TraceProbe(msgspec.Struct):
    """The trace id wherever a topic's message carries it (raw, reply, or matched.message.raw)."""

    trace_id: str | None = None
    message: _MessageTrace | None = None


def trace_id_of(value: bytes | None) -> str | None:
    """The trace id inside a record's payload, or None when there is none to be read."""
    if not value:
        return None
    try:
        probe = msgspec.json.decode(value, type=_TraceProbe)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if probe.trace_id:
        return probe.trace_id
    if probe.message is not None and probe.message.raw is not None:
        return probe.message.raw.trace_id
    return None


class ShuntRecord(msgspec.Struct, kw_only=True):
    """What lands on `loket.shunt`: the message as it was, and why it failed where."""

    v: int = 1
    stage: str
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str  # the original payload, decoded as UTF-8 with replacement
    value_b64: str | None = None  # set when the payload was not valid UTF-8
    error: str
    traceback: str
    attempts: int
    at: float = msgspec.field(default_factory=time.time)
    trace_id: str | None = None


BatchHandler = Callable[[list[ConsumerRecord]], Awaitable[list[Publish]]]
COMMIT_TIMEOUT = 10.0
# How long one publish may wait for the broker's acknowledgement before it is retried.
PUBLISH_TIMEOUT = 30.0


@dataclass
class Stage:
    """A consumer-group stage: one `handle` over batches of records from one topic.

    Offsets are committed only after `handle` returned (its database transaction is
    committed) and what it asked to publish was acknowledged.
    """

    name: str
    topics: list[str]
    handle: BatchHandler
    bootstrap: str
    producer: AIOKafkaProducer
    max_attempts: int = 3
    batch_size: int = 500
    group_id: str | None = None
    # When set, the stage (re)creates the pipeline's topics before consuming: an in-memory
    # broker that restarted has none, and topics auto-created by a producer do not serve commits.
    partitions: int = 0
    replication: int = 1
    # The broker's reset count (see Runtime.watch_broker): when it changes, this consumer's
    # positions belong to a broker that no longer exists, so the stage ends and is restarted.
    epoch: Callable[[], int] | None = None
    _consumer: AIOKafkaConsumer | None = field(default=None, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def run(self) -> None:
        if self.partitions:
            await ensure_topics(self.bootstrap, self.partitions, self.replication)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id or f"loket.{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.batch_size,
            # Short, so a restarted member rejoins fast: heartbeats run beside the batch work.
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=600000,
            # A broker that holds an empty fetch for the whole wait delays every hop by it.
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        self._consumer = consumer
        consumer.subscribe(self.topics, listener=_StartNewPartitionsAtZero(consumer))
        await consumer.start()
        self.ready.set()
        log.info("stage %s consuming %s", self.name, ",".join(self.topics))
        started_epoch = self.epoch() if self.epoch else 0
        try:
            while not self._stopping.is_set():
                if self.epoch is not None and self.epoch() != started_epoch:
                    log.warning(
                        "stage %s: the broker came back empty; starting a fresh consumer", self.name
                    )
                    return
                batches = await consumer.getmany(timeout_ms=500, max_records=self.batch_size)
                ready = {tp: records for tp, records in batches.items() if records}
                if ready:
                    # All partitions of one poll in one batch: one transaction, not one each.
                    await self._process(consumer, ready)
                if batches:
                    await metrics.refresh_lag(self.name, consumer)
        finally:
            await consumer.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _process(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        records = [record for part in batches.values() for record in part]
        offsets = {tp: part[-1].offset + 1 for tp, part in batches.items()}
        tp = ", ".join(f"{t.topic}[{t.partition}]" for t in offsets)
        started = time.perf_counter()
        try:
            outputs = await self._with_db_patience(records)
        except Exception:
            # The batch failed for a reason other than an outage: find the culprit alone.
            outputs = []
            for record in records:
                outputs.extend(await self._one_by_one(record))
        await self._publish_with_patience(outputs)
        metrics.STAGE_PROCESSED.labels(self.name).inc(len(records))
        metrics.STAGE_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        try:
            # aiokafka retries a refused commit for ever; a broker that lost its state refuses
            # this consumer's commits for good, so give up and let the supervisor start afresh.
            await asyncio.wait_for(consumer.commit(offsets), timeout=COMMIT_TIMEOUT)
        except TimeoutError:
            log.warning(
                "stage %s: commit for %s not accepted in %.0fs; restarting the consumer",
                self.name,
                tp,
                COMMIT_TIMEOUT,
            )
            raise
        except (CommitFailedError, IllegalStateError, RebalanceInProgressError) as exc:
            # The partition moved to another member during the batch; it will redo
            # the records, which is harmless because every write is keyed.
            log.warning("stage %s: commit for %s skipped after rebalance: %s", self.name, tp, exc)

    async def _with_db_patience(self, records: list[ConsumerRecord]) -> list[Publish]:
        """Run the handler, waiting out database outages (never shunting for them)."""
        delay = 0.2
        while True:
            try:
                return await self.handle(records)
            except Exception as exc:
                if not is_transient(exc) or self._stopping.is_set():
                    raise
                metrics.STAGE_RETRIES.labels(self.name).inc()
                log.warning(
                    "stage %s: database unavailable (%s); retrying in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _one_by_one(self, record: ConsumerRecord) -> list[Publish]:
        attempts = 0
        while True:
            attempts += 1
            try:
                return await self._with_db_patience([record])
            except PoisonMessage as exc:
                return [self._shunt(record, exc, attempts)]
            except Exception as exc:
                metrics.STAGE_ERRORS.labels(self.name).inc()
                if attempts >= self.max_attempts:
                    return [self._shunt(record, exc, attempts)]
                metrics.STAGE_RETRIES.labels(self.name).inc()
                trace_id = trace_id_of(record.value)
                log.warning(
                    "stage %s: attempt %d failed at %s@%d (trace %s): %s",
                    self.name,
                    attempts,
                    record.topic,
                    record.offset,
                    trace_id,
                    exc,
                    extra={"trace_id": trace_id},
                )
                await asyncio.sleep(0.05 * attempts)

    def _shunt(self, record: ConsumerRecord, exc: BaseException, attempts: int) -> Publish:
        metrics.STAGE_SHUNTED.labels(self.name).inc()
        value = record.value or b""
        try:
            text, b64 = value.decode("utf-8"), None
        except UnicodeDecodeError:
            import base64

            text, b64 = value.decode("utf-8", "replace"), base64.b64encode(value).decode()
        shunt = ShuntRecord(
            stage=self.name,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key.decode("utf-8", "replace") if record.key else None,
            value=text,
            value_b64=b64,
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc))[-8000:],
            attempts=attempts,
            trace_id=trace_id_of(value),
        )
        log.error(
            "stage %s: shunted %s@%d after %d attempts (trace %s): %s",
            self.name,
            record.topic,
            record.offset,
            attempts,
            shunt.trace_id,
            shunt.error,
            extra={"trace_id": shunt.trace_id},
        )
        return Publish(SHUNT, msgspec.json.encode(shunt), record.key)

    async def _publish_with_patience(self, outputs: list[Publish]) -> None:
        delay = 0.2
        while True:
            try:
                await asyncio.wait_for(publish_all(self.producer, outputs), timeout=PUBLISH_TIMEOUT)
                return
            except (TimeoutError, KafkaConnectionError, KafkaError) as exc:
                if self._stopping.is_set():
                    raise
                log.warning(
                    "stage %s: broker unavailable (%s); retrying in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
