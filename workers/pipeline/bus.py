"""Kafka plumbing: topics, the producer, and the stage consumer with retries and the shunt."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnsupportedForMessageFormatError,
)
from aiokafka.structs import ConsumerRecord

from channels.types import OUTBOUND_CHANNELS, outbound_topic
from ticketing.db import is_transient
from workers.runtime import metrics

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
# The largest record loket writes: Kafka's default limit (message.max.bytes, about 1 MiB).
MAX_RECORD_BYTES = 1024 * 1024
# A shunt record carries the failed record's payload; past this size the payload is cut.
MAX_SHUNT_BYTES = 900 * 1024
# Producer errors that say a record can never be written, whatever the broker's state: the
# record that produced it is shunted at once, never waited for like an outage.
TOO_LARGE_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
)
UNWRITABLE_ERRORS: tuple[type[KafkaError], ...] = (
    *TOO_LARGE_ERRORS,
    InvalidTopicError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


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


# How long a member may take to learn where newly assigned partitions stand. Bounded because
# aiokafka looks up a committed offset for as long as it takes, and once the consumer is
# closing it never finds the coordinator again: a broker that died during the lookup would
# otherwise hold the member, and the `stop` that waits for it, for ever.
ASSIGN_TIMEOUT = 10.0
# How long a stage waits for its consumer to close before it goes on without it.
CLOSE_TIMEOUT = 15.0


class _StartNewPartitionsAtZero(ConsumerRebalanceListener):  # type: ignore[misc]
    """A group's first read of a partition begins at offset 0 (see `seek_to_start`).

    `lost` is set when where the assigned partitions stand could not be learned: the positions
    the consumer would read from are unchecked, so the stage replaces it before reading.
    """

    def __init__(self, consumer: AIOKafkaConsumer):
        self.consumer = consumer
        self.lost = False

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await asyncio.wait_for(self._position(assigned), timeout=ASSIGN_TIMEOUT)
        except (KafkaError, TimeoutError) as exc:
            self.lost = True
            log.warning("positions of %s not learned (%s); the consumer is replaced",
                        ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned),
                        type(exc).__name__ if isinstance(exc, TimeoutError) else exc)  # fmt: skip

    async def _position(self, assigned: list[TopicPartition]) -> None:
        committed = {tp: await self.consumer.committed(tp) for tp in assigned}
        fresh = [tp for tp, offset in committed.items() if offset is None]
        known = [tp for tp, offset in committed.items() if offset is not None]
        # A commit past the partition's end was made for a broker's earlier life (an
        # in-memory broker that restarted, a member that committed its old positions there):
        # reading from it would skip everything the new log holds below it.
        ends = await self.consumer.end_offsets(known) if known else {}
        ahead = [tp for tp in known if committed[tp] > ends.get(tp, committed[tp])]
        for tp in ahead:
            log.warning("%s[%d]: committed offset %d is past the end (%d); reading from the start",
                        tp.topic, tp.partition, committed[tp], ends[tp])  # fmt: skip
        seek_to_start(self.consumer, fresh + ahead)


def make_producer(bootstrap: str, *, idempotence: bool = True) -> AIOKafkaProducer:
    """Producer with acks from all in-sync replicas and, where the broker offers it, idempotence."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=MAX_RECORD_BYTES,
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


@dataclass
class Refused:
    """A record the producer or broker refused for good (too large, invalid topic)."""

    record: Publish
    error: KafkaError


async def send_each(
    producer: AIOKafkaProducer, records: Sequence[Publish]
) -> tuple[list[Refused], list[Publish], BaseException | None]:
    """Send records and wait for every acknowledgement, sorting out the failures.

    Returns the records refused for good, those that failed for now (an outage: send them
    again later) and the first error of the latter.
    """
    refused: list[Refused] = []
    failed: list[Publish] = []
    error: BaseException | None = None
    sent: list[tuple[Publish, asyncio.Future[Any]]] = []
    for record in records:
        if error is not None:
            failed.append(record)  # the broker is away: do not wait for it once per record
            continue
        try:
            sent.append((record, await producer.send(record.topic, record.value, key=record.key)))
        except UNWRITABLE_ERRORS as exc:
            refused.append(Refused(record, exc))
        except KafkaError as exc:
            failed.append(record)
            error = exc
    results = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
    for (record, _), result in zip(sent, results, strict=True):
        if isinstance(result, UNWRITABLE_ERRORS):
            refused.append(Refused(record, result))
        elif isinstance(result, KafkaError | OSError | TimeoutError):
            failed.append(record)
            error = error or result
        elif isinstance(result, BaseException):
            raise result
    return refused, failed, error


class PoisonMessage(Exception):
    """A message that can never succeed (undecodable, invalid): shunt it without retrying."""


