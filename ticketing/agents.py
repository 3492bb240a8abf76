"""Agents, their argon2 password hashes (computed off the event loop), password policy and sessions."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ticketing.roles import ROLES

T = TypeVar("T")

PASSWORD_MIN = 12
PASSWORD_MAX = 1000


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, in a container too
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# argon2-cffi releases the GIL while hashing, so these threads hash while the event loop goes
# on serving webhooks and pages; one core is left to the loop, so a flood of logins cannot
# starve it of CPU either.
HASH_WORKERS = max(1, min(_cores() - 1, 8))
# Hashes that may wait for a worker; past that a login is refused at once (each hash takes
# about 0.1 s, so a full queue is drained within about a second).
HASH_QUEUE_PER_WORKER = 8
BUSY_RETRY_SECONDS = 2

_hasher = PasswordHasher()
# Verifying against this keeps a login for an unknown user as slow as one for a known user.
_DUMMY_HASH = _hasher.hash("loket-no-such-user")


class HashingBusy(Exception):
    """Too many password hashes waiting: the login is shed before any work is done."""

    def __init__(self, retry_after: int = BUSY_RETRY_SECONDS):
        super().__init__("too many logins at once; try again in a moment")
        self.retry_after = retry_after


class WeakPassword(ValueError):
    """A password the policy refuses; the message says why."""


class HashPool:
    """A small thread pool for argon2 with a bound on the work waiting for it."""

    def __init__(self, workers: int = HASH_WORKERS, queue: int = HASH_QUEUE_PER_WORKER):
        self.workers = workers
        self.limit = workers * (1 + queue)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="argon2")
        self._lock = threading.Lock()
        self.pending = 0  # submitted and not finished, running or waiting

    def full(self) -> bool:
        return self.pending >= self.limit

    def admit(self) -> None:
        """Raise HashingBusy when no more hashing can be queued (checked before any work)."""
        if self.full():
            raise HashingBusy()

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` on a hashing thread; the slot is freed when the thread is done with it,
        even if the awaiting request was cancelled meanwhile."""
        with self._lock:
            if self.pending >= self.limit:
                raise HashingBusy()
            self.pending += 1
        future = self._executor.submit(work, *args)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)


hash_pool = HashPool()


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of commonly used passwords, lower-cased."""
    text = resources.files("ticketing").joinpath("common_passwords.txt").read_text("utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip())


def _core(password: str) -> str:
    """The password without the digits and symbols people add around a word (`Sayang2024!`)."""
    return password.lower().strip("0123456789!@#$%^&*()-_=+.,;:?/\\|~`'\" ")


def password_problem(password: str, username: str = "") -> str | None:
    """Why the policy refuses `password`, or None when it is acceptable."""
    if len(password) < PASSWORD_MIN:
        return f"the password must have at least {PASSWORD_MIN} characters"
    if len(password) > PASSWORD_MAX:
        return f"the password may have at most {PASSWORD_MAX} characters"
    if len(set(password)) < 4:
        return "the password must not be made of a few repeated characters"
    lowered = password.lower()
    if username and len(username) >= 3 and username.lower() in lowered:
        return "the password must not contain the username"
    common = common_passwords()
    core = _core(password)
    # A common word repeated ("qwertyqwerty") is as guessable as the word.
    repeated = any(
        len(core) % size == 0
        and core[:size] * (len(core) // size) == core
        and core[:size] in common
        for size in range(1, len(core) // 2 + 1)
    )
    if lowered in common or core in common or repeated:
        return "the password is on the list of commonly used passwords; choose another"
    return None


def check_password(password: str, username: str = "") -> None:
    """Raise WeakPassword with the reason when the policy refuses `password`."""
    problem = password_problem(password, username)
    if problem is not None:
        raise WeakPassword(problem)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


async def hash_password(password: str) -> str:
    return await hash_pool.run(_hasher.hash, password)


async def add_agent(
    conn: asyncpg.Connection,
    username: str,
    password: str,
    role: str,
    display_name: str | None = None,
) -> int:
    """Create an agent, or reset an existing one's password and role, ending their sessions."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    check_password(password, username)
    password_hash = await hash_password(password)
    async with conn.transaction():
        agent_id: int = await conn.fetchval(
            "INSERT INTO agents (username, password_hash, role, display_name) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash,"
            " role = excluded.role, active = true, password_changed_at = now() RETURNING id",
            username,
            password_hash,
            role,
            display_name,
        )
        await end_sessions(conn, agent_id)
    return agent_id


async def set_password(conn: asyncpg.Connection, agent_id: int, password: str) -> int:
    """Give an agent a new password and end every session they have; return how many ended."""
    username = await conn.fetchval("SELECT username FROM agents WHERE id = $1", agent_id)
    if username is None:
        raise LookupError(f"agent {agent_id} does not exist")
    check_password(password, username)
    password_hash = await hash_password(password)
    async with conn.transaction():
        await conn.execute(
            "UPDATE agents SET password_hash = $2, password_changed_at = now() WHERE id = $1",
            agent_id,
            password_hash,
        )
        return await end_sessions(conn, agent_id)


async def authenticate(pool: asyncpg.Pool, username: str, password: str) -> dict[str, Any] | None:
    """The active agent with this username and password, or None.

    Raises HashingBusy at once, before any work, when too many logins are being hashed. No
    database connection is held while hashing, so a login flood cannot starve the pool.
    """
    hash_pool.admit()
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM agents WHERE username = $1 AND active", username)
    matches = await hash_pool.run(_verify, row["password_hash"] if row else _DUMMY_HASH, password)
    return dict(row) if row is not None and matches else None


async def password_matches(conn: asyncpg.Connection, agent_id: int, password: str) -> bool:
    """Whether `password` is the agent's current one (hashed off the event loop)."""
    password_hash = await conn.fetchval("SELECT password_hash FROM agents WHERE id = $1", agent_id)
    return await hash_pool.run(_verify, password_hash or _DUMMY_HASH, password)


async def create_session(
    conn: asyncpg.Connection, agent: dict[str, Any], hours: float
) -> str | None:
    """A new session token for an agent just authenticated; None when their password changed
    (or they were deactivated) while the login was being checked."""
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "DELETE FROM agent_sessions WHERE agent_id = $1 AND expires_at <= now()", agent["id"]
    )
    created = await conn.fetchval(
        "INSERT INTO agent_sessions (token_hash, agent_id, expires_at)"
        " SELECT $1, id, $3 FROM agents WHERE id = $2 AND password_hash = $4 AND active"
        " RETURNING agent_id",
        _token_hash(token),
        agent["id"],
        datetime.now(UTC) + timedelta(hours=hours),
        agent["password_hash"],
    )
    return token if created is not None else None


async def agent_for_token(conn: asyncpg.Connection, token: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT a.id, a.username, a.role, a.display_name FROM agent_sessions s"
        " JOIN agents a ON a.id = s.agent_id WHERE s.token_hash = $1 AND s.expires_at > now() AND a.active",
        _token_hash(token),
    )
    return dict(row) if row else None


async def end_session(conn: asyncpg.Connection, token: str) -> bool:
    """End one session (logout); whether it existed."""
    ended = await conn.fetchval(
        "DELETE FROM agent_sessions WHERE token_hash = $1 RETURNING agent_id", _token_hash(token)
    )
    return ended is not None


async def end_sessions(conn: asyncpg.Connection, agent_id: int) -> int:
    """End every session of an agent; how many there were."""
    status = await conn.execute("DELETE FROM agent_sessions WHERE agent_id = $1", agent_id)
    return int(status.split()[-1])
