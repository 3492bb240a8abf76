"""Callers and their identities: matching a sender to a caller, safely under concurrency."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from channels.types import Identity


class IdentityTaken(Exception):
    """An identity already belongs to another caller."""

    def __init__(self, identity: Identity, caller_id: int):
        super().__init__(f"{identity.kind} {identity.value} already belongs to caller {caller_id}")
        self.identity = identity
        self.caller_id = caller_id


async def resolve_merged(conn: asyncpg.Connection, caller_id: int) -> int:
    """Follow `merged_into` to the surviving caller."""
    seen = set()
    while caller_id not in seen:
        seen.add(caller_id)
        target = await conn.fetchval("SELECT merged_into FROM callers WHERE id = $1", caller_id)
        if target is None:
            return caller_id
        caller_id = target
    return caller_id


async def find_by_identities(
    conn: asyncpg.Connection, identities: Sequence[Identity]
) -> dict[tuple[str, str], int]:
    """Caller id by (kind, value) for the identities already known, in one round trip."""
    if not identities:
        return {}
    rows = await conn.fetch(
        "SELECT i.kind, i.value, coalesce(c.merged_into, c.id) AS caller_id"
        " FROM identities i JOIN callers c ON c.id = i.caller_id"
        " JOIN unnest($1::text[], $2::text[]) AS q(kind, value)"
        "   ON i.kind = q.kind AND i.value = q.value",
        [i.kind for i in identities],
        [i.value for i in identities],
    )
    return {(r["kind"], r["value"]): r["caller_id"] for r in rows}


async def create_with_identity(
    conn: asyncpg.Connection, identity: Identity, name: str | None, *, is_demo: bool = False
) -> tuple[int, bool]:
    """Create a caller holding `identity`; if another transaction won the race, return theirs.

    Returns (caller_id, created). Uses a savepoint so the losing insert does not spoil
    the surrounding transaction.
    """
    async with conn.transaction():
        caller_id = await conn.fetchval(
            "INSERT INTO callers (name, is_demo) VALUES ($1, $2) RETURNING id", name, is_demo
        )
        taken_by = await conn.fetchval(
            "INSERT INTO identities (caller_id, kind, value, display, valid)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kind, value) DO NOTHING RETURNING caller_id",
            caller_id,
            identity.kind,
            identity.value,
            identity.display,
            identity.valid,
        )
        if taken_by is not None:
            return caller_id, True
        await conn.execute("DELETE FROM callers WHERE id = $1", caller_id)
    existing = await find_by_identities(conn, [identity])
    return existing[(identity.kind, identity.value)], False


async def create_with_identities(
    conn: asyncpg.Connection,
    wanted: Sequence[tuple[Identity, str | None]],
    *,
    is_demo: bool = False,
) -> dict[tuple[str, str], tuple[int, bool]]:
    """`create_with_identity` for many identities in a few round trips.

    Returns (caller_id, created) by (kind, value). An identity another transaction holds
    already keeps its caller; the caller made for it here is removed again.
    """
    unique: dict[tuple[str, str], tuple[Identity, str | None]] = {}
    for identity, name in wanted:
        unique.setdefault((identity.kind, identity.value), (identity, name))
    if not unique:
        return {}
    entries = list(unique.values())
    async with conn.transaction():
        caller_ids: list[int] = await conn.fetchval(
            "SELECT array(SELECT nextval('callers_id_seq') FROM generate_series(1, $1))",
            len(entries),
        )
        await conn.execute(
            "INSERT INTO callers (id, name, is_demo)"
            " SELECT id, name, $3 FROM unnest($1::bigint[], $2::text[]) AS c(id, name)",
            caller_ids,
            [name for _, name in entries],
            is_demo,
        )
        rows = await conn.fetch(
            "INSERT INTO identities (caller_id, kind, value, display, valid)"
            " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bool[])"
            " ON CONFLICT (kind, value) DO NOTHING RETURNING caller_id, kind, value",
            caller_ids,
            [i.kind for i, _ in entries],
            [i.value for i, _ in entries],
            [i.display for i, _ in entries],
            [i.valid for i, _ in entries],
        )
        found = {(r["kind"], r["value"]): (r["caller_id"], True) for r in rows}
        unused = [
            cid
            for cid, (i, _) in zip(caller_ids, entries, strict=True)
            if (i.kind, i.value) not in found
        ]
        if unused:
            await conn.execute("DELETE FROM callers WHERE id = ANY($1::bigint[])", unused)
    taken = [i for i, _ in entries if (i.kind, i.value) not in found]
    if taken:
        existing = await find_by_identities(conn, taken)
        found.update({key: (caller_id, False) for key, caller_id in existing.items()})
    return found


async def create_anonymous(conn: asyncpg.Connection, label: str) -> int:
    """A caller with no identity (e.g. a fax whose number could not be read)."""
    return await conn.fetchval("INSERT INTO callers (name) VALUES ($1) RETURNING id", label)


async def attach_identity(conn: asyncpg.Connection, caller_id: int, identity: Identity) -> int:
    """Give a caller one more identity; returns the caller holding it afterwards.

    When another caller already holds it, nothing changes and that caller's id is returned.
    """
    holder = await conn.fetchval(
        "INSERT INTO identities (caller_id, kind, value, display, valid) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (kind, value) DO NOTHING RETURNING caller_id",
        caller_id,
        identity.kind,
        identity.value,
        identity.display,
        identity.valid,
    )
    if holder is not None:
        return caller_id
    existing = await find_by_identities(conn, [identity])
    return existing[(identity.kind, identity.value)]


async def merge(
    conn: asyncpg.Connection,
    survivor_id: int,
    merged_id: int,
    *,
    actor: str,
    agent_id: int | None = None,
    reason: str = "",
) -> int:
    """Move identities, tickets and messages of `merged_id` to `survivor_id`; the old id redirects."""
    if survivor_id == merged_id:
        raise ValueError("a caller cannot be merged into itself")
    await conn.execute(
        "UPDATE identities SET caller_id = $1 WHERE caller_id = $2", survivor_id, merged_id
    )
    tickets = await conn.fetch(
        "UPDATE tickets SET caller_id = $1, updated_at = now() WHERE caller_id = $2 RETURNING id",
        survivor_id,
        merged_id,
    )
    await conn.execute(
        "UPDATE messages SET caller_id = $1 WHERE caller_id = $2", survivor_id, merged_id
    )
    await conn.execute(
        "UPDATE callers SET merged_into = $1, updated_at = now() WHERE id = $2",
        survivor_id,
        merged_id,
    )
    await conn.executemany(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, note, data)"
        " VALUES ($1, $2, $3, 'caller_merged', $4, $5)",
        [
            (t["id"], actor, agent_id, reason or None, {"from": merged_id, "into": survivor_id})
            for t in tickets
        ],
    )
    return survivor_id


async def merge_on_verified_identity(
    conn: asyncpg.Connection, caller_id: int, holder_id: int, identity: Identity
) -> int:
    """A platform-verified identity (e.g. a contact shared through Telegram) joins two callers.

    The caller that already held the identity survives: it usually has the longer history.
    """
    return await merge(
        conn,
        holder_id,
        caller_id,
        actor="system",
        reason=f"{identity.kind} {identity.value} shared by the caller through the platform",
    )
