"""The inbound journal: records a webhook accepted, kept in PostgreSQL until they are stored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg


@dataclass(frozen=True)
class Entry:
    """One record to publish; `natural_key` is `(channel, account, external_id)` of a message."""

    topic: str
    value: bytes
    key: bytes | None = None
    natural_key: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Due:
    """A journal row the relay publishes; `published_at` is set when it goes out again."""

    id: int
    topic: str
    value: bytes
    key: bytes | None
    published_at: datetime | None


@dataclass(frozen=True)
class Republish:
    """When an acknowledged message not yet stored is published again.

    After a broker reset at `reset_at`, at once; otherwise `after` its last publish, then
    twice as long after each further one, at most `times` times.
    """

    reset_at: datetime | None
    after: timedelta
    times: int


@dataclass(frozen=True)
class Pruned:
    """What one pruning removed: stored messages, old receipts, and messages given up on."""

    stored: int
    receipts: int
    abandoned: list[tuple[str, str, str]]


async def append(conn: asyncpg.Connection, entries: Sequence[Entry]) -> list[int]:
    """Write `entries` in one statement; returns their ids in the order given."""
    keys = [e.natural_key or (None, None, None) for e in entries]
    rows = await conn.fetch(
        "INSERT INTO inbound_journal (topic, key, value, channel, account, external_id)"
        " SELECT topic, key, value, channel, account, external_id"
        " FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[], $5::text[], $6::text[])"
        "   WITH ORDINALITY AS e(topic, key, value, channel, account, external_id, ord)"
        " ORDER BY ord RETURNING id",
        [e.topic for e in entries], [e.key for e in entries], [e.value for e in entries],
        [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
    )  # fmt: skip
    # Ids come from one sequence in insertion order, which follows `ord`.
    return sorted(row["id"] for row in rows)


async def mark_published(conn: asyncpg.Connection, ids: Sequence[int], sent_at: datetime) -> None:
    """The broker acknowledged rows `ids` in a publish started at `sent_at`.

    Committed without waiting for the disk: a mark lost in a crash only means the relay
    publishes the row once more, and every webhook would otherwise wait for a second flush.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL synchronous_commit TO off")
        await conn.execute(
            "UPDATE inbound_journal SET published_at = greatest(published_at, $2),"
            " publishes = publishes + 1 WHERE id = ANY($1::bigint[])",
            list(ids),
            sent_at,
        )


async def forget(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    """Remove rows whose records the broker refused for good (too large to ever be written)."""
    await conn.execute("DELETE FROM inbound_journal WHERE id = ANY($1::bigint[])", list(ids))


async def lock_due(
    conn: asyncpg.Connection,
    *,
    now: datetime,
    settle_seconds: float,
    republish: Republish,
    limit: int,
) -> list[Due]:
    """Rows to publish, oldest first, locked until the caller's transaction ends.

    Due are rows never acknowledged and older than `settle_seconds` (younger ones may still
    be in the hands of the webhook that wrote them), and acknowledged ones `republish` says
    to send again. Must run in a transaction.
    """
    rows = await conn.fetch(
        "SELECT id, topic, value, key, published_at FROM inbound_journal"
        " WHERE (published_at IS NULL AND created_at < $1::timestamptz - make_interval(secs => $2))"
        "    OR published_at < $3"
        "    OR (external_id IS NOT NULL AND publishes <= $4"
        "        AND published_at < $1::timestamptz - make_interval(secs => $5 * 2 ^ (publishes - 1)))"
        " ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED",
        now, settle_seconds, republish.reset_at, republish.times,
        republish.after.total_seconds(), limit,
    )  # fmt: skip
    return [Due(r["id"], r["topic"], r["value"], r["key"], r["published_at"]) for r in rows]


async def prune(
    conn: asyncpg.Connection, *, receipts_before: datetime, abandon_before: datetime
) -> Pruned:
    """Remove messages now stored, receipts published before `receipts_before`, and messages
    written before `abandon_before` that were published but never stored (shunted: the shunt
    topic has them).
    """
    stored = await conn.execute(
        "DELETE FROM inbound_journal j USING messages m"
        " WHERE j.external_id IS NOT NULL AND m.direction = 'in' AND m.channel = j.channel"
        "   AND m.account = j.account AND m.external_id = j.external_id"
    )
    receipts = await conn.execute(
        "DELETE FROM inbound_journal WHERE external_id IS NULL AND published_at < $1",
        receipts_before,
    )
    abandoned = await conn.fetch(
        "DELETE FROM inbound_journal WHERE external_id IS NOT NULL AND publishes > 0"
        " AND created_at < $1 RETURNING channel, account, external_id",
        abandon_before,
    )
    return Pruned(
        stored=int(stored.split()[-1]),
        receipts=int(receipts.split()[-1]),
        abandoned=[(r["channel"], r["account"], r["external_id"]) for r in abandoned],
    )


async def backlog(conn: asyncpg.Connection) -> int:
    """Rows not yet pruned."""
    return int(await conn.fetchval("SELECT count(*) FROM inbound_journal"))