class UnwritableOutput(Exception):
    """What a record made cannot be written to the broker (too large): shunt the record."""


def never_succeeds(exc: BaseException) -> bool:
    """Errors that the same record meets again on every attempt: shunted without retrying."""
    return isinstance(exc, UNWRITABLE_ERRORS)


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
    # Set when `value` had to be cut to keep this record under the broker's limit: the
    # original payload's size in bytes. Such a record cannot be replayed.
    value_cut_from: int | None = None


def fit_shunt(shunt: ShuntRecord, limit: int = MAX_SHUNT_BYTES) -> bytes:
    """The shunt record encoded, its payload cut (and marked so) when it would be over `limit`."""
    encoded = msgspec.json.encode(shunt)
    if len(encoded) <= limit:
        return encoded
    original = len(shunt.value_b64 or "") * 3 // 4 if shunt.value_b64 else len(shunt.value.encode())
    cut = msgspec.structs.replace(shunt, value_b64=None, value_cut_from=original)
    keep = len(shunt.value)
    while len(encoded) > limit and keep > 0:
        keep = int(keep * limit / len(encoded) * 0.9)
        cut.value = shunt.value[:keep]
        cut.error = f"{shunt.error} [payload cut to {keep} of {len(shunt.value)} characters]"
        encoded = msgspec.json.encode(cut)
    if len(encoded) > limit:
        cut.traceback = cut.traceback[-2000:]
        encoded = msgspec.json.encode(cut)
    return encoded


