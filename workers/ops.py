"""Operations: pipeline status from Kafka and PostgreSQL, message traces, and the shunt (list, show, replay)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from ticketing.db import is_transient
from workers import bus, registry

log = logging.getLogger(__name__)

# How long the pollers and webhooks let pass between two "still up" writes per account.
HEALTH_WRITE_SECONDS = 10.0
_KAFKA_TIMEOUT = 15.0


def stage_topics() -> dict[str, str]:
    """Every consuming stage (see `workers.registry`) and the topic it reads."""
    return {consumer.name: consumer.topic for consumer in registry.consumers()}


def group_of(stage: str) -> str:
    return registry.consumer(stage).group


# ---------------------------------------------------------------- channel health


_health_written: dict[tuple[str, str], tuple[str, float]] = {}


async def note_channel_ok(pool: asyncpg.Pool, channel: str, account: str) -> None:
    """Record that a channel account works; written on a change of state, else every few seconds."""
    key = (channel, account)
    state, written = _health_written.get(key, ("", 0.0))
    now = time.monotonic()
    if state == "up" and now - written < HEALTH_WRITE_SECONDS:
        return
    await _write_health(
        pool, key, "up",
        "INSERT INTO channel_health (channel, account, state, last_ok_at, last_error, updated_at)"
        " VALUES ($1, $2, 'up', now(), NULL, now()) ON CONFLICT (channel, account) DO UPDATE"
        " SET state = 'up', last_ok_at = now(), last_error = NULL, updated_at = now()",
    )  # fmt: skip


async def note_channel_down(pool: asyncpg.Pool, channel: str, account: str, error: str) -> None:
    """Record that a channel account fails, and why (the last success stays as it was)."""
    await _write_health(
        pool, (channel, account), "down",
        "INSERT INTO channel_health (channel, account, state, last_error, updated_at)"
        " VALUES ($1, $2, 'down', $3, now()) ON CONFLICT (channel, account) DO UPDATE"
        " SET state = 'down', last_error = excluded.last_error, updated_at = now()",
        error[:500],
    )  # fmt: skip


async def _write_health(
    pool: asyncpg.Pool, key: tuple[str, str], state: str, sql: str, *extra: Any
) -> None:
    try:
        async with pool.acquire(timeout=5) as conn:
            await conn.execute(sql, *key, *extra)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if not (is_transient(exc) or isinstance(exc, asyncpg.UndefinedTableError)):
            raise
        # The database is away: `loket status` reports that itself; the next poll writes again.
        log.debug("channel health for %s/%s not written: %s", *key, exc)
        return
    except (OSError, TimeoutError) as exc:
        log.debug("channel health for %s/%s not written: %s", *key, exc)
        return
    _health_written[key] = (state, time.monotonic())


# ---------------------------------------------------------------- status


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
        return _jsonable(document)  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
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


def _consumer(bootstrap: str) -> AIOKafkaConsumer:
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


async def _partitions(consumer: AIOKafkaConsumer, topics: list[str]) -> dict[str, list[int]]:
    existing = await consumer.topics()
    return {t: sorted(consumer.partitions_for_topic(t) or []) for t in topics if t in existing}


async def kafka_view(bootstrap: str, topics: list[str], groups: dict[str, str]) -> KafkaView:
    """End and start offsets of `topics`; members and committed offsets of `groups` (group -> topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    consumer = _consumer(bootstrap)
    await admin.start()
    try:
        await consumer.start()
        partitions = await _partitions(consumer, topics)
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


async def _previous_samples(conn: asyncpg.Connection) -> dict[str, list[asyncpg.Record]]:
    rows = await conn.fetch(
        "SELECT stage, at, committed, end_offset FROM stage_samples"
        " WHERE at > now() - interval '2 hours' ORDER BY stage, at DESC"
    )
    samples: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        samples.setdefault(row["stage"], []).append(row)
    return samples


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
    last = await conn.fetchval("SELECT extract(epoch FROM now() - max(at)) FROM stage_samples")
    if last is not None and float(last) < min_interval:
        return
    await conn.executemany(
        "INSERT INTO stage_samples (stage, committed, end_offset, members) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        [(s.stage, s.committed, s.end, s.members) for s in stages],
    )
    await conn.execute("DELETE FROM stage_samples WHERE at < now() - interval '2 hours'")


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
                timeout=_KAFKA_TIMEOUT,
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
            since = f" (last ok {_ago(channel.last_ok_at, now)})" if channel.last_ok_at else ""
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
    """How often the running installation samples its stages: several times per stall limit."""
    return min(10.0, max(1.0, stall_seconds / 4))


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
                timeout=_KAFKA_TIMEOUT,
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
    outbox = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE available_at <= now()) AS due,"
        " count(*) FILTER (WHERE available_at > now()) AS scheduled,"
        " extract(epoch FROM now() - min(available_at) FILTER (WHERE available_at <= now())) AS oldest"
        " FROM outbox"
    )
    status.outbox_due, status.outbox_scheduled = outbox["due"], outbox["scheduled"]
    status.outbox_oldest_seconds = float(outbox["oldest"]) if outbox["oldest"] is not None else None
    status.channels = [
        ChannelHealth(**dict(r))
        for r in await conn.fetch(
            "SELECT channel, account, state, last_ok_at, last_error, updated_at FROM channel_health"
            " ORDER BY channel, account"
        )
    ]
    traffic = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE direction = 'in' AND created_at > now() - interval '5 minutes') AS inbound,"
        " count(*) FILTER (WHERE direction = 'out' AND sent_at > now() - interval '5 minutes') AS outbound"
        " FROM messages WHERE created_at > now() - interval '1 day'"
    )
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
    history = await _previous_samples(conn)
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


