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


async def ticket_exists(conn: asyncpg.Connection, ticket_id: int) -> bool:
    return await conn.fetchval("SELECT 1 FROM tickets WHERE id = $1", ticket_id) is not None


async def attachment(conn: asyncpg.Connection, attachment_id: int) -> dict[str, Any] | None:
    """An attachment's `filename`, `sha256` and `dropped` (why it was not kept), or None."""
    row = await conn.fetchrow(
        "SELECT filename, sha256, dropped FROM attachments WHERE id = $1", attachment_id
    )
    return dict(row) if row is not None else None


async def caller_name(conn: asyncpg.Connection, caller_id: int) -> str | None:
    name: str | None = await conn.fetchval("SELECT name FROM callers WHERE id = $1", caller_id)
    return name


# What a ticket list shows of each ticket (the API's queue).
SUMMARY_SQL = (
    "SELECT t.id, t.caller_id, c.name AS caller_name, t.subject, t.status, t.tier, t.close_reason,"
    " t.channel, t.created_at, t.updated_at, t.last_activity_at, t.first_response_due, t.resolution_due,"
    f" {OVERDUE_SQL} AS overdue,"
    " t.assignee_id, ag.username AS assignee"
    " FROM tickets t JOIN callers c ON c.id = t.caller_id LEFT JOIN agents ag ON ag.id = t.assignee_id"
)


async def ticket_list(
    conn: asyncpg.Connection,
    *,
    status: str | None = None,
    tier: str | None = None,
    channel: str | None = None,
    caller_id: int | None = None,
    overdue: bool | None = None,
    assignee: int | str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[int, list[dict[str, Any]]]:
    """Tickets matching every filter given (`assignee`: an agent id, or "none"), open before
    closed, the nearest resolution deadline first; with how many match in all."""
    where, args = [], []
    for column, value in (
        ("t.status", status),
        ("t.tier", tier),
        ("t.channel", channel),
        ("t.caller_id", caller_id),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if overdue is not None:
        where.append(OVERDUE_SQL if overdue else f"NOT {OVERDUE_SQL}")
    if assignee == "none":
        where.append("t.assignee_id IS NULL")
    elif assignee is not None:
        args.append(int(assignee))
        where.append(f"t.assignee_id = ${len(args)}")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = await conn.fetchval(f"SELECT count(*) FROM tickets t{clause}", *args)
    rows = await conn.fetch(
        f"{SUMMARY_SQL}{clause} ORDER BY (t.status = 'closed'), t.resolution_due NULLS LAST, t.id"
        f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args, limit, offset,
    )  # fmt: skip
    return int(total), [dict(r) for r in rows]


async def queue_page(
    conn: asyncpg.Connection, filters: dict[str, str], page: int, agent_id: int, page_size: int
) -> tuple[int, list[dict[str, Any]]]:
    """One page of the console's queue, most urgent first: overdue, then the nearest deadline.

    `filters`: `status` (`active`, `all` or one), `tier`, `channel`, `overdue`, `assignee`
    (`me`, `none`), `demo` (`1`, `0`), `q` (words of the subject or the caller's name).
    """
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if filters["status"] == "active":
        where.append("t.status <> 'closed'")
    elif filters["status"] != "all":
        where.append(f"t.status = {arg(filters['status'])}")
    if filters["tier"]:
        where.append(f"t.tier = {arg(filters['tier'])}")
    if filters["channel"]:
        where.append(f"t.channel = {arg(filters['channel'])}")
    if filters["overdue"]:
        where.append(OVERDUE_SQL)
    if filters["assignee"] == "me":
        where.append(f"t.assignee_id = {arg(agent_id)}")
    elif filters["assignee"] == "none":
        where.append("t.assignee_id IS NULL")
    if filters["demo"]:
        where.append(f"t.is_demo = {arg(filters['demo'] == '1')}")
    if filters["q"]:
        pattern = arg(
            "%" + filters["q"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        where.append(
            f"(t.subject ILIKE {pattern} OR EXISTS (SELECT 1 FROM callers qc"
            f" WHERE qc.id = t.caller_id AND qc.name ILIKE {pattern}))"
        )
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = await conn.fetchval(f"SELECT count(*) FROM tickets t{clause}", *args)
    order = f"(t.status = 'closed'), {OVERDUE_SQL} DESC, {NEXT_DUE_SQL} NULLS LAST, t.id"
    rows = await conn.fetch(
        f"WITH page AS (SELECT t.*, {OVERDUE_SQL} AS overdue, {NEXT_DUE_SQL} AS next_due,"
        f" row_number() OVER (ORDER BY {order}) AS rank FROM tickets t{clause}"
        f" ORDER BY {order} LIMIT {page_size} OFFSET {arg(page * page_size)})"
        " SELECT p.id, p.caller_id, p.subject, p.status, p.tier, p.channel, p.created_at,"
        " p.last_activity_at, p.next_due, p.overdue, p.is_demo, c.name AS caller_name,"
        " i.contact, m.snippet, ag.username AS assignee"
        " FROM page p JOIN callers c ON c.id = p.caller_id"
        " LEFT JOIN agents ag ON ag.id = p.assignee_id"
        " LEFT JOIN LATERAL (SELECT CASE WHEN kind = 'email' THEN value"
        "   ELSE coalesce(display, value) END AS contact FROM identities"
        "   WHERE caller_id = p.caller_id ORDER BY valid DESC, id LIMIT 1) i ON true"
        " LEFT JOIN LATERAL (SELECT left(coalesce(nullif(body_display, ''), body_text), 160) AS snippet"
        "   FROM messages WHERE ticket_id = p.id AND direction = 'in' ORDER BY id DESC LIMIT 1) m ON true"
        " ORDER BY p.rank",
        *args,
    )
    return int(total), [dict(r) for r in rows]
