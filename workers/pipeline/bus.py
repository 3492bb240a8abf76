"""Kafka plumbing: topics, the producer, and the records stages publish and shunt."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    BrokerResponseError,
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnsupportedForMessageFormatError,
)
from aiokafka.structs import ConsumerRecord

from channels.types import OUTBOUND_CHANNELS, outbound_topic

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
# A stage that read nothing for IDLE_AFTER_SECONDS lets the broker hold its empty fetches
# longer, so an idle help desk costs next to no CPU: the stages a new message passes on its
# way to a ticket (normalizer, ticketing) LIVE_IDLE_FETCH_MAX_WAIT_MS, so the first message
# after a quiet spell is stored within a second; the delivery stages REPLY_IDLE_FETCH_MAX_WAIT_MS
# (an agent's reply after a quiet spell); the rest (receipts, suggestions, OCR)
# IDLE_FETCH_MAX_WAIT_MS, well inside `stage.ASSIGN_TIMEOUT`: the broker answers a
# connection's requests in order, so a held fetch delays a rebalance's offset lookups.
# The first record read brings a stage back to FETCH_MAX_WAIT_MS.
LIVE_IDLE_FETCH_MAX_WAIT_MS = 1000
REPLY_IDLE_FETCH_MAX_WAIT_MS = 3000
IDLE_FETCH_MAX_WAIT_MS = 5000
IDLE_AFTER_SECONDS = 5.0
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


async def start_producer(bootstrap: str, *, idempotence: bool = True) -> AIOKafkaProducer:
    """A started producer, idempotent where asked for and where the broker offers it.

    A broker that refuses InitProducerId (Tansu answers UnknownError) gets a producer without
    idempotence and one warning: a retried send may then write a record twice, which the
    natural keys of the stages absorb. `LOKET_KAFKA_IDEMPOTENCE=false` skips the attempt.
    """
    producer = make_producer(bootstrap, idempotence=idempotence)
    # aiokafka logs the refusal as an ERROR before raising it; it is expected here, and said
    # once below in words, so the sender's log is quiet while the producer starts.
    sender_log = logging.getLogger("aiokafka.producer.sender")
    level = sender_log.level
    if idempotence:
        sender_log.setLevel(logging.CRITICAL)
    try:
        await producer.start()
    except BrokerResponseError as exc:
        await producer.stop()
        if not idempotence:
            raise
        log.warning(
            "the broker at %s does not offer idempotent producers (InitProducerId: %s):"
            " producing without; set LOKET_KAFKA_IDEMPOTENCE=false to skip this check",
            bootstrap, type(exc).__name__,
        )  # fmt: skip
        producer = make_producer(bootstrap, idempotence=False)
        await producer.start()
    finally:
        sender_log.setLevel(level)
    return producer


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
