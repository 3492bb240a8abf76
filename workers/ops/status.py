"""Pipeline status from Kafka and PostgreSQL: every stage's lag, rate and stalls, the shunt count, the outbox and channel health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ticketing import ops as ops_reads
from ticketing.db import is_transient
from workers.pipeline import bus, registry

log = logging.getLogger(__name__)

KAFKA_TIMEOUT = 15.0


def stage_topics() -> dict[str, str]:
    """Every consuming stage (see `workers.pipeline.registry`) and the topic it reads."""
    return {consumer.name: consumer.topic for consumer in registry.consumers()}


def group_of(stage: str) -> str:
    return registry.consumer(stage).group


@dataclass
class StageStatus:
    stage: str
    group: str
    topic: str
    members: int
    committed: (
        int  # sum over partitions of the group's position (its start where nothing is committed)
    )
    end: int  # sum over partitions of the end offsets
    lag: int
    rate_per_min: float | None = None  # records consumed per minute since an earlier sample
    stalled_seconds: float | None = None  # lag > 0 and no progress for this long
    state: str = "ok"  # ok | idle | stopped | lagging | stalled | no consumer


@dataclass
class ChannelHealth:
    channel: str
    account: str
    state: str
    last_ok_at: datetime | None
    last_error: str | None
    updated_at: datetime


@dataclass
class Status:
    checked_at: datetime
    database: str | None = None  # None when reachable, else the error
    broker: str | None = None
    bootstrap: str = ""
    stages: list[StageStatus] = field(default_factory=list)
    shunt_total: int | None = None
    shunt_pending: int | None = None  # shunted and not replayed
    outbox_due: int | None = None
    outbox_scheduled: int | None = None  # retries waiting for their time
    outbox_oldest_seconds: float | None = None
    channels: list[ChannelHealth] = field(default_factory=list)
    inbound_per_min: float | None = None
    outbound_per_min: float | None = None
    problems: list[str] = field(default_factory=list)  # outages: exit status 1
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "outage" if self.problems else "warning" if self.warnings else "ok"

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document["verdict"] = self.verdict
        return jsonable(document)  # type: ignore[no-any-return]


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


@dataclass
class KafkaView:
    """Offsets and group members as the broker sees them right now."""

    partitions: dict[str, list[int]]
    begin: dict[TopicPartition, int]
    end: dict[TopicPartition, int]
    members: dict[
        str, int
    ]  # group -> members; absent when the group has neither members nor offsets
    committed: dict[str, dict[TopicPartition, int]]  # group -> partition -> committed offset


def plain_consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
        request_timeout_ms=10000, metadata_max_age_ms=5000, fetch_max_wait_ms=100,
    )  # fmt: skip


async def true_end_offsets(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """End offsets as consumers see them: the larger of ListOffsets and a fetch's high watermark.

    Some brokers (the embedded Tansu) answer ListOffsets with the base offset + 1 of the last
    batch when it held several records; a fetch from there reports the true high watermark.
    """
    ends = await consumer.end_offsets(tps)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, ends[tp])
    pending = set(tps)
    deadline = time.monotonic() + 3.0
    while pending and time.monotonic() < deadline:
        await consumer.getmany(*pending, timeout_ms=200)
        for tp in list(pending):
            highwater = consumer.highwater(tp)
            if highwater is not None:
                ends[tp] = max(ends[tp], highwater)
                pending.discard(tp)
    return ends


async def partitions_of(consumer: AIOKafkaConsumer, topics: list[str]) -> dict[str, list[int]]:
    existing = await consumer.topics()
    return {t: sorted(consumer.partitions_for_topic(t) or []) for t in topics if t in existing}


async def kafka_view(bootstrap: str, topics: list[str], groups: dict[str, str]) -> KafkaView:
    """End and start offsets of `topics`; members and committed offsets of `groups` (group -> topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    consumer = plain_consumer(bootstrap)
    await admin.start()
    try:
        await consumer.start()
        partitions = await partitions_of(consumer, topics)
        tps = [TopicPartition(t, p) for t, ps in partitions.items() for p in ps]
        begin = await consumer.beginning_offsets(tps) if tps else {}
        end = await true_end_offsets(consumer, tps) if tps else {}
        members: dict[str, int] = {}
        committed: dict[str, dict[TopicPartition, int]] = {}
        # Groups are asked for by name, one at a time: some brokers list a group only once it
        # committed, and answer for an unknown group in a form the client cannot decode.
        for group in groups:
            try:
                described = await admin.describe_consumer_groups([group])
            except ValueError:
                continue
            for response in described:
                for error_code, name, _state, _type, _protocol, members_of in response.groups:
                    if error_code == 0 and name == group and members_of:
                        members[group] = len(members_of)
        for group, topic in groups.items():
            wanted = [TopicPartition(topic, p) for p in partitions.get(topic, [])]
            if wanted:
                offsets = await admin.list_consumer_group_offsets(group, partitions=wanted)
                committed[group] = {
                    tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0
                }
                if committed[group]:
                    members.setdefault(group, 0)
        return KafkaView(partitions, begin, end, members, committed)
    finally:
        await consumer.stop()
        await admin.close()


def _stage_offsets(view: KafkaView, stage: str, topic: str) -> tuple[int, int, int]:
    """(position, end, lag) of a stage summed over its topic's partitions."""
    group = group_of(stage)
    position = end = 0
    for partition in view.partitions.get(topic, []):
        tp = TopicPartition(topic, partition)
        start, stop = view.begin.get(tp, 0), view.end.get(tp, 0)
        offset = view.committed.get(group, {}).get(tp, -1)
        position += offset if offset >= 0 else start
        end += stop
    return position, end, max(end - position, 0)


def _progress(
    stage: StageStatus, history: list[asyncpg.Record], now: datetime, stall_seconds: float
) -> None:
    """Rate over about the last minute (newest sample at least a minute old, else the oldest
    of at least 5 s); stalled when a sample older than the limit had work waiting at the same
    position as now."""
    usable = [s for s in history if timedelta(seconds=5) <= now - s["at"] <= timedelta(minutes=10)]
    base = next(
        (s for s in usable if now - s["at"] >= timedelta(minutes=1)), usable[-1] if usable else None
    )
    if base is not None:
        moved = stage.committed - base["committed"]
        if moved >= 0:  # an in-memory broker that restarted starts again at 0
            stage.rate_per_min = moved / (now - base["at"]).total_seconds() * 60
    if stage.lag <= 0:
        return
    older = next((s for s in history if (now - s["at"]).total_seconds() >= stall_seconds), None)
    if (
        older is not None
        and older["committed"] == stage.committed
        and older["end_offset"] > older["committed"]
    ):
        stage.stalled_seconds = (now - older["at"]).total_seconds()


async def record_samples(
    conn: asyncpg.Connection, stages: list[StageStatus], min_interval: float
) -> None:
    """Keep this reading for later rates and stall checks (at most one per `min_interval`)."""
    await ops_reads.record_samples(
        conn, [(s.stage, s.committed, s.end, s.members) for s in stages], min_interval
    )


async def collect_status(
    bootstrap: str | None,
    pool: asyncpg.Pool | None,
    *,
    database_error: str | None = None,
    stall_seconds: float = 120.0,
    lag_warning: int = 1000,
    sample_interval: float = 2.0,
) -> Status:
    """Everything `loket status` and the ops view show, with problems (outages) and warnings."""
    now = datetime.now(UTC)
    status = Status(checked_at=now, database=database_error, bootstrap=bootstrap or "")
    stages = stage_topics()
    view: KafkaView | None = None
    if bootstrap:
        try:
            view = await asyncio.wait_for(
                kafka_view(
                    bootstrap,
                    [*stages.values(), bus.SHUNT],
                    {group_of(s): t for s, t in stages.items()},
                ),
                timeout=KAFKA_TIMEOUT,
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            status.broker = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    else:
        status.broker = "no broker configured"
    if status.broker:
        status.problems.append(f"broker unreachable at {bootstrap}: {status.broker}")

    if view is not None:
        status.stages = _stage_statuses(view, stages)
        shunt_tps = [TopicPartition(bus.SHUNT, p) for p in view.partitions.get(bus.SHUNT, [])]
        status.shunt_total = sum(view.end.get(tp, 0) - view.begin.get(tp, 0) for tp in shunt_tps)

    if pool is not None and status.database is None:
        try:
            async with pool.acquire(timeout=5) as conn:
                await _database_part(conn, status, view, stall_seconds, sample_interval)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            status.database = f"{type(exc).__name__}: {exc}"
    elif pool is None and status.database is None:
        status.database = "no database configured"
    if status.database:
        status.problems.append(f"database unreachable: {status.database}")

    for stage_status in status.stages:
        _judge(stage_status, status, stall_seconds, lag_warning)
    for channel in status.channels:
        if channel.state == "down":
            since = f" (last ok {ago(channel.last_ok_at, now)})" if channel.last_ok_at else ""
            status.problems.append(
                f"channel {channel.channel}/{channel.account} down{since}: {channel.last_error}"
            )
    if status.shunt_pending:
        status.warnings.append(
            f"{status.shunt_pending} shunted message(s) not replayed (loket dlq list)"
        )
    if status.outbox_oldest_seconds is not None and status.outbox_oldest_seconds > stall_seconds:
        status.problems.append(
            f"outbox: {status.outbox_due} row(s) due, oldest waiting {status.outbox_oldest_seconds:.0f}s"
            " (is the relay running?)"
        )
    return status


def _stage_statuses(view: KafkaView, stages: dict[str, str]) -> list[StageStatus]:
    found = []
    for stage, topic in stages.items():
        group = group_of(stage)
        position, end, lag = _stage_offsets(view, stage, topic)
        if group not in view.members and end == 0:
            continue  # a stage this installation does not run, with nothing waiting for it
        found.append(
            StageStatus(stage, group, topic, view.members.get(group, 0), position, end, lag)
        )
    return found


def sample_interval_for(stall_seconds: float) -> float:
    """How often the running installation samples its stages: twice per stall limit, at most
    every minute (each sample opens its own connections to the broker, which an idle
    installation should not do every few seconds)."""
    return min(60.0, max(1.0, stall_seconds / 2))


async def watch_stages(
    bootstrap: str, pool: asyncpg.Pool, stop: asyncio.Event, stall_seconds: float
) -> None:
    """Sample every stage's committed and end offsets while running.

    `loket status` and the ops view find a stall by comparing with a sample at least
    LOKET_STALL_SECONDS old; these samples let the first look after a stall tell.
    """
    interval = sample_interval_for(stall_seconds)
    stages = stage_topics()
    while not stop.is_set():
        try:
            view = await asyncio.wait_for(
                kafka_view(
                    bootstrap, list(stages.values()), {group_of(s): t for s, t in stages.items()}
                ),
                timeout=KAFKA_TIMEOUT,
            )
            async with pool.acquire(timeout=5) as conn:
                await record_samples(conn, _stage_statuses(view, stages), interval * 0.8)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("stage samples not taken: %s", exc)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not is_transient(exc):
                raise
            log.debug("stage samples not written: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _database_part(
    conn: asyncpg.Connection,
    status: Status,
    view: KafkaView | None,
    stall_seconds: float,
    sample_interval: float,
) -> None:
    outbox = await ops_reads.outbox_state(conn)
    status.outbox_due, status.outbox_scheduled = outbox["due"], outbox["scheduled"]
    status.outbox_oldest_seconds = float(outbox["oldest"]) if outbox["oldest"] is not None else None
    status.channels = [ChannelHealth(**r) for r in await ops_reads.channel_health(conn)]
    traffic = await ops_reads.recent_traffic(conn)
    status.inbound_per_min, status.outbound_per_min = (
        traffic["inbound"] / 5,
        traffic["outbound"] / 5,
    )
    if view is None:
        return
    if status.shunt_total is not None:
        spans = {p: (view.begin.get(TopicPartition(bus.SHUNT, p), 0), view.end.get(TopicPartition(bus.SHUNT, p), 0))
                 for p in view.partitions.get(bus.SHUNT, [])}  # fmt: skip
        replayed = await conn.fetch(
            'SELECT partition, "offset" FROM shunt_replays WHERE topic = $1', bus.SHUNT
        )
        done = sum(1 for r in replayed if r["partition"] in spans
                   and spans[r["partition"]][0] <= r["offset"] < spans[r["partition"]][1])  # fmt: skip
        status.shunt_pending = status.shunt_total - done
    history = await ops_reads.recent_samples(conn)
    now = datetime.now(UTC)
    for stage in status.stages:
        _progress(stage, history.get(stage.stage, []), now, stall_seconds)
    await record_samples(conn, status.stages, sample_interval)


def _judge(stage: StageStatus, status: Status, stall_seconds: float, lag_warning: int) -> None:
    if stage.members == 0:
        if stage.lag > 0:
            stage.state = "no consumer"
            status.problems.append(
                f"stage {stage.stage}: no consumer and {stage.lag} record(s) waiting"
            )
        else:
            stage.state = "stopped"
            status.warnings.append(f"stage {stage.stage}: no consumer (nothing waiting yet)")
        return
    if stage.stalled_seconds is not None:
        stage.state = "stalled"
        status.problems.append(
            f"stage {stage.stage}: {stage.lag} record(s) waiting and no progress for"
            f" {stage.stalled_seconds:.0f}s (its consumer is gone or stuck)"
        )
    elif stage.lag > lag_warning:
        stage.state = "lagging"
        status.warnings.append(f"stage {stage.stage}: {stage.lag} record(s) behind")
    elif stage.lag == 0 and not stage.rate_per_min:
        stage.state = "idle"


def ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = max((now - moment).total_seconds(), 0)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


async def series(conn: asyncpg.Connection, minutes: int = 60) -> dict[str, Any]:
    """Per-minute throughput (stored inbound, sent outbound) and stage lag over the last `minutes`."""
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    buckets = [start + timedelta(minutes=i) for i in range(minutes)]
    index = {b: i for i, b in enumerate(buckets)}
    inbound, outbound = [0] * minutes, [0] * minutes
    counted = await ops_reads.per_minute(conn, start)
    for row in counted["inbound"]:
        if row["minute"] in index:
            inbound[index[row["minute"]]] = row["n"]
    for row in counted["outbound"]:
        if row["minute"] in index:
            outbound[index[row["minute"]]] = row["n"]
    lag: dict[str, list[int | None]] = {}
    for row in counted["lag"]:
        if row["minute"] in index:
            lag.setdefault(row["stage"], [None] * minutes)[index[row["minute"]]] = max(
                int(row["lag"]), 0
            )
    return {
        "minutes": [b.isoformat() for b in buckets],
        "inbound": inbound,
        "outbound": outbound,
        "lag": lag,
    }