BatchHandler = Callable[[list[ConsumerRecord]], Awaitable[list[Publish]]]
COMMIT_TIMEOUT = 10.0
# How long one publish may wait for the broker's acknowledgement before it is retried.
PUBLISH_TIMEOUT = 30.0
# How often a running stage looks at its partitions' progress (for /readyz).
PROGRESS_SECONDS = 1.0


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
    # Makes the consumer instead of the broker's own (an in-memory one in fast tests).
    consumer: Callable[[], AIOKafkaConsumer] | None = None
    _consumer: AIOKafkaConsumer | None = field(default=None, init=False)
    _positions: _StartNewPartitionsAtZero | None = field(default=None, init=False)
    _started_epoch: int = field(default=0, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    ready: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    async def run(self) -> None:
        if self.partitions:
            await ensure_topics(self.bootstrap, self.partitions, self.replication)
        consumer = self.consumer() if self.consumer is not None else self._kafka_consumer()
        self._consumer = consumer
        self._positions = _StartNewPartitionsAtZero(consumer)
        consumer.subscribe(self.topics, listener=self._positions)
        await consumer.start()
        self.ready.set()
        log.info("stage %s consuming %s", self.name, ",".join(self.topics))
        self._started_epoch = self.epoch() if self.epoch else 0
        # Beside the loop, so a batch that never ends (a blocked handler) is seen as a stall.
        watching = asyncio.create_task(self._watch_progress(consumer))
        try:
            while not self._stopping.is_set():
                if self._must_restart():
                    return
                batches = await consumer.getmany(timeout_ms=500, max_records=self.batch_size)
                if self._must_restart():
                    return  # what was read may come from positions that were never checked
                ready = {tp: records for tp, records in batches.items() if records}
                if ready:
                    # All partitions of one poll in one batch: one transaction, not one each.
                    await self._process(consumer, ready)
                if batches:
                    await metrics.refresh_lag(self.name, consumer)
        finally:
            watching.cancel()
            try:
                await asyncio.wait_for(consumer.stop(), timeout=CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("stage %s: the consumer did not close in %.0fs; going on without it",
                          self.name, CLOSE_TIMEOUT)  # fmt: skip

    def _kafka_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
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

    def _must_restart(self) -> bool:
        """Whether this consumer must give way to a fresh one, said in the log when it must."""
        if self._broker_reset():
            log.warning(
                "stage %s: the broker came back empty; starting a fresh consumer", self.name
            )
        elif self._positions is not None and self._positions.lost:
            log.warning("stage %s: starting a fresh consumer", self.name)
        else:
            return False
        return True

    def _broker_reset(self) -> bool:
        """Whether the broker was reset since this consumer started (see `epoch`)."""
        return self.epoch is not None and self.epoch() != self._started_epoch

    async def _watch_progress(self, consumer: AIOKafkaConsumer) -> None:
        progress = metrics.progress_of(self.name)
        joined = False
        while True:
            assignment = consumer.assignment()
            # Until this consumer joined its group it holds nothing; what its predecessor left
            # (a batch it crashed on) still counts.
            joined = joined or bool(assignment)
            if joined:
                progress.keep_only(assignment)
            for tp in assignment:
                progress.observe(tp, consumer.highwater(tp))
            progress.publish_gauge()
            await asyncio.sleep(PROGRESS_SECONDS)

    def stop(self) -> None:
        self._stopping.set()

    async def _process(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]
    ) -> None:
        records = [record for part in batches.values() for record in part]
        offsets = {tp: part[-1].offset + 1 for tp, part in batches.items()}
        tp = ", ".join(f"{t.topic}[{t.partition}]" for t in offsets)
        progress = metrics.progress_of(self.name)
        for part_tp, part in batches.items():
            progress.started(part_tp, part[0].offset)
        started = time.perf_counter()
        try:
            outputs = await self._with_db_patience(records)
        except Exception:
            # The batch failed for a reason other than an outage: find the culprit alone.
            outputs = []
            for record in records:
                outputs.extend(await self._one_by_one(record))
        refused = await self._publish_with_patience(outputs)
        if refused:
            await self._shunt_refused(records, refused)
        metrics.STAGE_PROCESSED.labels(self.name).inc(len(records))
        metrics.STAGE_SECONDS.labels(self.name).observe(time.perf_counter() - started)
        if self._broker_reset():
            # These offsets are positions in a broker that is gone; committed to the new one
            # they would make the next consumer skip what it holds below them.
            log.warning("stage %s: the broker was reset during the batch; not committing %s",
                        self.name, tp)  # fmt: skip
            return
        try:
            # aiokafka retries a refused commit for ever; a broker that lost its state refuses
            # this consumer's commits for good, so give up and let the supervisor start afresh.
            await asyncio.wait_for(consumer.commit(offsets), timeout=COMMIT_TIMEOUT)
            for part_tp, offset in offsets.items():
                progress.committed(part_tp, offset, consumer.highwater(part_tp))
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
                if attempts >= self.max_attempts or never_succeeds(exc):
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
        return Publish(SHUNT, fit_shunt(shunt), record.key)

    async def _publish_with_patience(self, outputs: list[Publish]) -> list[Refused]:
        """Publish, waiting out broker outages; return the records refused for good."""
        refused: list[Refused] = []
        pending = list(outputs)
        delay = 0.2
        while True:
            try:
                unwritable, pending, error = await asyncio.wait_for(
                    send_each(self.producer, pending), timeout=PUBLISH_TIMEOUT
                )
            except TimeoutError as exc:
                # Some may have been acknowledged: sending them again is harmless (natural keys).
                unwritable, error = [], exc
            refused.extend(unwritable)
            if not pending:
                return refused
            if self._stopping.is_set():
                assert error is not None
                raise error
            log.warning(
                "stage %s: broker unavailable (%s); retrying in %.1fs", self.name, error, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _shunt_refused(self, records: list[ConsumerRecord], refused: list[Refused]) -> None:
        """Shunt the input records whose outputs the broker can never take; the batch goes on.

        An output is traced to its input by the trace id both carry; when that does not tell,
        the batch is run again one record at a time to find the culprit.
        """
        by_trace: dict[str, list[ConsumerRecord]] = {}
        for record in records:
            trace = trace_id_of(record.value)
            if trace:
                by_trace.setdefault(trace, []).append(record)
        culprits: dict[int, tuple[ConsumerRecord, Refused]] = {}
        unattributed = False
        for refusal in refused:
            trace = trace_id_of(refusal.record.value)
            sources = by_trace.get(trace, []) if trace else []
            if not sources and len(records) == 1:
                sources = records
            if not sources:
                unattributed = True
            for source in sources:
                culprits.setdefault(id(source), (source, refusal))
        shunts = [
            self._shunt(source, _unwritable(refusal), 1) for source, refusal in culprits.values()
        ]
        if unattributed:
            log.warning(
                "stage %s: an output the broker refused carries no trace id;"
                " running the batch again one record at a time",
                self.name,
            )
            for record in records:
                if id(record) in culprits:
                    continue
                outputs = await self._one_by_one(record)
                refused_again = await self._publish_with_patience(outputs)
                if refused_again:
                    shunts.append(self._shunt(record, _unwritable(refused_again[0]), 1))
        for lost in await self._publish_with_patience(shunts):
            # fit_shunt keeps shunt records under the limit; a broker with a lower one refuses
            # them still, and the partition must go on all the same.
            log.error(
                "stage %s: shunt record refused too (%s); the message is only in this log: %s",
                self.name,
                lost.error,
                lost.record.value[:2000].decode("utf-8", "replace"),
            )


def _unwritable(refusal: Refused) -> UnwritableOutput:
    record = refusal.record
    return UnwritableOutput(
        f"its output to {record.topic} ({len(record.value)} bytes) cannot be written:"
        f" {type(refusal.error).__name__}: {refusal.error}"
    )
