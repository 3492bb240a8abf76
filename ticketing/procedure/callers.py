"""Callers in the procedure: look-up, the card, registration, identities, merges, duplicates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from channels.types import Identity
from normalizer.phone import PHONE_KINDS, looks_like_phone, normalize_phone
from ticketing.callers import IdentityTaken, find_by_identities, merge, resolve_merged
from ticketing.procedure.base import (
    SEARCH_LIMIT,
    TICKETS_PER_CALLER,
    CallerConflict,
    CallerNotFound,
)

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