def _ago(moment: datetime | None, now: datetime) -> str:
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
    for row in await conn.fetch(
        "SELECT date_trunc('minute', created_at) AS minute, count(*) AS n FROM messages"
        " WHERE direction = 'in' AND created_at >= $1 GROUP BY 1", start,
    ):  # fmt: skip
        if row["minute"] in index:
            inbound[index[row["minute"]]] = row["n"]
    for row in await conn.fetch(
        "SELECT date_trunc('minute', sent_at) AS minute, count(*) AS n FROM messages"
        " WHERE direction = 'out' AND sent_at >= $1 GROUP BY 1", start,
    ):  # fmt: skip
        if row["minute"] in index:
            outbound[index[row["minute"]]] = row["n"]
    lag: dict[str, list[int | None]] = {}
    for row in await conn.fetch(
        "SELECT date_trunc('minute', at) AS minute, stage, max(end_offset - committed) AS lag"
        " FROM stage_samples WHERE at >= $1 GROUP BY 1, 2", start,
    ):  # fmt: skip
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


# ---------------------------------------------------------------- shunt


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
    consumer = _consumer(bootstrap)
    await consumer.start()
    try:
        partitions = (await _partitions(consumer, [bus.SHUNT])).get(bus.SHUNT, [])
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


# ---------------------------------------------------------------- trace


@dataclass
class Hop:
    hop: str  # received, matched, ticketed, replied, sent, delivered, read, failed, shunted, replayed
    at: datetime | None
    detail: str


@dataclass
class Trace:
    query: str
    trace_id: str | None = None
    message_id: int | None = None
    ticket_id: int | None = None
    hops: list[Hop] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))  # type: ignore[no-any-return]


def _epoch(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(value), UTC) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError, OSError):
        return None


async def trace(
    conn: asyncpg.Connection,
    ident: str,
    shunt: list[ShuntEntry] | None = None,
    *,
    shunt_errors: bool = True,
) -> Trace:
    """The path of one message (trace id or message id): received, matched, ticketed, replies and their delivery.

    A shunted hop gives the stage's error only with `shunt_errors`: it may quote the record
    (an address, a text) and internals, which are for those who may read the shunt.
    """
    result = Trace(query=ident)
    message = None
    if ident.isdigit() and len(ident) < 19:
        message = await conn.fetchrow("SELECT * FROM messages WHERE id = $1", int(ident))
    if message is None:
        message = await conn.fetchrow(
            "SELECT * FROM messages WHERE trace_id = $1 ORDER BY direction, id LIMIT 1", ident
        )
    if message is not None:
        result.message_id, result.ticket_id = message["id"], message["ticket_id"]
        result.trace_id = message["trace_id"]
        if message["direction"] == "in":
            await _inbound_hops(conn, message, result)
        else:
            await _reply_hops(conn, message, result)
    else:
        result.trace_id = ident
    for entry in shunt or []:
        record = entry.record
        if record is None or not (record.trace_id == (result.trace_id or ident)):
            continue
        why = f": {record.error}" if shunt_errors else ""
        result.hops.append(Hop(
            "shunted", _epoch(record.at),
            f"stage {record.stage} gave up on {record.topic}@{record.partition}:{record.offset} after"
            f" {record.attempts} attempt(s){why} (shunt record {entry.id})",
        ))  # fmt: skip
        if entry.replayed_at is not None:
            result.hops.append(
                Hop("replayed", entry.replayed_at, f"shunt record {entry.id} republished")
            )
    result.hops.sort(key=lambda h: h.at or datetime.max.replace(tzinfo=UTC))
    return result


