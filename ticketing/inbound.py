"""Write matched inbound messages: dedup by natural key, thread, open or append, log events."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from channels.types import InboundMessage, MatchedInbound, RawInbound
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
    first_line = next(
        (line.strip() for line in matched.message.body_display.splitlines() if line.strip()), ""
    )
    return first_line[:80] or f"{raw.channel} message"


async def _ticket_row(conn: asyncpg.Connection, ticket_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, caller_id, status, tier, close_reason, closed_at FROM tickets WHERE id = $1",
        ticket_id,
    )


async def _latest_ticket(conn: asyncpg.Connection, caller_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT id, caller_id, status, tier, close_reason, closed_at FROM tickets"
        " WHERE caller_id = $1 ORDER BY (status <> 'closed') DESC, id DESC LIMIT 1",
        caller_id,
    )


async def open_ticket(
    conn: asyncpg.Connection,
    *,
    caller_id: int,
    subject: str,
    channel: str,
    account: str,
    rules: TicketRules,
    linked_ticket_id: int | None = None,
    actor: str = "system",
    agent_id: int | None = None,
    is_demo: bool = False,
    note: str | None = None,
) -> int:
    """Create an open ticket at the agent tier with its SLA deadlines and a `created` event."""
    now = datetime.now(UTC)
    first_due, resolution_due = rules.due(now, "agent")
    ticket_id: int = await conn.fetchval(
        "INSERT INTO tickets (caller_id, subject, channel, account, linked_ticket_id,"
        " first_response_due, resolution_due, is_demo) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING id",
        caller_id,
        subject,
        channel,
        account,
        linked_ticket_id,
        first_due,
        resolution_due,
        is_demo,
    )
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, to_status, to_tier, note, data)"
        " VALUES ($1, $2, $3, 'created', 'open', 'agent', $4, $5)",
        ticket_id,
        actor,
        agent_id,
        note,
        {"channel": channel, "linked_ticket_id": linked_ticket_id},
    )
    return ticket_id


async def _insert_attachments(
    conn: asyncpg.Connection, messages: list[tuple[int, RawInbound]]
) -> None:
    """The attachment rows of stored messages (`(message id, raw)` pairs)."""
    rows = [
        (message_id, a.filename, a.content_type, a.size, a.sha256, a.dropped)
        for message_id, raw in messages
        for a in raw.attachments
    ]
    if rows:
        await conn.executemany(
            "INSERT INTO attachments (message_id, filename, content_type, size, sha256, dropped)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            rows,
        )


async def _store_message(conn: asyncpg.Connection, matched: MatchedInbound, ticket_id: int) -> int:
    """The message with its attachments and its event on the ticket; returns its id."""
    message = matched.message
    raw = message.raw
    caller_id = matched.caller_id
    message_id: int = await conn.fetchval(
        "INSERT INTO messages (ticket_id, caller_id, direction, channel, account, external_id, sender,"
        " subject, body_text, body_display, body_html, headers, meta, problems, auto_reply, status,"
        " trace_id, received_at)"
        " VALUES ($1,$2,'in',$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,'received',$15,$16) RETURNING id",
        ticket_id,
        caller_id,
        raw.channel,
        raw.account,
        raw.external_id,
        raw.sender,
        raw.subject,
        raw.body_text,
        message.body_display,
        raw.body_html,
        raw.headers,
        raw.meta,
        raw.problems,
        message.auto_reply,
        raw.trace_id,
        datetime.fromtimestamp(raw.received_at, UTC),
    )
    await _insert_attachments(conn, [(message_id, raw)])
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, note, data) VALUES ($1, 'message', $2, $3)",
        ticket_id,
        "auto-reply stored" if message.auto_reply else None,
        {
            "message_id": message_id,
            "channel": raw.channel,
            "trace_id": raw.trace_id,
            "match": matched.match_reason,
        },
    )
    if not message.auto_reply:
        await conn.execute(
            "UPDATE tickets SET last_activity_at = now(), updated_at = now() WHERE id = $1",
            ticket_id,
        )
    return message_id


async def _bounced_reply_ticket(
    conn: asyncpg.Connection, message: InboundMessage
) -> asyncpg.Record | None:
    """A bounce marks the reply it bounced failed; returns that reply's ticket."""
    bounced = await conn.fetchrow(
        "UPDATE messages SET status = 'failed', status_reason = $2"
        " WHERE provider_id = $1 AND direction = 'out' RETURNING id, ticket_id",
        message.bounce_of,
        message.bounce_reason or "bounced",
    )
    if bounced is None:
        return None
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, note, data) VALUES ($1, 'delivery', $2, $3)",
        bounced["ticket_id"],
        f"reply bounced: {message.bounce_reason}",
        {"message_id": bounced["id"], "status": "failed"},
    )
    return await _ticket_row(conn, bounced["ticket_id"])


