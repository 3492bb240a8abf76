"""Where each pull channel's account stands (`channel_cursors`), and which messages are stored."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg


async def load(
    conn: asyncpg.Connection, channel: str, account: str, scope: str = ""
) -> dict[str, Any] | None:
    """The cursor an account saved (a JSON object), or None before its first save."""
    stored: dict[str, Any] | None = await conn.fetchval(
        "SELECT cursor FROM channel_cursors WHERE channel = $1 AND account = $2 AND scope = $3",
        channel, account, scope,
    )  # fmt: skip
    return stored


async def save(
    conn: asyncpg.Connection, channel: str, account: str, cursor: dict[str, Any], scope: str = ""
) -> None:
    await conn.execute(
        "INSERT INTO channel_cursors (channel, account, scope, cursor) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (channel, account, scope) DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
        channel, account, scope, cursor,
    )  # fmt: skip


async def stored_ids(
    conn: asyncpg.Connection, channel: str, account: str, external_ids: Sequence[str]
) -> set[str]:
    """Which of these inbound messages of an account are in the database."""
    rows = await conn.fetch(
        "SELECT external_id FROM messages WHERE channel = $1 AND account = $2"
        " AND direction = 'in' AND external_id = ANY($3::text[])",
        channel, account, list(external_ids),
    )  # fmt: skip
    return {row["external_id"] for row in rows}
