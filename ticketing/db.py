"""PostgreSQL connection pool and the numbered-migration runner."""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

# Any migration runner takes this lock, so two processes starting at once do not race.
_MIGRATION_LOCK = 7_406_351


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections speak JSON for json/jsonb columns."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=60
    )
    assert pool is not None
    return pool


def migration_files() -> list[tuple[int, str, str]]:
    """The packaged migrations as (number, name, sql), in order."""
    found = []
    for entry in resources.files("ticketing.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply the migrations not yet recorded in `schema_migrations`; return their names."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " number integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row["number"] for row in await conn.fetch("SELECT number FROM schema_migrations")}
        for number, name, sql in migration_files():
            if number in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (number, name) VALUES ($1, $2)", number, name
                )
            log.info("applied migration %s", name)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied


async def migrations_current(conn: asyncpg.Connection) -> bool:
    """True when every packaged migration has been applied."""
    try:
        done = {row["number"] for row in await conn.fetch("SELECT number FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        return False
    return all(number in done for number, _, _ in migration_files())


# Errors after which waiting helps: the server restarts, the network blips.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether an error is about the database being unreachable rather than about the data.

    asyncpg reports a value it cannot encode as an InterfaceError that is also a
    ValueError: that is the message's fault, and waiting would never help.
    """
    return isinstance(exc, TRANSIENT_ERRORS) and not isinstance(exc, ValueError)


def record_to_dict(record: Any) -> dict[str, Any]:
    return dict(record) if record is not None else {}
