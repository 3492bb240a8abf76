"""Prometheus metrics of every stage, channel and the outbox."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

STAGE_PROCESSED = Counter("loket_stage_messages_total", "Messages processed by a stage", ["stage"])
STAGE_ERRORS = Counter("loket_stage_errors_total", "Failed attempts in a stage", ["stage"])
STAGE_RETRIES = Counter("loket_stage_retries_total", "Retries in a stage", ["stage"])
STAGE_SHUNTED = Counter("loket_stage_shunted_total", "Messages sent to the shunt topic", ["stage"])
STAGE_SECONDS = Histogram(
    "loket_stage_batch_seconds",
    "Time to process one batch",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_LAG = Gauge("loket_consumer_lag", "Records not yet consumed", ["stage", "topic", "partition"])
STAGE_WAITING = Gauge(
    "loket_stage_waiting_seconds",
    "How long records have waited on a stage without a commit (0 when it keeps up)",
    ["stage"],
)
INBOUND = Counter(
    "loket_inbound_total", "Inbound messages accepted by an adapter", ["channel", "account"]
)
OUTBOUND = Counter(
    "loket_outbound_total", "Replies handed to a provider", ["channel", "account", "result"]
)
INGEST_LATENCY = Histogram(
    "loket_ingest_latency_seconds",
    "Adapter received -> ticket committed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DELIVERY_LATENCY = Histogram(
    "loket_delivery_latency_seconds",
    "Reply created -> provider accepted",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
OUTBOX_BACKLOG = Gauge("loket_outbox_backlog", "Outbox rows not yet published")
CHANNEL_UP = Gauge(
    "loket_channel_up",
    "1 when the channel's last poll or connection worked",
    ["channel", "account"],
)
CHANNEL_LAST_OK = Gauge(
    "loket_channel_last_success_timestamp",
    "Last successful poll or webhook",
    ["channel", "account"],
)


async def refresh_lag(stage: str, consumer: Any) -> None:
    """Record the lag of every partition the consumer holds (highwater - position)."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        position = await consumer.position(tp)
        STAGE_LAG.labels(stage, tp.topic, str(tp.partition)).set(max(highwater - position, 0))


@dataclass
class _Partition:
    committed: int  # the next offset the stage has to process
    waiting_since: float | None  # monotonic time records began to wait at `committed`


@dataclass
class StageProgress:
    """Whether a stage moves: per partition, where it stands and since when records wait there.

    Kept per stage name across restarts of its consumer, so a stage that crashes and
    restarts on the same record keeps counting.
    """

    stage: str
    partitions: dict[Any, _Partition] = field(default_factory=dict)

    def started(self, tp: Any, first_offset: int, now: float | None = None) -> None:
        """A batch begins at `first_offset` (what is committed before it)."""
        now = time.monotonic() if now is None else now
        known = self.partitions.get(tp)
        if known is None or known.committed != first_offset:
            self.partitions[tp] = _Partition(first_offset, now)
        elif known.waiting_since is None:
            known.waiting_since = now

    def committed(
        self, tp: Any, offset: int, highwater: int | None, now: float | None = None
    ) -> None:
        """Offsets up to `offset` are committed: progress, so the clock starts again."""
        now = time.monotonic() if now is None else now
        waiting = highwater is not None and highwater > offset
        self.partitions[tp] = _Partition(offset, now if waiting else None)

    def observe(self, tp: Any, highwater: int | None, now: float | None = None) -> None:
        """The partition's end as the consumer last saw it."""
        known = self.partitions.get(tp)
        if known is None or highwater is None:
            return
        if highwater <= known.committed:
            known.waiting_since = None
        elif known.waiting_since is None:
            known.waiting_since = time.monotonic() if now is None else now

    def working(self, now: float | None = None) -> None:
        """A record of the batch in hand is done (the batch commits later): not a stall."""
        now = time.monotonic() if now is None else now
        for known in self.partitions.values():
            if known.waiting_since is not None:
                known.waiting_since = now

    def keep_only(self, assigned: Any) -> None:
        """Forget partitions this process no longer holds (another member has them)."""
        for tp in [tp for tp in self.partitions if tp not in assigned]:
            del self.partitions[tp]

    def waiting_seconds(self, now: float | None = None) -> float:
        """The longest time records have waited on one partition without a commit."""
        now = time.monotonic() if now is None else now
        waits = [
            now - p.waiting_since for p in self.partitions.values() if p.waiting_since is not None
        ]
        return max(waits, default=0.0)

    def publish_gauge(self) -> None:
        STAGE_WAITING.labels(self.stage).set(self.waiting_seconds())


_progress: dict[str, StageProgress] = {}


def progress_of(stage: str) -> StageProgress:
    """The progress record of a stage of this process (made on first use)."""
    if stage not in _progress:
        _progress[stage] = StageProgress(stage)
    return _progress[stage]


def stalled_stages(stall_seconds: float, now: float | None = None) -> dict[str, float]:
    """Stages of this process whose records have waited longer than `stall_seconds`, and how long."""
    waits = {name: p.waiting_seconds(now) for name, p in _progress.items()}
    return {name: seconds for name, seconds in waits.items() if seconds > stall_seconds}


def channel_ok(channel: str, account: str, now: float) -> None:
    CHANNEL_UP.labels(channel, account).set(1)
    CHANNEL_LAST_OK.labels(channel, account).set(now)


def channel_down(channel: str, account: str) -> None:
    CHANNEL_UP.labels(channel, account).set(0)