async def _inbound_hops(conn: asyncpg.Connection, message: asyncpg.Record, result: Trace) -> None:
    meta = message["meta"] or {}
    sent = (
        f"; the provider dated it {message['received_at'].isoformat()}"
        if message["received_at"]
        else ""
    )
    result.hops.append(Hop(
        "received", _epoch(meta.get("accepted_at")) or message["received_at"],
        f"{message['channel']}/{message['account']} from {message['sender']}"
        f" (external id {message['external_id']}){sent}",
    ))  # fmt: skip
    caller = await conn.fetchrow(
        "SELECT id, name, created_at FROM callers WHERE id = $1", message["caller_id"]
    )
    event = await conn.fetchrow(
        "SELECT at, data FROM ticket_events WHERE ticket_id = $1 AND kind = 'message'"
        " AND data->>'message_id' = $2 ORDER BY id LIMIT 1",
        message["ticket_id"], str(message["id"]),
    )  # fmt: skip
    reason = (event["data"] or {}).get("match") if event else None
    name = f" ({caller['name']})" if caller and caller["name"] else ""
    result.hops.append(Hop(
        "matched", _epoch(meta.get("normalized_at")),
        f"caller #{message['caller_id']}{name}: {reason or 'no match reason recorded'}",
    ))  # fmt: skip
    ticket = await conn.fetchrow(
        "SELECT id, created_at, subject FROM tickets WHERE id = $1", message["ticket_id"]
    )
    reopened = await conn.fetchval(
        "SELECT 1 FROM ticket_events WHERE ticket_id = $1 AND kind = 'reopened' AND at = $2",
        message["ticket_id"], message["created_at"],
    )  # fmt: skip
    if ticket["created_at"] == message["created_at"]:
        outcome = "new ticket"
    elif reopened:
        outcome = "reopened the ticket"
    else:
        outcome = "appended to the open ticket"
    flag = ", auto-reply" if message["auto_reply"] else ""
    result.hops.append(Hop(
        "ticketed", message["created_at"],
        f"ticket #{ticket['id']} \"{ticket['subject']}\": {outcome}{flag}; message #{message['id']}",
    ))  # fmt: skip
    answers = await conn.fetch(
        "SELECT * FROM messages WHERE ticket_id = $1 AND direction = 'out' AND id > $2 AND id < coalesce("
        " (SELECT min(id) FROM messages WHERE ticket_id = $1 AND direction = 'in' AND id > $2), 9223372036854775807)"
        " ORDER BY id LIMIT 20",
        message["ticket_id"], message["id"],
    )  # fmt: skip
    for reply in answers:
        await _reply_hops(conn, reply, result)


async def _reply_hops(conn: asyncpg.Connection, reply: asyncpg.Record, result: Trace) -> None:
    now_status = reply["status"] + (
        f" ({reply['status_reason']})" if reply["status_reason"] else ""
    )
    result.hops.append(Hop(
        "replied", reply["created_at"],
        f"reply #{reply['id']} by {reply['sender'] or 'an agent'} on {reply['channel']}/{reply['account']}"
        f" to {reply['recipient']}, queued; now {now_status}",
    ))  # fmt: skip
    for event in await conn.fetch(
        "SELECT at, note, data FROM ticket_events WHERE ticket_id = $1 AND kind = 'delivery'"
        " AND data->>'message_id' = $2 ORDER BY id",
        reply["ticket_id"], str(reply["id"]),
    ):  # fmt: skip
        data = event["data"] or {}
        state = data.get("status", "delivery")
        detail = f"reply #{reply['id']}"
        if data.get("provider_id"):
            detail += f", provider id {data['provider_id']}"
        if event["note"]:
            detail += f": {event['note']}"
        result.hops.append(Hop(state, event["at"], detail))


# ---------------------------------------------------------------- command line


def _needs(settings: Any, *, broker: bool = True, database: bool = True) -> None:
    from workers.settings import ConfigError

    missing = [name for name, wanted, value in (
        ("LOKET_DATABASE_URL", database, settings.database_url),
        ("LOKET_KAFKA_BOOTSTRAP", broker, settings.kafka_bootstrap),
    ) if wanted and not value]  # fmt: skip
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set: this command reads a running installation's database"
            " and broker (an embedded `loket up` keeps them to itself)"
        )


