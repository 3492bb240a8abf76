"""Test databases on the development PostgreSQL server, one per test session."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from typing import Any

import asyncpg

SERVER_URL = os.environ.get("LOKET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _run(coro: Any) -> Any:
    """Run a coroutine to completion even when the calling thread has a running loop."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def create_database(prefix: str = "loket_test") -> str:
    """Create a fresh database and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(SERVER_URL)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    _run(create())
    return SERVER_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(SERVER_URL)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    _run(drop())


def fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of one query as dicts (for assertions in synchronous tests)."""

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return _run(run())


def fetchval(url: str, sql: str, *args: Any) -> Any:
    rows = fetch(url, sql, *args)
    return next(iter(rows[0].values())) if rows else None