async def _threaded_ticket(
    conn: asyncpg.Connection, raw: RawInbound, caller_id: int, own_addresses: frozenset[str]
) -> asyncpg.Record | None:
    """The ticket a message answers by its hints, else the caller's latest ticket."""
    # Our Message-IDs and plus addresses are strong evidence, whoever writes (a colleague
    # may answer for the caller); a subject token is easy to type, so it only threads
    # into the caller's own tickets.
    strong = ticket_hints(msgspec.structs.replace(raw, subject=None), own_addresses)
    for hinted in dict.fromkeys(strong + subject_ticket_ids(raw.subject)):
        candidate = await _ticket_row(conn, hinted)
        if candidate is not None and (hinted in strong or candidate["caller_id"] == caller_id):
            return candidate
    return await _latest_ticket(conn, caller_id)


async def apply_matched(
    conn: asyncpg.Connection,
    matched: MatchedInbound,
    rules: TicketRules,
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
        raw.channel,
        raw.account,
        raw.external_id,
    )
    if exists:
        return None
    caller_id = matched.caller_id
    now = datetime.now(UTC)
    ticket = None
    outcome = "append"

    if message.bounce_of:
        ticket = await _bounced_reply_ticket(conn, message)
        if ticket is not None:
            outcome = "bounce"
    if ticket is None:
        ticket = await _threaded_ticket(conn, raw, caller_id, own_addresses)

    if ticket is None:
        decision = "new"
    else:
        decision = on_inbound(
            ticket["status"],
            ticket["closed_at"],
            now,
            rules.followup_window,
            ticket["close_reason"],
            auto_reply=message.auto_reply,
        )
    if decision == "new":
        ticket_id = await open_ticket(
            conn,
            caller_id=caller_id,
            subject=_subject_for(matched),
            channel=raw.channel,
            account=raw.account,
            rules=rules,
            linked_ticket_id=ticket["id"] if ticket else None,
            is_demo=raw.meta.get("demo") == "1",
        )
        outcome = "new"
    else:
        assert ticket is not None
        ticket_id = ticket["id"]
        if decision == "reopen":
            await _reopen(conn, [ticket_id])
            outcome = "reopen"

    message_id = await _store_message(conn, matched, ticket_id)
    return Applied(
        message_id, ticket_id, caller_id, outcome, raw.trace_id, raw.channel, raw.received_at
    )


def _json(value: Any) -> str:
    # Whole batches go through unnest() as text and are cast to jsonb in the statement.
    return msgspec.json.encode(value).decode()


def _needs_lookup(matched: MatchedInbound, own_addresses: frozenset[str]) -> bool:
    """Whether a message may belong to a ticket other than its caller's latest one."""
    return bool(matched.message.bounce_of or ticket_hints(matched.message.raw, own_addresses))


_LATEST_TICKETS = (
    "SELECT DISTINCT ON (caller_id) id, caller_id, status, tier, close_reason, closed_at FROM tickets"
    " WHERE caller_id = ANY($1::bigint[]) ORDER BY caller_id, (status <> 'closed') DESC, id DESC"
)


@dataclass
class _Planned:
    """One message's writes, gathered so a whole batch is written in a few statements."""

    matched: MatchedInbound
    ticket: int  # an existing ticket id, or -(index + 1) of a ticket opened in this batch
    outcome: str


