"""Channel health: whether each channel account works, as the pollers and webhooks last saw it."""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg

from ticketing.db import is_transient

log = logging.getLogger(__name__)

# How long the pollers and webhooks let pass between two "still up" writes per account.
HEALTH_WRITE_SECONDS = 10.0


_health_written: dict[tuple[str, str], tuple[str, float]] = {}


async def note_channel_ok(pool: asyncpg.Pool, channel: str, account: str) -> None:
    """Record that a channel account works; written on a change of state, else every few seconds."""
    key = (channel, account)
    state, written = _health_written.get(key, ("", 0.0))
    now = time.monotonic()
    if state == "up" and now - written < HEALTH_WRITE_SECONDS:
        return
    await _write_health(
        pool, key, "up",
        "INSERT INTO channel_health (channel, account, state, last_ok_at, last_error, updated_at)"
        " VALUES ($1, $2, 'up', now(), NULL, now()) ON CONFLICT (channel, account) DO UPDATE"
        " SET state = 'up', last_ok_at = now(), last_error = NULL, updated_at = now()",
    )  # fmt: skip


async def note_channel_down(pool: asyncpg.Pool, channel: str, account: str, error: str) -> None:
    """Record that a channel account fails, and why (the last success stays as it was)."""
    await _write_health(
        pool, (channel, account), "down",
        "INSERT INTO channel_health (channel, account, state, last_error, updated_at)"
        " VALUES ($1, $2, 'down', $3, now()) ON CONFLICT (channel, account) DO UPDATE"
        " SET state = 'down', last_error = excluded.last_error, updated_at = now()",
        error[:500],
    )  # fmt: skip


async def _write_health(
    pool: asyncpg.Pool, key: tuple[str, str], state: str, sql: str, *extra: Any
) -> None:
    try:
        async with pool.acquire(timeout=5) as conn:
            await conn.execute(sql, *key, *extra)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        if not (is_transient(exc) or isinstance(exc, asyncpg.UndefinedTableError)):
            raise
        # The database is away: `loket status` reports that itself; the next poll writes again.
        log.debug("channel health for %s/%s not written: %s", *key, exc)
        return
    except (OSError, TimeoutError) as exc:
        log.debug("channel health for %s/%s not written: %s", *key, exc)
        return
    _health_written[key] = (state, time.monotonic())
