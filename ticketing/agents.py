"""Agents, their argon2 password hashes and login sessions."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("agent", "support", "manager", "admin")
_hasher = PasswordHasher()
# Verifying against this keeps a login for an unknown user as slow as one for a known user.
_DUMMY_HASH = _hasher.hash("loket-no-such-user")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def add_agent(
    conn: asyncpg.Connection,
    username: str,
    password: str,
    role: str,
    display_name: str | None = None,
) -> int:
    """Create an agent, or reset an existing one's password and role."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise ValueError("password must have at least 8 characters")
    return await conn.fetchval(
        "INSERT INTO agents (username, password_hash, role, display_name) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash,"
        " role = excluded.role, active = true RETURNING id",
        username,
        _hasher.hash(password),
        role,
        display_name,
    )


async def authenticate(
    conn: asyncpg.Connection, username: str, password: str
) -> dict[str, Any] | None:
    row = await conn.fetchrow("SELECT * FROM agents WHERE username = $1 AND active", username)
    try:
        _hasher.verify(row["password_hash"] if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return dict(row) if row else None


async def create_session(conn: asyncpg.Connection, agent_id: int, hours: float) -> str:
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO agent_sessions (token_hash, agent_id, expires_at) VALUES ($1, $2, $3)",
        _token_hash(token),
        agent_id,
        datetime.now(UTC) + timedelta(hours=hours),
    )
    return token


async def agent_for_token(conn: asyncpg.Connection, token: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT a.id, a.username, a.role, a.display_name FROM agent_sessions s"
        " JOIN agents a ON a.id = s.agent_id WHERE s.token_hash = $1 AND s.expires_at > now() AND a.active",
        _token_hash(token),
    )
    return dict(row) if row else None


async def end_session(conn: asyncpg.Connection, token: str) -> None:
    await conn.execute("DELETE FROM agent_sessions WHERE token_hash = $1", _token_hash(token))
