"""Tickets in the procedure: logged calls, transitions, assignment, a solution's draft article, SLA escalation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from ticketing.inbound import open_ticket
from ticketing.procedure.base import (
    EVENT_KINDS,
    KB_PROBLEM_MAX,
    LIVE_CHANNELS,
    AgentNotFound,
    TicketNotFound,
)
from ticketing.procedure.callers import _live_caller
from ticketing.rules import TicketRules
from ticketing.states import TIERS, TicketState, apply

# --- tickets -------------------------------------------------------------------------------


async def log_contact(
    conn: asyncpg.Connection, *, caller_id: int, channel: str, subject: str, body: str,
    actor: str, agent_id: int | None, rules: TicketRules,
) -> int:  # fmt: skip
    """Open a ticket for a call (or visit) an agent took, the call stored as its inbound message.

    Must run inside a transaction. Returns the ticket id.
    """
    survivor_id = await _live_caller(conn, caller_id)
    text = body.strip()
    title = subject.strip() or next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    title = title[:200] or f"{channel} call"
    ticket_id = await open_ticket(
        conn, caller_id=survivor_id, subject=title, channel=channel, account="", rules=rules,
        actor=actor, agent_id=agent_id, note=f"{channel} contact taken by {actor}",
    )  # fmt: skip
    kinds = (
        ["email"]
        if channel == "email"
        else ["phone", "fax"]
        if channel in ("phone", "walk_in", "sms", "fax")
        else [channel]
    )
    sender = await conn.fetchval(
        "SELECT value FROM identities WHERE caller_id = $1 AND kind = ANY($2::text[])"
        " ORDER BY array_position($2::text[], kind), valid DESC, id LIMIT 1",
        survivor_id, kinds,
    )  # fmt: skip
    message_id = await conn.fetchval(
        "INSERT INTO messages (ticket_id, caller_id, direction, channel, account, external_id, sender,"
        " subject, body_text, body_display, meta, status, agent_id, received_at)"
        " VALUES ($1, $2, 'in', $3, '', NULL, $4, $5, $6, $6, $7, 'received', $8, now()) RETURNING id",
        ticket_id, survivor_id, channel, sender or "", title, text, {"logged_by": actor}, agent_id,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, note, data)"
        " VALUES ($1, $2, $3, 'message', $4, $5)",
        ticket_id, actor, agent_id, f"{channel} contact recorded by {actor}",
        {"message_id": message_id, "channel": channel},
    )  # fmt: skip
    await conn.execute(
        "UPDATE tickets SET last_activity_at = now(), updated_at = now(),"
        " first_response_at = CASE WHEN $2 THEN now() ELSE first_response_at END WHERE id = $1",
        ticket_id, channel in LIVE_CHANNELS,
    )  # fmt: skip
    return ticket_id


@dataclass(frozen=True)
class Transitioned:
    """What one accepted transition did."""

    ticket_id: int
    before: TicketState
    after: TicketState
    event_id: int
    kb_article_id: int | None = None


def _state_of(row: asyncpg.Record) -> TicketState:
    closed = row["status"] == "closed"
    return TicketState(
        status=row["status"],
        tier=row["tier"],
        close_reason=row["close_reason"] if closed else None,
        # A ticket reopened by a caller's message may still carry its old solution text.
        solution=row["solution"] if closed else None,
    )


async def transition(
    conn: asyncpg.Connection, ticket_id: int, action: str, *, actor: str, agent_id: int | None,
    rules: TicketRules, note: str | None = None, solution: str | None = None,
    reason: str | None = None, now: datetime | None = None,
) -> Transitioned:  # fmt: skip
    """Apply `action` to a ticket locked FOR UPDATE; TransitionError when the procedure refuses.

    Must run inside a transaction. Escalating and reopening give the ticket fresh due times
    for its tier; closing as resolved drafts a knowledge-base article from the ticket.
    """
    now = now or datetime.now(UTC)
    row = await conn.fetchrow(
        "SELECT id, status, tier, close_reason, solution, subject, first_response_due, resolution_due"
        " FROM tickets WHERE id = $1 FOR UPDATE",
        ticket_id,
    )
    if row is None:
        raise TicketNotFound(f"ticket {ticket_id} does not exist")
    before = _state_of(row)
    after = apply(before, action, solution=solution, reason=reason)
    first_due, resolution_due = row["first_response_due"], row["resolution_due"]
    if action in ("escalate", "reopen"):
        first_due, resolution_due = rules.due(now, after.tier)
    await conn.execute(
        "UPDATE tickets SET status = $2, tier = $3, close_reason = $4, solution = $5,"
        " closed_at = CASE WHEN $2::text = 'closed' THEN $6::timestamptz ELSE NULL END,"
        " first_response_due = $7, resolution_due = $8,"
        " updated_at = $6, last_activity_at = $6 WHERE id = $1",
        ticket_id, after.status, after.tier, after.close_reason, after.solution, now,
        first_due, resolution_due,
    )  # fmt: skip
    kb_article_id = None
    if after.status == "closed" and after.close_reason == "resolved":
        assert after.solution is not None
        kb_article_id = await _draft_kb_article(
            conn, ticket_id, row["subject"], after.solution, agent_id
        )
    data: dict[str, Any] = {"action": action}
    if after.close_reason:
        data["reason"] = after.close_reason
    if kb_article_id is not None:
        data["kb_article_id"] = kb_article_id
    if action in ("escalate", "reopen"):
        data["resolution_due"] = resolution_due.isoformat() if resolution_due else None
    event_id: int = await conn.fetchval(
        "INSERT INTO ticket_events (ticket_id, at, actor, agent_id, kind, from_status, to_status,"
        " from_tier, to_tier, note, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " RETURNING id",
        ticket_id, now, actor, agent_id, EVENT_KINDS[action], before.status, after.status,
        before.tier, after.tier, note, data,
    )  # fmt: skip
    return Transitioned(ticket_id, before, after, event_id, kb_article_id)


async def assign(
    conn: asyncpg.Connection, ticket_id: int, assignee_id: int | None, *, actor: str,
    agent_id: int | None, now: datetime | None = None,
) -> int | None:  # fmt: skip
    """Give a ticket to an agent (None: to nobody); the event's id, or None when nothing changed.

    Must run inside a transaction. Only an active agent can take a ticket.
    """
    now = now or datetime.now(UTC)
    row = await conn.fetchrow(
        "SELECT t.assignee_id, a.username FROM tickets t LEFT JOIN agents a ON a.id = t.assignee_id"
        " WHERE t.id = $1 FOR UPDATE OF t",
        ticket_id,
    )
    if row is None:
        raise TicketNotFound(f"ticket {ticket_id} does not exist")
    username = None
    if assignee_id is not None:
        username = await conn.fetchval(
            "SELECT username FROM agents WHERE id = $1 AND active", assignee_id
        )
        if username is None:
            raise AgentNotFound(f"no active agent {assignee_id}")
    if row["assignee_id"] == assignee_id:
        return None
    await conn.execute(
        "UPDATE tickets SET assignee_id = $2, updated_at = $3 WHERE id = $1",
        ticket_id, assignee_id, now,
    )  # fmt: skip
    data = {"from": row["assignee_id"], "from_username": row["username"], "to": assignee_id,
            "to_username": username}  # fmt: skip
    event_id: int = await conn.fetchval(
        "INSERT INTO ticket_events (ticket_id, at, actor, agent_id, kind, data)"
        " VALUES ($1, $2, $3, $4, 'assigned', $5) RETURNING id",
        ticket_id, now, actor, agent_id, data,
    )  # fmt: skip
    return event_id


async def _draft_kb_article(
    conn: asyncpg.Connection, ticket_id: int, subject: str, solution: str, agent_id: int | None
) -> int:
    """Store the problem/solution pair as a draft; a ticket resolved again updates its draft."""
    first = await conn.fetchrow(
        "SELECT body_display, body_text FROM messages WHERE ticket_id = $1 AND direction = 'in'"
        " AND NOT auto_reply ORDER BY id LIMIT 1",
        ticket_id,
    )
    body = ((first["body_display"] or first["body_text"]) if first else "").strip()
    parts = [subject.strip(), body]
    problem = "\n\n".join(p for p in parts if p)[:KB_PROBLEM_MAX].strip() or f"ticket {ticket_id}"
    draft = await conn.fetchval(
        "SELECT id FROM kb_articles WHERE source_ticket_id = $1 AND status = 'draft'"
        " ORDER BY id DESC LIMIT 1 FOR UPDATE",
        ticket_id,
    )
    if draft is not None:
        await conn.execute(
            "UPDATE kb_articles SET problem = $2, solution = $3, author_agent_id = $4,"
            " updated_at = now() WHERE id = $1",
            draft, problem, solution, agent_id,
        )  # fmt: skip
        return int(draft)
    return int(
        await conn.fetchval(
            "INSERT INTO kb_articles (problem, solution, status, source_ticket_id, author_agent_id)"
            " VALUES ($1, $2, 'draft', $3, $4) RETURNING id",
            problem,
            solution,
            ticket_id,
            agent_id,
        )  # fmt: skip
    )


# --- SLA -----------------------------------------------------------------------------------

ESCALATION_BATCH = 100


async def escalate_overdue(
    conn: asyncpg.Connection, rules: TicketRules, now: datetime, *, batch: int = ESCALATION_BATCH
) -> list[int]:
    """Escalate every open or pending ticket past its resolution deadline at agent or support.

    One tier up, with an event by "system". Rows another process holds are skipped
    (`SKIP LOCKED`), and an escalated ticket gets a new deadline, so running this twice,
    or in two processes at once, escalates each overdue ticket once.
    """
    zone = ZoneInfo(rules.calendar.tz)
    escalated: list[int] = []
    while True:
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT id, tier, resolution_due FROM tickets"
                " WHERE status IN ('open', 'pending') AND tier = ANY($1::text[])"
                " AND resolution_due < $2 ORDER BY resolution_due, id LIMIT $3"
                " FOR UPDATE SKIP LOCKED",
                list(TIERS[:-1]), now, batch,
            )  # fmt: skip
            for row in rows:
                since = row["resolution_due"].astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")
                await transition(
                    conn, row["id"], "escalate", actor="system", agent_id=None, rules=rules,
                    note=f"overdue at {row['tier']} since {since}", now=now,
                )  # fmt: skip
                escalated.append(row["id"])
        if len(rows) < batch:
            return escalated


async def add_note(
    conn: asyncpg.Connection, ticket_id: int, agent_id: int, actor: str, note: str
) -> int | None:
    """An internal note on a ticket's event log, never sent to the caller; its event id, or
    None when there is no such ticket."""
    event_id: int | None = await conn.fetchval(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, note)"
        " SELECT id, $2, $3, 'note', $4 FROM tickets WHERE id = $1 RETURNING id",
        ticket_id, actor, agent_id, note,
    )  # fmt: skip
    return event_id