async def apply_matched_batch(
    conn: asyncpg.Connection,
    batch: list[MatchedInbound],
    rules: TicketRules,
    own_addresses: frozenset[str] = frozenset(),
) -> list[Applied | None]:
    """`apply_matched` for a batch, with the same decisions, in a handful of round trips.

    Must run inside a transaction. Messages are decided in order, each seeing what the
    ones before it did; a message with threading markers or a bounce goes through
    `apply_matched` after the writes gathered so far are flushed.
    """
    results: list[Applied | None] = [None] * len(batch)
    if not batch:
        return results
    stored = await conn.fetch(
        "SELECT m.channel, m.account, m.external_id FROM messages m"
        " JOIN unnest($1::text[], $2::text[], $3::text[]) AS q(channel, account, external_id)"
        "   ON m.channel = q.channel AND m.account = q.account AND m.external_id = q.external_id"
        " WHERE m.direction = 'in'",
        [m.message.raw.channel for m in batch], [m.message.raw.account for m in batch],
        [m.message.raw.external_id for m in batch],
    )  # fmt: skip
    seen = {(r["channel"], r["account"], r["external_id"]) for r in stored}
    now = datetime.now(UTC)
    rows = await conn.fetch(_LATEST_TICKETS, list({m.caller_id for m in batch}))
    latest: dict[int, dict[str, Any]] = {row["caller_id"]: dict(row) for row in rows}
    planned: list[tuple[int, _Planned]] = []
    new_tickets: list[tuple[MatchedInbound, int | None]] = []  # (first message, linked ticket)
    reopened: list[int] = []

    async def flush() -> None:
        await _write_planned(conn, planned, new_tickets, reopened, rules, now, results)
        planned.clear()
        new_tickets.clear()
        reopened.clear()

    for index, matched in enumerate(batch):
        raw = matched.message.raw
        natural_key = (raw.channel, raw.account, raw.external_id)
        if natural_key in seen:
            continue
        seen.add(natural_key)
        if _needs_lookup(matched, own_addresses):
            await flush()
            applied = await apply_matched(conn, matched, rules, own_addresses)
            results[index] = applied
            if applied is not None:
                # Threading may have opened or reopened anyone's ticket: read them again.
                rows = await conn.fetch(_LATEST_TICKETS, list({m.caller_id for m in batch}))
                latest = {row["caller_id"]: dict(row) for row in rows}
            continue
        ticket = latest.get(matched.caller_id)
        if ticket is None:
            decision = "new"
        else:
            decision = on_inbound(
                ticket["status"], ticket["closed_at"], now, rules.followup_window,
                ticket["close_reason"], auto_reply=matched.message.auto_reply,
            )  # fmt: skip
        if decision == "new":
            new_tickets.append((matched, ticket["id"] if ticket else None))
            ticket_ref = -len(new_tickets)
            latest[matched.caller_id] = {
                "id": ticket_ref, "caller_id": matched.caller_id, "status": "open", "tier": "agent",
                "close_reason": None, "closed_at": None,
            }  # fmt: skip
            planned.append((index, _Planned(matched, ticket_ref, "new")))
            continue
        assert ticket is not None
        outcome = "append"
        if decision == "reopen":
            reopened.append(ticket["id"])
            ticket.update(status="open", close_reason=None, closed_at=None)
            outcome = "reopen"
        planned.append((index, _Planned(matched, ticket["id"], outcome)))
    await flush()
    return results


async def _insert_tickets(
    conn: asyncpg.Connection,
    ticket_ids: list[int],
    new_tickets: list[tuple[MatchedInbound, int | None]],
    rules: TicketRules,
    now: datetime,
) -> None:
    """The batch's new tickets, with their `created` events."""
    first_due, resolution_due = rules.due(now, "agent")
    await conn.execute(
        "INSERT INTO tickets (id, caller_id, subject, channel, account, linked_ticket_id,"
        " first_response_due, resolution_due, is_demo)"
        " SELECT id, caller_id, subject, channel, account, linked, $7, $8, demo"
        " FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[],"
        "             $9::bool[]) AS t(id, caller_id, subject, channel, account, linked, demo)",
        ticket_ids, [m.caller_id for m, _ in new_tickets], [_subject_for(m) for m, _ in new_tickets],
        [m.message.raw.channel for m, _ in new_tickets], [m.message.raw.account for m, _ in new_tickets],
        [linked for _, linked in new_tickets], first_due, resolution_due,
        [m.message.raw.meta.get("demo") == "1" for m, _ in new_tickets],
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, to_status, to_tier, data)"
        " SELECT id, 'created', 'open', 'agent', data::jsonb FROM unnest($1::bigint[], $2::text[]) AS t(id, data)",
        ticket_ids,
        [_json({"channel": m.message.raw.channel, "linked_ticket_id": linked}) for m, linked in new_tickets],
    )  # fmt: skip


