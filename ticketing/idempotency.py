"""Idempotency keys in PostgreSQL: claim a key, record the response, replay it, prune old keys.

The claim runs inside the transaction that does the work and records the response, so a
key is either free, held by a transaction still running, or committed with its response.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

# How long a key is remembered: a request repeated later is a new request.
TTL = timedelta(hours=24)
PRUNE_BATCH = 5000


class StillRunning(Exception):
    """Another request holding the key did not finish within the wait."""


@dataclass(frozen=True)
class Stored:
    """What the first request with a key was and how it was answered."""

    fingerprint: bytes
    method: str
    path: str
    status: int | None
    headers: dict[str, str]
    body: bytes


async def claim(
    conn: asyncpg.Connection, agent_id: int, key: str, fingerprint: bytes, method: str,
    path: str, *, wait: float, ttl: timedelta = TTL,
) -> Stored | None:  # fmt: skip
    """Take the agent's key inside the caller's transaction: None when taken, else what is stored.

    A transaction that holds the key uncommitted is waited for (the insert waits on its row)
    for up to `wait` seconds, then StillRunning; the caller's transaction is then aborted.
    A key older than `ttl` is taken over as if it were free.
    """
    previous = await conn.fetchval("SELECT current_setting('lock_timeout')")
    await conn.execute(
        "SELECT set_config('lock_timeout', $1, true)", f"{max(int(wait * 1000), 1)}ms"
    )
    try:
        taken = await conn.fetchval(
            "INSERT INTO idempotency_keys (agent_id, key, fingerprint, method, path)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (agent_id, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,"
            " method = EXCLUDED.method, path = EXCLUDED.path, status = NULL, headers = '{}',"
            " body = '', created_at = now()"
            " WHERE idempotency_keys.created_at < now() - $6::interval"
            " RETURNING true",
            agent_id, key, fingerprint, method, path, ttl,
        )  # fmt: skip
    except asyncpg.LockNotAvailableError as exc:
        raise StillRunning(key) from exc
    await conn.execute("SELECT set_config('lock_timeout', $1, true)", previous)
    if taken:
        return None
    # The insert found a committed row and locked it: it cannot change or go away now.
    row = await conn.fetchrow(
        "SELECT fingerprint, method, path, status, headers, body FROM idempotency_keys"
        " WHERE agent_id = $1 AND key = $2",
        agent_id,
        key,
    )
    if row is None:  # never expected: the row is locked by this transaction
        raise StillRunning(key)
    return Stored(
        fingerprint=bytes(row["fingerprint"]), method=row["method"], path=row["path"],
        status=row["status"], headers=dict(row["headers"]), body=bytes(row["body"]),
    )  # fmt: skip


async def record(
    conn: asyncpg.Connection, agent_id: int, key: str, status: int, headers: dict[str, str],
    body: bytes,
) -> None:  # fmt: skip
    """Keep the response of the request that claimed the key (in its transaction)."""
    await conn.execute(
        "UPDATE idempotency_keys SET status = $3, headers = $4, body = $5"
        " WHERE agent_id = $1 AND key = $2",
        agent_id, key, status, headers, body,
    )  # fmt: skip


async def prune(conn: asyncpg.Connection, ttl: timedelta = TTL, batch: int = PRUNE_BATCH) -> int:
    """Delete keys older than `ttl`, in batches, skipping rows a request holds; return how many."""
    removed = 0
    while True:
        status = await conn.execute(
            "DELETE FROM idempotency_keys WHERE (agent_id, key) IN (SELECT agent_id, key"
            " FROM idempotency_keys WHERE created_at < now() - $1::interval"
            " LIMIT $2 FOR UPDATE SKIP LOCKED)",
            ttl,
            batch,
        )
        count = int(status.split()[-1])
        removed += count
        if count < batch:
            return removed
