"""What operations read of the database: stage samples, the outbox, channel health, traffic."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

# How long stage samples are kept: enough for rates, stall checks and the ops view's hour.
SAMPLES_KEPT = "2 hours"


async def recent_samples(conn: asyncpg.Connection) -> dict[str, list[asyncpg.Record]]:
    """Each stage's samples (`at, committed, end_offset`), newest first."""
    rows = await conn.fetch(
        "SELECT stage, at, committed, end_offset FROM stage_samples"
        f" WHERE at > now() - interval '{SAMPLES_KEPT}' ORDER BY stage, at DESC"
    )
    samples: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        samples.setdefault(row["stage"], []).append(row)
    return samples


async def record_samples(
    conn: asyncpg.Connection, samples: Sequence[tuple[str, int, int, int]], min_interval: float
) -> None:
    """Keep `(stage, committed, end offset, members)` readings, at most one per `min_interval`
    seconds; older than the kept span are dropped."""
    last = await conn.fetchval("SELECT extract(epoch FROM now() - max(at)) FROM stage_samples")
    if last is not None and float(last) < min_interval:
        return
    await conn.executemany(
        "INSERT INTO stage_samples (stage, committed, end_offset, members) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        list(samples),
    )
    await conn.execute(f"DELETE FROM stage_samples WHERE at < now() - interval '{SAMPLES_KEPT}'")


async def outbox_state(conn: asyncpg.Connection) -> dict[str, Any]:
    """`due` and `scheduled` outbox rows, and `oldest`: seconds the oldest due one waits."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE available_at <= now()) AS due,"
        " count(*) FILTER (WHERE available_at > now()) AS scheduled,"
        " extract(epoch FROM now() - min(available_at) FILTER (WHERE available_at <= now())) AS oldest"
        " FROM outbox"
    )
    return dict(row)


async def channel_health(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Each channel account's state as its poller or webhook last wrote it."""
    rows = await conn.fetch(
        "SELECT channel, account, state, last_ok_at, last_error, updated_at FROM channel_health"
        " ORDER BY channel, account"
    )
    return [dict(r) for r in rows]


async def recent_traffic(conn: asyncpg.Connection) -> dict[str, int]:
    """Messages in and replies sent in the last 5 minutes (`inbound`, `outbound`)."""
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE direction = 'in' AND created_at > now() - interval '5 minutes') AS inbound,"
        " count(*) FILTER (WHERE direction = 'out' AND sent_at > now() - interval '5 minutes') AS outbound"
        " FROM messages WHERE created_at > now() - interval '1 day'"
    )
    return dict(row)


async def per_minute(conn: asyncpg.Connection, start: datetime) -> dict[str, list[asyncpg.Record]]:
    """Since `start`, per minute: messages in (`inbound`), replies sent (`outbound`), and each
    stage's largest lag (`lag`)."""
    return {
        "inbound": await conn.fetch(
            "SELECT date_trunc('minute', created_at) AS minute, count(*) AS n FROM messages"
            " WHERE direction = 'in' AND created_at >= $1 GROUP BY 1", start,
        ),
        "outbound": await conn.fetch(
            "SELECT date_trunc('minute', sent_at) AS minute, count(*) AS n FROM messages"
            " WHERE direction = 'out' AND sent_at >= $1 GROUP BY 1", start,
        ),
        "lag": await conn.fetch(
            "SELECT date_trunc('minute', at) AS minute, stage, max(end_offset - committed) AS lag"
            " FROM stage_samples WHERE at >= $1 GROUP BY 1, 2", start,
        ),
    }  # fmt: skip


# --- what a message trace reads ------------------------------------------------------------


async def traced_message(conn: asyncpg.Connection, ident: str) -> asyncpg.Record | None:
    """The message a trace starts from: by message id, else the first with that trace id."""
    message = None
    if ident.isdigit() and len(ident) < 19:
        message = await conn.fetchrow("SELECT * FROM messages WHERE id = $1", int(ident))
    if message is None:
        message = await conn.fetchrow(
            "SELECT * FROM messages WHERE trace_id = $1 ORDER BY direction, id LIMIT 1", ident
        )
    return message


async def caller_brief(conn: asyncpg.Connection, caller_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT id, name, created_at FROM callers WHERE id = $1", caller_id)


async def ticket_brief(conn: asyncpg.Connection, ticket_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, created_at, subject FROM tickets WHERE id = $1", ticket_id
    )


async def message_event(
    conn: asyncpg.Connection, ticket_id: int, message_id: int
) -> asyncpg.Record | None:
    """The `message` event that stored a message (`at`, `data` with the match reason)."""
    return await conn.fetchrow(
        "SELECT at, data FROM ticket_events WHERE ticket_id = $1 AND kind = 'message'"
        " AND data->>'message_id' = $2 ORDER BY id LIMIT 1",
        ticket_id, str(message_id),
    )  # fmt: skip


async def reopened_at(conn: asyncpg.Connection, ticket_id: int, at: datetime) -> bool:
    """Whether the ticket was reopened in the transaction that stored a message at `at`."""
    found = await conn.fetchval(
        "SELECT 1 FROM ticket_events WHERE ticket_id = $1 AND kind = 'reopened' AND at = $2",
        ticket_id, at,
    )  # fmt: skip
    return found is not None


async def answers(
    conn: asyncpg.Connection, ticket_id: int, message_id: int
) -> list[asyncpg.Record]:
    """The replies written after an inbound message and before the caller's next one (20 at most)."""
    return list(await conn.fetch(
        "SELECT * FROM messages WHERE ticket_id = $1 AND direction = 'out' AND id > $2 AND id < coalesce("
        " (SELECT min(id) FROM messages WHERE ticket_id = $1 AND direction = 'in' AND id > $2), 9223372036854775807)"
        " ORDER BY id LIMIT 20",
        ticket_id, message_id,
    ))  # fmt: skip


async def delivery_events(
    conn: asyncpg.Connection, ticket_id: int, message_id: int
) -> list[asyncpg.Record]:
    """A reply's delivery events (`at`, `note`, `data`), oldest first."""
    return list(await conn.fetch(
        "SELECT at, note, data FROM ticket_events WHERE ticket_id = $1 AND kind = 'delivery'"
        " AND data->>'message_id' = $2 ORDER BY id",
        ticket_id, str(message_id),
    ))  # fmt: skip
