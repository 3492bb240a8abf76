"""How the API and the console read tickets: one read model, and the SQL fragments of queues."""

from __future__ import annotations

from typing import Any

import asyncpg

# Whether ticket `t` is past a deadline: no first response by its due time, or not resolved
# by its resolution due time; a closed ticket never is.
OVERDUE_SQL = (
    "(t.status <> 'closed' AND (t.resolution_due < now()"
    " OR (t.first_response_at IS NULL AND t.first_response_due < now())))"
)
# The next deadline of ticket `t`: the first response while none was sent, else resolution.
NEXT_DUE_SQL = (
    "LEAST(CASE WHEN t.first_response_at IS NULL THEN t.first_response_due END, t.resolution_due)"
)

# A ticket as both read it: its columns, whether it is overdue, its caller and its assignee.
_TICKET_SQL = (
    f"SELECT t.*, {OVERDUE_SQL} AS overdue, c.name AS caller_name, c.organization,"
    " ag.username AS assignee FROM tickets t JOIN callers c ON c.id = t.caller_id"
    " LEFT JOIN agents ag ON ag.id = t.assignee_id WHERE t.id = $1"
)
# What the console's timeline shows of a message.
_MESSAGE_COLUMNS = (
    "m.id, m.ticket_id, m.direction, m.channel, m.account, m.sender, m.recipient, m.subject,"
    " m.body_text, m.body_display, m.body_html, m.status, m.status_reason, m.auto_reply,"
    " m.problems, m.meta, m.created_at, m.received_at, m.sent_at"
)
# The kinds of event a message or its delivery writes: the timeline shows the message itself.
MESSAGE_EVENT_KINDS = ("message", "reply", "delivery")


async def ticket(conn: asyncpg.Connection, ticket_id: int) -> dict[str, Any] | None:
    """One ticket, with `overdue`, `caller_name`, `organization` and `assignee`; None if none."""
    row = await conn.fetchrow(_TICKET_SQL, ticket_id)
    return dict(row) if row is not None else None


async def _with_attachments(
    conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> list[dict[str, Any]]:
    messages = [dict(r) for r in rows]
    files = await conn.fetch(
        "SELECT * FROM attachments WHERE message_id = ANY($1::bigint[]) ORDER BY id",
        [m["id"] for m in messages],
    )
    for message in messages:
        message["attachments"] = [dict(f) for f in files if f["message_id"] == message["id"]]
    return messages


async def messages(conn: asyncpg.Connection, ticket_id: int) -> list[dict[str, Any]]:
    """A ticket's messages, in and out, oldest first, each with its attachments."""
    rows = await conn.fetch("SELECT * FROM messages WHERE ticket_id = $1 ORDER BY id", ticket_id)
    return await _with_attachments(conn, rows)


async def caller_messages(
    conn: asyncpg.Connection, caller_id: int, limit: int
) -> list[dict[str, Any]]:
    """A caller's latest `limit` messages on every ticket and channel, oldest first, with
    attachments and `ticket_subject`."""
    rows = await conn.fetch(
        f"SELECT * FROM (SELECT {_MESSAGE_COLUMNS}, t.subject AS ticket_subject FROM messages m"
        " JOIN tickets t ON t.id = m.ticket_id WHERE t.caller_id = $1 ORDER BY m.id DESC LIMIT $2)"
        " recent ORDER BY id",
        caller_id, limit,
    )  # fmt: skip
    return await _with_attachments(conn, rows)


async def events(
    conn: asyncpg.Connection, ticket_id: int, *, without: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """A ticket's event log, oldest first, leaving out the kinds in `without`."""
    rows = await conn.fetch(
        "SELECT * FROM ticket_events WHERE ticket_id = $1 AND NOT (kind = ANY($2::text[]))"
        " ORDER BY id",
        ticket_id, list(without),
    )  # fmt: skip
    return [dict(r) for r in rows]


async def identities(conn: asyncpg.Connection, caller_id: int) -> list[dict[str, Any]]:
    """A caller's identities, by kind."""
    rows = await conn.fetch(
        "SELECT kind, value, display FROM identities WHERE caller_id = $1 ORDER BY kind, id",
        caller_id,
    )
    return [dict(r) for r in rows]


async def active_agents(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Agents a ticket can be given to, by name."""
    rows = await conn.fetch(
        "SELECT id, username, display_name FROM agents WHERE active ORDER BY username"
    )
    return [dict(r) for r in rows]
