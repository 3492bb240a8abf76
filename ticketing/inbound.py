"""Write matched inbound messages: dedup by natural key, thread, open or append, log events."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from channels.types import MatchedInbound
from normalizer.threading import subject_ticket_ids, ticket_hints
from ticketing.rules import TicketRules
from ticketing.states import on_inbound


@dataclass
class Applied:
    """What applying one inbound message did (for the events topic and metrics)."""

    message_id: int
    ticket_id: int
    caller_id: int
    outcome: str  # "new", "append", "reopen", "bounce"
    trace_id: str
    channel: str
    received_at: float

    def event(self) -> dict[str, Any]:
        return {
            "type": "message", "direction": "in", "ticket_id": self.ticket_id,
            "message_id": self.message_id, "caller_id": self.caller_id, "outcome": self.outcome,
            "channel": self.channel, "trace_id": self.trace_id, "at": time.time(),
        }  # fmt: skip


def _subject_for(matched: MatchedInbound) -> str:
    raw = matched.message.raw
    if raw.subject and raw.subject.strip():
        return raw.subject.strip()[:200]
    first_line = next((line.strip() for line in matched.message.body_display.splitlines() if line.strip()), "")
    return first_line[:80] or f"{raw.channel} message"


async def _ticket_row(conn: asyncpg.Connection, ticket_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, caller_id, status, tier, close_reason, closed_at FROM tickets WHERE id = $1", ticket_id
    )


async def _latest_ticket(conn: asyncpg.Connection, caller_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, caller_id, status, tier, close_reason, closed_at FROM tickets"
        " WHERE caller_id = $1 ORDER BY (status <> 'closed') DESC, id DESC LIMIT 1",
        caller_id,
    )


async def open_ticket(
    conn: asyncpg.Connection, *, caller_id: int, subject: str, channel: str, account: str,
    rules: TicketRules, linked_ticket_id: int | None = None, actor: str = "system",
    agent_id: int | None = None, is_demo: bool = False, note: str | None = None,
) -> int:
    """Create an open ticket at the agent tier with its SLA deadlines and a `created` event."""
    now = datetime.now(UTC)
    first_due, resolution_due = rules.due(now, "agent")
    ticket_id: int = await conn.fetchval(
        "INSERT INTO tickets (caller_id, subject, channel, account, linked_ticket_id,"
        " first_response_due, resolution_due, is_demo) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING id",
        caller_id, subject, channel, account, linked_ticket_id, first_due, resolution_due, is_demo,
    )
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, to_status, to_tier, note, data)"
        " VALUES ($1, $2, $3, 'created', 'open', 'agent', $4, $5)",
        ticket_id, actor, agent_id, note, {"channel": channel, "linked_ticket_id": linked_ticket_id},
    )
    return ticket_id


async def apply_matched(
    conn: asyncpg.Connection, matched: MatchedInbound, rules: TicketRules,
    own_addresses: frozenset[str] = frozenset(),
) -> Applied | None:
    """Store one inbound message on the right ticket; None when it was already stored.

    Must run inside a transaction: the dedup check, ticket changes, message, attachments
    and events commit together or not at all.
    """
    message = matched.message
    raw = message.raw
    exists = await conn.fetchval(
        "SELECT 1 FROM messages WHERE channel = $1 AND account = $2 AND external_id = $3 AND direction = 'in'",
        raw.channel, raw.account, raw.external_id,
    )
    if exists:
        return None
    caller_id = matched.caller_id
    now = datetime.now(UTC)
    ticket = None
    outcome = "append"

    if message.bounce_of:
        bounced = await conn.fetchrow(
            "UPDATE messages SET status = 'failed', status_reason = $2"
            " WHERE provider_id = $1 AND direction = 'out' RETURNING id, ticket_id",
            message.bounce_of, message.bounce_reason or "bounced",
        )
        if bounced is not None:
            await conn.execute(
                "INSERT INTO ticket_events (ticket_id, kind, note, data) VALUES ($1, 'delivery', $2, $3)",
                bounced["ticket_id"], f"reply bounced: {message.bounce_reason}",
                {"message_id": bounced["id"], "status": "failed"},
            )
            ticket = await _ticket_row(conn, bounced["ticket_id"])
            outcome = "bounce"

    if ticket is None:
        # Our Message-IDs and plus addresses are strong evidence, whoever writes (a colleague
        # may answer for the caller); a subject token is easy to type, so it only threads
        # into the caller's own tickets.
        strong = ticket_hints(msgspec.structs.replace(raw, subject=None), own_addresses)
        for hinted in dict.fromkeys(strong + subject_ticket_ids(raw.subject)):
            candidate = await _ticket_row(conn, hinted)
            if candidate is not None and (hinted in strong or candidate["caller_id"] == caller_id):
                ticket = candidate
                break
    if ticket is None:
        ticket = await _latest_ticket(conn, caller_id)

    if ticket is None:
        decision = "new"
    else:
        decision = on_inbound(
            ticket["status"], ticket["closed_at"], now, rules.followup_window,
            ticket["close_reason"], auto_reply=message.auto_reply,
        )
    if decision == "new":
        ticket_id = await open_ticket(
            conn, caller_id=caller_id, subject=_subject_for(matched), channel=raw.channel,
            account=raw.account, rules=rules, linked_ticket_id=ticket["id"] if ticket else None,
            is_demo=raw.meta.get("demo") == "1",
        )
        outcome = "new"
    else:
        assert ticket is not None
        ticket_id = ticket["id"]
        if decision == "reopen":
            await conn.execute(
                "UPDATE tickets SET status = 'open', close_reason = NULL, closed_at = NULL,"
                " updated_at = now() WHERE id = $1",
                ticket_id,
            )
            await conn.execute(
                "INSERT INTO ticket_events (ticket_id, kind, from_status, to_status, note)"
                " VALUES ($1, 'reopened', 'closed', 'open', 'new message from the caller')",
                ticket_id,
            )
            outcome = "reopen"

    message_id: int = await conn.fetchval(
        "INSERT INTO messages (ticket_id, caller_id, direction, channel, account, external_id, sender,"
        " subject, body_text, body_display, body_html, headers, meta, problems, auto_reply, status,"
        " trace_id, received_at)"
        " VALUES ($1,$2,'in',$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,'received',$15,$16) RETURNING id",
        ticket_id, caller_id, raw.channel, raw.account, raw.external_id, raw.sender, raw.subject,
        raw.body_text, message.body_display, raw.body_html, raw.headers, raw.meta, raw.problems,
        message.auto_reply, raw.trace_id, datetime.fromtimestamp(raw.received_at, UTC),
    )
    if raw.attachments:
        await conn.executemany(
            "INSERT INTO attachments (message_id, filename, content_type, size, sha256, dropped)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            [(message_id, a.filename, a.content_type, a.size, a.sha256, a.dropped) for a in raw.attachments],
        )
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, note, data) VALUES ($1, 'message', $2, $3)",
        ticket_id,
        "auto-reply stored" if message.auto_reply else None,
        {"message_id": message_id, "channel": raw.channel, "trace_id": raw.trace_id,
         "match": matched.match_reason},
    )
    if not message.auto_reply:
        await conn.execute(
            "UPDATE tickets SET last_activity_at = now(), updated_at = now() WHERE id = $1", ticket_id
        )
    return Applied(message_id, ticket_id, caller_id, outcome, raw.trace_id, raw.channel, raw.received_at)