async def _reopen(conn: asyncpg.Connection, reopened: list[int]) -> None:
    """Closed tickets a caller wrote to again within the follow-up window, open again."""
    await conn.execute(
        "UPDATE tickets SET status = 'open', close_reason = NULL, closed_at = NULL,"
        " updated_at = now() WHERE id = ANY($1::bigint[])",
        reopened,
    )
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, from_status, to_status, note)"
        " SELECT id, 'reopened', 'closed', 'open', 'new message from the caller'"
        " FROM unnest($1::bigint[]) AS t(id)",
        reopened,
    )


async def _write_planned(
    conn: asyncpg.Connection,
    planned: list[tuple[int, _Planned]],
    new_tickets: list[tuple[MatchedInbound, int | None]],
    reopened: list[int],
    rules: TicketRules,
    now: datetime,
    results: list[Applied | None],
) -> None:
    """Write the gathered tickets, reopenings, messages and events: one statement per kind."""
    if not planned:
        return
    ids = await conn.fetchrow(
        "SELECT array(SELECT nextval('tickets_id_seq') FROM generate_series(1, $1)) AS tickets,"
        " array(SELECT nextval('messages_id_seq') FROM generate_series(1, $2)) AS messages",
        len(new_tickets), len(planned),
    )  # fmt: skip
    ticket_ids: list[int] = ids["tickets"]
    message_ids: list[int] = ids["messages"]
    if new_tickets:
        await _insert_tickets(conn, ticket_ids, new_tickets, rules, now)
    if reopened:
        await _reopen(conn, reopened)

    def ticket_of(plan: _Planned) -> int:
        return plan.ticket if plan.ticket > 0 else ticket_ids[-plan.ticket - 1]

    messages = [plan.matched.message for _, plan in planned]
    raws = [message.raw for message in messages]
    tickets = [ticket_of(plan) for _, plan in planned]
    await conn.execute(
        "INSERT INTO messages (id, ticket_id, caller_id, direction, channel, account, external_id, sender,"
        " subject, body_text, body_display, body_html, headers, meta, problems, auto_reply, status,"
        " trace_id, received_at)"
        " SELECT id, ticket_id, caller_id, 'in', channel, account, external_id, sender, subject, body_text,"
        " body_display, body_html, headers::jsonb, meta::jsonb, ARRAY(SELECT jsonb_array_elements_text(problems::jsonb)),"
        " auto_reply, 'received', trace_id, received_at"
        " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],"
        "             $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],"
        "             $13::text[], $14::text[], $15::bool[], $16::text[], $17::timestamptz[])"
        "   AS m(id, ticket_id, caller_id, channel, account, external_id, sender, subject, body_text,"
        "        body_display, body_html, headers, meta, problems, auto_reply, trace_id, received_at)",
        message_ids, tickets, [plan.matched.caller_id for _, plan in planned],
        [r.channel for r in raws], [r.account for r in raws], [r.external_id for r in raws],
        [r.sender for r in raws], [r.subject for r in raws], [r.body_text for r in raws],
        [m.body_display for m in messages], [r.body_html for r in raws], [_json(r.headers) for r in raws],
        [_json(r.meta) for r in raws], [_json(r.problems) for r in raws], [m.auto_reply for m in messages],
        [r.trace_id for r in raws], [datetime.fromtimestamp(r.received_at, UTC) for r in raws],
    )  # fmt: skip
    await _insert_attachments(conn, list(zip(message_ids, raws, strict=True)))
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, note, data)"
        " SELECT ticket_id, 'message', note, data::jsonb FROM unnest($1::bigint[], $2::text[], $3::text[])"
        "   AS e(ticket_id, note, data)",
        tickets,
        ["auto-reply stored" if m.auto_reply else None for m in messages],
        [_json({"message_id": message_id, "channel": raw.channel, "trace_id": raw.trace_id,
                "match": plan.matched.match_reason})
         for message_id, raw, (_, plan) in zip(message_ids, raws, planned, strict=True)],
    )  # fmt: skip
    active = sorted({t for t, m in zip(tickets, messages, strict=True) if not m.auto_reply})
    if active:
        await conn.execute(
            "UPDATE tickets SET last_activity_at = now(), updated_at = now() WHERE id = ANY($1::bigint[])",
            active,
        )
    for (index, plan), message_id, ticket_id in zip(planned, message_ids, tickets, strict=True):
        raw = plan.matched.message.raw
        results[index] = Applied(
            message_id, ticket_id, plan.matched.caller_id, plan.outcome, raw.trace_id, raw.channel,
            raw.received_at,
        )  # fmt: skip
