"""The stage consumer: one handler over batches of a topic, with retries and the shunt.

Offsets are committed only after the handler returned (its database transaction is
committed) and what it asked to publish was acknowledged; a record that keeps failing is
shunted to `loket.shunt` and the partition goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
)
from aiokafka.structs import ConsumerRecord

from ticketing.db import is_transient
from workers.pipeline.bus import (
    FETCH_MAX_WAIT_MS,
    IDLE_AFTER_SECONDS,
    IDLE_FETCH_MAX_WAIT_MS,
    SHUNT,
    BatchHandler,
    PoisonMessage,
    Publish,
    Refused,
    ShuntRecord,
    UnwritableOutput,
    ensure_topics,
    fit_shunt,
    never_succeeds,
    seek_to_start,
    send_each,
    trace_id_of,
)
from workers.runtime import metrics

log = logging.getLogger(__name__)

# How long a member may take to learn where newly assigned partitions stand. Bounded because
# aiokafka looks up a committed offset for as long as it takes, and once the consumer is
# closing it never finds the coordinator again: a broker that died during the lookup would
# otherwise hold the member, and the `stop` that waits for it, for ever.
ASSIGN_TIMEOUT = 10.0
# How long a stage waits for its consumer to close before it goes on without it.
CLOSE_TIMEOUT = 15.0


def _fetch_wait(consumer: AIOKafkaConsumer, wait_ms: int) -> None:
    """How long the broker may hold this consumer's next empty fetch.

    aiokafka reads `fetch_max_wait_ms` from its fetcher for each request and offers no setter;
    a consumer without that attribute (another version, the in-memory one of the fast tests)
    keeps the wait it was made with.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
        fetcher._fetch_max_wait_ms = wait_ms


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
    # How long the broker may hold an empty fetch once the stage has been idle a while.
    idle_fetch_wait_ms: int = IDLE_FETCH_MAX_WAIT_MS
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
        last_read = time.monotonic()
        try:
            while not self._stopping.is_set():
                if self._must_restart():
                    return
                batches = await consumer.getmany(timeout_ms=500, max_records=self.batch_size)
                if self._must_restart():
                    return  # what was read may come from positions that were never checked
                ready = {tp: records for tp, records in batches.items() if records}
                now = time.monotonic()
                if ready:
                    last_read = now
                idle = now - last_read > IDLE_AFTER_SECONDS
                _fetch_wait(consumer, self.idle_fetch_wait_ms if idle else FETCH_MAX_WAIT_MS)
                if ready:
                    # All partitions of one poll in one batch: one transaction, not one each.
                    await self._process(consumer, ready)
                if batches:
                    await metrics.refresh_lag(self.name, consumer)
        finally:
            watching.cancel()
            # Not wait_for: a close stuck on a dead broker may not end when cancelled either,
            # and the stage must go on all the same.
            closing = asyncio.ensure_future(consumer.stop())
            closed, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)
            if not closed:
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
            # A third of the session: the ratio Kafka advises, and half the requests of 1 s.
            heartbeat_interval_ms=2000,
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
            sending = asyncio.ensure_future(send_each(self.producer, pending))
            sent, _ = await asyncio.wait({sending}, timeout=PUBLISH_TIMEOUT)
            if sent:
                unwritable, pending, error = sending.result()
            else:
                # Some may have been acknowledged: sending them again is harmless (natural keys).
                # Cancelled without waiting: a send stuck on a dead broker may not end at once.
                sending.cancel()
                unwritable, error = [], TimeoutError(f"no acknowledgement in {PUBLISH_TIMEOUT}s")
            refused.extend(unwritable)
            if not pending:
                return refused
            if self._broker_reset():
                # What these outputs came from belongs to a broker that is gone: the batch is
                # not committed, and its messages come back through the new one.
                log.warning("stage %s: the broker was reset while publishing; giving up the batch",
                            self.name)  # fmt: skip
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
