"""The help-desk procedure in the database: callers, logged calls, transitions, SLA, open report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from channels.types import Identity
from normalizer.identity import identity_for
from normalizer.phone import PHONE_KINDS, looks_like_phone, normalize_phone
from ticketing.callers import IdentityTaken, find_by_identities, merge, resolve_merged
from ticketing.inbound import open_ticket
from ticketing.rules import TicketRules
from ticketing.states import STATUSES, TIERS, TicketState, apply

IDENTITY_KINDS: tuple[str, ...] = ("phone", "fax", "email", "facebook", "twitter", "telegram")
# The past tense of each action, as the event log names what happened.
EVENT_KINDS: dict[str, str] = {
    "pend": "pended",
    "resume": "resumed",
    "escalate": "escalated",
    "close": "closed",
    "reopen": "reopened",
}
# A call or a visit is answered while the person is there: it needs no separate first answer.
LIVE_CHANNELS: frozenset[str] = frozenset({"phone", "walk_in"})
KB_PROBLEM_MAX = 4000
SEARCH_LIMIT = 50
TICKETS_PER_CALLER = 50


class CallerNotFound(LookupError):
    """No caller with that id."""


class TicketNotFound(LookupError):
    """No ticket with that id."""


class AgentNotFound(LookupError):
    """No active agent with that id."""


class CallerConflict(Exception):
    """The caller records are not in a state that allows the change (e.g. already merged)."""


def identity_from_input(kind: str, value: str) -> Identity:
    """An identity from what an agent typed; ValueError when it cannot be one."""
    typed = value.strip()
    if not typed:
        raise ValueError(f"empty {kind} identity")
    if kind in PHONE_KINDS:
        return normalize_phone(typed, kind=kind)
    if kind == "email":
        identity = identity_for("email", typed)
        if identity is None:
            raise ValueError(f"not an e-mail address: {typed!r}")
        return identity
    if kind in IDENTITY_KINDS:
        return Identity(kind=kind, value=typed)
    raise ValueError(f"unknown identity kind {kind!r}; one of {', '.join(IDENTITY_KINDS)}")


# --- callers -------------------------------------------------------------------------------

_CALLER_COLUMNS = "id, name, organization, organization_code, region, notes, created_at, updated_at"


async def callers_by_id(
    conn: asyncpg.Connection, caller_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Callers with their identities and tickets (open ones first), in the order of `caller_ids`."""
    if not caller_ids:
        return []
    ids = list(caller_ids)
    callers = await conn.fetch(
        f"SELECT {_CALLER_COLUMNS} FROM callers WHERE id = ANY($1::bigint[])", ids
    )
    identities = await conn.fetch(
        "SELECT id, caller_id, kind, value, display, valid FROM identities"
        " WHERE caller_id = ANY($1::bigint[]) ORDER BY kind, id",
        ids,
    )
    tickets = await conn.fetch(
        "SELECT id, caller_id, status, tier, close_reason, subject, channel, created_at, updated_at"
        " FROM (SELECT *, row_number() OVER (PARTITION BY caller_id"
        "   ORDER BY (status = 'closed'), id DESC) AS n FROM tickets"
        "   WHERE caller_id = ANY($1::bigint[])) ranked"
        " WHERE n <= $2 ORDER BY (status = 'closed'), id DESC",
        ids, TICKETS_PER_CALLER,
    )  # fmt: skip
    by_id = {row["id"]: {**dict(row), "identities": [], "tickets": []} for row in callers}
    for identity in identities:
        by_id[identity["caller_id"]]["identities"].append(dict(identity))
    for ticket in tickets:
        by_id[ticket["caller_id"]]["tickets"].append(dict(ticket))
    return [by_id[i] for i in ids if i in by_id]


