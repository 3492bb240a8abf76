"""Prometheus metrics of every stage, channel and the outbox."""

from __future__ import annotations

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


def channel_ok(channel: str, account: str, now: float) -> None:
    CHANNEL_UP.labels(channel, account).set(1)
    CHANNEL_LAST_OK.labels(channel, account).set(now)


def channel_down(channel: str, account: str) -> None:
    CHANNEL_UP.labels(channel, account).set(0)