@contextlib.asynccontextmanager
async def _connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection that speaks JSON for json/jsonb columns, like the workers' pools."""
    from ticketing.db import create_pool

    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            yield conn
    finally:
        await pool.close()


async def _open_pool(url: str) -> tuple[asyncpg.Pool | None, str | None]:
    from ticketing.db import create_pool

    try:
        pool = await asyncio.wait_for(create_pool(url, min_size=1, max_size=2), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return pool, None


def render_status(status: Status, console: Any) -> None:
    """One screen: stages, shunt, outbox, channels, traffic, and the verdict."""
    from rich.table import Table
    from rich.text import Text

    colours = {"ok": "green", "warning": "yellow", "outage": "bold red"}
    local = status.checked_at.astimezone()
    console.print(
        f"[bold]loket status[/bold] at {local:%Y-%m-%d %H:%M:%S %Z}  "
        f"database: {'ok' if status.database is None else '[red]unreachable[/red]'}  "
        f"broker: {'ok' if status.broker is None else '[red]unreachable[/red]'} ({status.bootstrap or '-'})"
    )
    stages = Table(title="Stages", title_justify="left")
    for column, justify in (("stage", "left"), ("topic", "left"), ("consumers", "right"), ("lag", "right"),
                            ("rate/min", "right"), ("state", "left")):  # fmt: skip
        stages.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    state_colours = {"ok": "green", "idle": "green", "stopped": "yellow", "lagging": "yellow",
                     "stalled": "bold red", "no consumer": "bold red"}  # fmt: skip
    for stage in status.stages:
        rate = f"{stage.rate_per_min:.1f}" if stage.rate_per_min is not None else "-"
        state = stage.state + (f" {stage.stalled_seconds:.0f}s" if stage.stalled_seconds else "")
        stages.add_row(
            stage.stage,
            stage.topic,
            str(stage.members),
            str(stage.lag),
            rate,
            Text(state, style=state_colours.get(stage.state, "")),
        )
    if status.stages:
        console.print(stages)
    elif status.broker is None:
        console.print("Stages: no consumer group and no records yet")
    shunt = "-" if status.shunt_total is None else f"{status.shunt_total} record(s)"
    if status.shunt_pending:
        shunt += f", [yellow]{status.shunt_pending} not replayed[/yellow]"
    console.print(f"Shunt: {shunt}")
    if status.outbox_due is not None:
        oldest = (
            f", oldest due {status.outbox_oldest_seconds:.0f}s ago"
            if status.outbox_oldest_seconds
            else ""
        )
        console.print(
            f"Outbox: {status.outbox_due} due, {status.outbox_scheduled} scheduled for retry{oldest}"
        )
    if status.channels:
        channels = Table(title="Channels", title_justify="left")
        for column in ("channel", "account", "state", "last ok", "last error"):
            channels.add_column(
                column, no_wrap=column != "last error", overflow="fold", max_width=60
            )
        for channel in status.channels:
            colour = "green" if channel.state == "up" else "bold red"
            channels.add_row(
                channel.channel,
                channel.account,
                Text(channel.state, style=colour),
                _ago(channel.last_ok_at, status.checked_at),
                channel.last_error or "",
            )
        console.print(channels)
    elif status.database is None:
        console.print("Channels: none has reported yet")
    if status.inbound_per_min is not None:
        console.print(
            f"Traffic (last 5 min): {status.inbound_per_min:.1f} inbound stored/min,"
            f" {status.outbound_per_min:.1f} replies sent/min"
        )
    for problem in status.problems:
        console.print(f"[bold red]OUTAGE[/bold red] {problem}")
    for warning in status.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}")
    console.print(Text(f"verdict: {status.verdict}", style=colours[status.verdict]))


async def run_status(
    settings: Any,
    *,
    as_json: bool = False,
    stall_seconds: float | None = None,
    lag_warning: int = 1000,
) -> int:
    """`loket status`: exit 0 when healthy or only warnings, 1 on an outage."""
    import json

    from rich.console import Console

    _needs(settings)
    if stall_seconds is None:
        stall_seconds = float(settings.stall_seconds)
    pool, error = await _open_pool(settings.database_url)
    try:
        status = await collect_status(
            settings.kafka_bootstrap,
            pool,
            database_error=error,
            stall_seconds=stall_seconds,
            lag_warning=lag_warning,
        )
    finally:
        if pool is not None:
            await pool.close()
    if as_json:
        print(json.dumps(status.as_json(), ensure_ascii=False, indent=2))
    else:
        render_status(status, Console())
    return status.exit_code