async def caller_detail(conn: asyncpg.Connection, caller_id: int) -> dict[str, Any]:
    """One caller, following merges: `merged_from` is the id asked for when it was merged away."""
    exists = await conn.fetchval("SELECT 1 FROM callers WHERE id = $1", caller_id)
    if not exists:
        raise CallerNotFound(f"caller {caller_id} does not exist")
    survivor_id = await resolve_merged(conn, caller_id)
    [caller] = await callers_by_id(conn, [survivor_id])
    caller["merged_from"] = caller_id if survivor_id != caller_id else None
    caller["merged_ids"] = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM callers WHERE merged_into = $1 ORDER BY id", survivor_id
        )
    ]
    caller["events"] = [
        dict(r)
        for r in await conn.fetch(
            "SELECT id, at, actor, kind, note, data FROM caller_events WHERE caller_id = $1 ORDER BY id",
            survivor_id,
        )
    ]
    return caller


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def search_callers(
    conn: asyncpg.Connection,
    *,
    phone: str | None = None,
    email: str | None = None,
    q: str | None = None,
    limit: int = SEARCH_LIMIT,
) -> list[dict[str, Any]]:
    """Callers matching every criterion given; merged callers never appear (their survivor does).

    `phone` matches phone and fax identities in any typed form; `email` matches exactly,
    ignoring case; `q` is free text over name, organization and identity values.
    """
    where = ["c.merged_into IS NULL"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if phone is not None:
        number = normalize_phone(phone).value
        where.append(
            "EXISTS (SELECT 1 FROM identities i WHERE i.caller_id = c.id"
            f" AND i.kind = ANY({arg(list(PHONE_KINDS))}::text[]) AND i.value = {arg(number)})"
        )
    if email is not None:
        where.append(
            "EXISTS (SELECT 1 FROM identities i WHERE i.caller_id = c.id"
            f" AND i.kind = 'email' AND i.value = {arg(email.strip().lower())})"
        )
    if q is not None:
        pattern = arg(_like(q.strip()))
        alternatives = [
            f"c.name ILIKE {pattern}",
            f"c.organization ILIKE {pattern}",
            f"c.organization_code ILIKE {pattern}",
            f"c.name_key = loket_name_key({arg(q)})",
            "EXISTS (SELECT 1 FROM identities i WHERE i.caller_id = c.id"
            f" AND (i.value ILIKE {pattern} OR i.display ILIKE {pattern}))",
        ]
        if looks_like_phone(q):
            alternatives.append(
                "EXISTS (SELECT 1 FROM identities i WHERE i.caller_id = c.id"
                f" AND i.kind = ANY({arg(list(PHONE_KINDS))}::text[])"
                f" AND i.value = {arg(normalize_phone(q).value)})"
            )
        where.append(f"({' OR '.join(alternatives)})")
    rows = await conn.fetch(
        f"SELECT c.id FROM callers c WHERE {' AND '.join(where)}"
        f" ORDER BY c.name NULLS LAST, c.id LIMIT {arg(limit)}",
        *args,
    )
    return await callers_by_id(conn, [r["id"] for r in rows])


async def holder_of(conn: asyncpg.Connection, identity: Identity) -> dict[str, Any] | None:
    """The caller (id, name) who holds `identity`, following merges."""
    found = await find_by_identities(conn, [identity])
    caller_id = found.get((identity.kind, identity.value))
    if caller_id is None:
        return None
    row = await conn.fetchrow("SELECT id, name FROM callers WHERE id = $1", caller_id)
    return dict(row) if row else None


async def _caller_event(
    conn: asyncpg.Connection, caller_id: int, kind: str, *, actor: str, agent_id: int | None,
    note: str | None = None, data: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    await conn.execute(
        "INSERT INTO caller_events (caller_id, actor, agent_id, kind, note, data)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        caller_id, actor, agent_id, kind, note, data or {},
    )  # fmt: skip


async def _insert_identity(conn: asyncpg.Connection, caller_id: int, identity: Identity) -> int:
    """The new identity row's id; IdentityTaken when another caller holds it already."""
    identity_id = await conn.fetchval(
        "INSERT INTO identities (caller_id, kind, value, display, valid) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (kind, value) DO NOTHING RETURNING id",
        caller_id, identity.kind, identity.value, identity.display, identity.valid,
    )  # fmt: skip
    if identity_id is not None:
        return int(identity_id)
    found = await find_by_identities(conn, [identity])
    holder = found.get((identity.kind, identity.value))
    if holder is None:
        # The holder was deleted between the insert and the look-up: try once more.
        return await _insert_identity(conn, caller_id, identity)
    raise IdentityTaken(identity, holder)


@dataclass(frozen=True)
class CallerFields:
    """What an agent records about a caller."""

    name: str
    organization: str | None = None
    organization_code: str | None = None
    region: str | None = None
    notes: str | None = None


async def register_caller(
    conn: asyncpg.Connection, fields: CallerFields, identities: Sequence[Identity], *,
    actor: str, agent_id: int | None,
) -> int:  # fmt: skip
    """Create a caller with its identities, all or nothing; IdentityTaken names the holder."""
    unique = list(dict.fromkeys(identities))
    async with conn.transaction():
        caller_id: int = await conn.fetchval(
            "INSERT INTO callers (name, organization, organization_code, region, notes)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            fields.name, fields.organization, fields.organization_code, fields.region, fields.notes,
        )  # fmt: skip
        for identity in unique:
            await _insert_identity(conn, caller_id, identity)
        await _caller_event(
            conn, caller_id, "created", actor=actor, agent_id=agent_id,
            data={"identities": [f"{i.kind}:{i.value}" for i in unique]},
        )  # fmt: skip
    return caller_id


async def _live_caller(conn: asyncpg.Connection, caller_id: int, *, lock: bool = False) -> int:
    """The surviving caller for `caller_id` (locked when asked); CallerNotFound if there is none."""
    survivor_id = await resolve_merged(conn, caller_id)
    found = await conn.fetchval(
        f"SELECT id FROM callers WHERE id = $1{' FOR UPDATE' if lock else ''}", survivor_id
    )
    if found is None:
        raise CallerNotFound(f"caller {caller_id} does not exist")
    return int(found)


async def add_identity(
    conn: asyncpg.Connection,
    caller_id: int,
    identity: Identity,
    *,
    actor: str,
    agent_id: int | None,
) -> int:
    """Give a caller one more identity (idempotent for the same caller); returns the caller id."""
    survivor_id = await _live_caller(conn, caller_id, lock=True)
    holder = await holder_of(conn, identity)
    if holder is not None:
        if holder["id"] == survivor_id:
            return survivor_id
        raise IdentityTaken(identity, holder["id"])
    async with conn.transaction():
        await _insert_identity(conn, survivor_id, identity)
        await _caller_event(
            conn, survivor_id, "identity_added", actor=actor, agent_id=agent_id,
            data={"kind": identity.kind, "value": identity.value},
        )  # fmt: skip
    return survivor_id


async def remove_identity(
    conn: asyncpg.Connection, caller_id: int, identity_id: int, *, actor: str, agent_id: int | None
) -> int:
    """Take an identity away from a caller; LookupError when the caller does not hold it."""
    survivor_id = await _live_caller(conn, caller_id, lock=True)
    removed = await conn.fetchrow(
        "DELETE FROM identities WHERE id = $1 AND caller_id = $2 RETURNING kind, value",
        identity_id, survivor_id,
    )  # fmt: skip
    if removed is None:
        raise LookupError(f"caller {survivor_id} has no identity {identity_id}")
    await _caller_event(
        conn, survivor_id, "identity_removed", actor=actor, agent_id=agent_id,
        data={"kind": removed["kind"], "value": removed["value"]},
    )  # fmt: skip
    return survivor_id


async def merge_callers(
    conn: asyncpg.Connection, merged_id: int, into_id: int, *, actor: str, agent_id: int | None,
    note: str | None = None,
) -> int:  # fmt: skip
    """Merge caller `merged_id` into `into_id`: identities, tickets, messages and history move.

    Must run inside a transaction. Empty fields of the survivor are filled from the merged
    record; the merged id keeps answering as the survivor.
    """
    survivor_id = await resolve_merged(conn, into_id)
    # Lock both records in id order so two merges of the same pair cannot deadlock.
    rows = await conn.fetch(
        "SELECT id, merged_into FROM callers WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
        [merged_id, survivor_id],
    )
    found = {r["id"]: r["merged_into"] for r in rows}
    for wanted in (merged_id, survivor_id):
        if wanted not in found:
            raise CallerNotFound(f"caller {wanted} does not exist")
    if found[merged_id] is not None:
        raise CallerConflict(f"caller {merged_id} is already merged into caller {found[merged_id]}")
    if survivor_id == merged_id:
        raise CallerConflict("a caller cannot be merged into itself")
    await conn.execute(
        "UPDATE callers s SET organization = coalesce(s.organization, m.organization),"
        " organization_code = coalesce(s.organization_code, m.organization_code),"
        " region = coalesce(s.region, m.region), name = coalesce(s.name, m.name),"
        " notes = CASE WHEN m.notes IS NULL OR m.notes = '' THEN s.notes"
        "   WHEN s.notes IS NULL OR s.notes = '' THEN m.notes ELSE s.notes || E'\\n' || m.notes END"
        " FROM callers m WHERE s.id = $1 AND m.id = $2",
        survivor_id, merged_id,
    )  # fmt: skip
    moved_tickets = await conn.fetchval(
        "SELECT count(*) FROM tickets WHERE caller_id = $1", merged_id
    )
    moved_identities = await conn.fetchval(
        "SELECT count(*) FROM identities WHERE caller_id = $1", merged_id
    )
    await merge(conn, survivor_id, merged_id, actor=actor, agent_id=agent_id, reason=note or "")
    # Keep every merged id one hop from its survivor, and the record's history with it.
    await conn.execute(
        "UPDATE callers SET merged_into = $1 WHERE merged_into = $2", survivor_id, merged_id
    )
    await conn.execute(
        "UPDATE caller_events SET caller_id = $1 WHERE caller_id = $2", survivor_id, merged_id
    )
    data = {
        "from": merged_id,
        "into": survivor_id,
        "tickets": moved_tickets,
        "identities": moved_identities,
    }
    await _caller_event(
        conn, survivor_id, "merged", actor=actor, agent_id=agent_id, note=note, data=data
    )
    await _caller_event(
        conn, merged_id, "merged_into", actor=actor, agent_id=agent_id, note=note, data=data
    )
    return survivor_id


async def find_duplicates(conn: asyncpg.Connection, caller_id: int) -> list[dict[str, Any]]:
    """Callers who may be the same person: same name, or the same organization and a name that
    starts like theirs. Each comes with its `reasons`; nothing is merged here."""
    survivor_id = await _live_caller(conn, caller_id)
    rows = await conn.fetch(
        "SELECT c.id,"
        " (c.name_key = me.name_key) AS same_name,"
        " (c.organization_key = me.organization_key) AS same_organization"
        " FROM callers me JOIN callers c ON c.id <> me.id AND c.merged_into IS NULL"
        " WHERE me.id = $1 AND me.name_key IS NOT NULL AND c.name_key IS NOT NULL AND ("
        "   c.name_key = me.name_key"
        "   OR (c.organization_key = me.organization_key"
        "       AND (c.name_key LIKE me.name_key || ' %' OR me.name_key LIKE c.name_key || ' %')))"
        " ORDER BY (c.organization_key = me.organization_key) DESC NULLS LAST, c.id"
        " LIMIT 50",
        survivor_id,
    )
    reasons = {
        r["id"]: [
            *(["same name"] if r["same_name"] else ["similar name"]),
            *(["same organization"] if r["same_organization"] else []),
        ]
        for r in rows
    }
    callers = await callers_by_id(conn, [r["id"] for r in rows])
    return [{**caller, "reasons": reasons[caller["id"]]} for caller in callers]


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


# --- the open report -----------------------------------------------------------------------


@dataclass(frozen=True)
class OpenTicket:
    """One ticket not closed, as the report shows it."""

    id: int
    caller_id: int
    caller_name: str | None
    subject: str
    channel: str
    status: str
    tier: str
    created_at: datetime
    last_activity_at: datetime
    first_response_due: datetime | None
    resolution_due: datetime | None
    age: timedelta
    idle: timedelta
    overdue: bool
    overdue_by: timedelta | None


@dataclass(frozen=True)
class ReportGroup:
    tier: str
    status: str
    tickets: list[OpenTicket]


@dataclass(frozen=True)
class OpenReport:
    """Every ticket not closed, by tier and status, oldest first; and the ones stuck pending."""

    generated_at: datetime
    total: int
    overdue: int
    groups: list[ReportGroup]
    # Pending at support or management beyond their resolution deadline.
    stuck_pending: list[OpenTicket] = field(default_factory=list)


async def open_report(conn: asyncpg.Connection, now: datetime | None = None) -> OpenReport:
    """Nothing missed: each open or pending ticket appears exactly once in `groups`."""
    now = now or datetime.now(UTC)
    rows = await conn.fetch(
        "SELECT t.id, t.caller_id, c.name AS caller_name, t.subject, t.channel, t.status, t.tier,"
        " t.created_at, t.last_activity_at, t.first_response_due, t.first_response_at, t.resolution_due"
        " FROM tickets t JOIN callers c ON c.id = t.caller_id"
        " WHERE t.status <> 'closed' ORDER BY t.created_at, t.id"
    )
    tickets = []
    for r in rows:
        late_resolution = r["resolution_due"] is not None and r["resolution_due"] < now
        late_answer = (
            r["first_response_at"] is None
            and r["first_response_due"] is not None
            and r["first_response_due"] < now
        )
        tickets.append(
            OpenTicket(
                id=r["id"],
                caller_id=r["caller_id"],
                caller_name=r["caller_name"],
                subject=r["subject"],
                channel=r["channel"],
                status=r["status"],
                tier=r["tier"],
                created_at=r["created_at"],
                last_activity_at=r["last_activity_at"],
                first_response_due=r["first_response_due"],
                resolution_due=r["resolution_due"],
                age=now - r["created_at"],
                idle=now - r["last_activity_at"],
                overdue=late_resolution or late_answer,
                overdue_by=now - r["resolution_due"] if late_resolution else None,
            )  # fmt: skip
        )
    groups = [
        ReportGroup(tier, status, [t for t in tickets if t.tier == tier and t.status == status])
        for tier in TIERS
        for status in STATUSES
        if status != "closed"
    ]
    stuck = [
        t
        for t in tickets
        if t.status == "pending"
        and t.tier in ("support", "management")
        and t.overdue_by is not None
    ]
    return OpenReport(
        generated_at=now,
        total=len(tickets),
        overdue=sum(t.overdue for t in tickets),
        groups=groups,
        stuck_pending=stuck,
    )