def render_trace(found: Trace, console: Any) -> None:
    from rich.table import Table

    heading = f"trace {found.trace_id or found.query}"
    if found.message_id:
        heading += f": message #{found.message_id} on ticket #{found.ticket_id}"
    table = Table(title=heading, title_justify="left")
    table.add_column("when", no_wrap=True)
    table.add_column("+", justify="right", no_wrap=True)
    table.add_column("hop", no_wrap=True)
    table.add_column("detail", overflow="fold")
    first = next((h.at for h in found.hops if h.at), None)
    for hop in found.hops:
        when = hop.at.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if hop.at else "-"
        since = f"{(hop.at - first).total_seconds():.3f}s" if hop.at and first else ""
        table.add_row(when, since, hop.hop, hop.detail)
    console.print(table)


async def run_trace(settings: Any, ident: str, *, as_json: bool = False) -> int:
    """`loket trace ID`: exit 1 when nothing is known about the id."""
    import json

    from rich.console import Console

    _needs(settings)
    async with _connection(settings.database_url) as conn:
        entries = await shunt_entries(settings.kafka_bootstrap, conn)
        found = await trace(conn, ident, entries)
    if as_json:
        print(json.dumps(found.as_json(), ensure_ascii=False, indent=2))
    elif found.hops:
        render_trace(found, Console())
    if not found.hops:
        if not as_json:
            print(
                f"nothing known about {ident}: no stored message and no shunted record carries it"
                " (still on its way? see loket status)"
            )
        return 1
    return 0


async def run_dlq(
    settings: Any,
    command: str,
    ids: list[str],
    *,
    stage: str | None = None,
    everything: bool = False,
    force: bool = False,
    as_json: bool = False,
) -> int:
    """`loket dlq list|show|replay`."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    _needs(settings)
    console = Console()
    async with _connection(settings.database_url) as conn:
        entries = await shunt_entries(settings.kafka_bootstrap, conn)
        if command == "list":
            if as_json:
                print(json.dumps([e.summary() for e in entries], ensure_ascii=False, indent=2))
                return 0
            if not entries:
                console.print("the shunt is empty")
                return 0
            table = Table(title=f"Shunt: {len(entries)} record(s)", title_justify="left")
            for column in ("id", "when", "stage", "from", "error", "replayed"):
                table.add_column(column, no_wrap=column != "error", overflow="fold")
            for entry in entries:
                s = entry.summary()
                shunted = _epoch(entry.record.at) if entry.record else None
                when = shunted.astimezone().strftime("%m-%d %H:%M:%S") if shunted else "-"
                replayed = (Text(entry.replayed_at.astimezone().strftime("%m-%d %H:%M:%S"), style="green")
                            if entry.replayed_at else Text("no", style="yellow"))  # fmt: skip
                table.add_row(
                    entry.id,
                    when,
                    s["stage"] or "?",
                    f"{s['topic']}:{s['source_partition']}@{s['source_offset']}",
                    s["error"],
                    replayed,
                )
            console.print(table)
            return 0
        try:
            chosen = select(entries, ids, stage, everything)
        except ShuntSelectionError as exc:
            print(f"loket dlq: {exc}")
            return 1
        if command == "show":
            for entry in chosen:
                document = entry.full()
                if as_json:
                    print(json.dumps(document, ensure_ascii=False, indent=2))
                    continue
                console.rule(f"shunt record {entry.id}")
                for name in (
                    "stage",
                    "topic",
                    "source_partition",
                    "source_offset",
                    "key",
                    "trace_id",
                    "attempts",
                    "at",
                    "replayed_at",
                    "error",
                ):
                    console.print(
                        f"[bold]{name}[/bold]: {escape(str(document[name]))}", highlight=False
                    )
                console.print("[bold]traceback[/bold]:")
                console.print(document.get("traceback") or "-", markup=False, highlight=False)
                console.print("[bold]payload[/bold]:")
                console.print(document["payload"], markup=False, highlight=False)
            return 0
        results = await replay(settings.kafka_bootstrap, conn, chosen, force=force)
    if as_json:
        print(json.dumps([{"id": r.entry.id, "outcome": r.outcome} for r in results], indent=2))
    else:
        for result in results:
            print(f"{result.entry.id}: {result.outcome}")
        if not results:
            print("nothing to replay")
    return 0
