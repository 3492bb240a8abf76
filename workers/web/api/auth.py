"""The agents' sessions: login with its throttle, logout, passwords, and who may do what."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field

from ticketing import agents, roles
from workers.runtime.runtime import Runtime
from workers.web import idempotency

SESSION_COOKIE = "loket_session"
router = APIRouter(prefix="/api")
# Login throttle: this many failures per username and address within the window answer 429.
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_SECONDS = 15 * 60


class LoginThrottled(Exception):
    """Too many failed logins for a name from an address: wait `retry_after` seconds."""

    def __init__(self, retry_after: float):
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


@dataclass(frozen=True)
class LoginAttempt:
    """A login counted as a failure in advance, until it proves right."""

    key: tuple[str, str]
    stamp: float


class LoginThrottle:
    """Failed logins per (username, address) in a sliding window, kept in this process.

    An attempt is counted when it starts, not when its password has been checked: however
    many arrive at once, at most `limit` per window are let through to be verified. One
    instance serves the API and the console, so guesses through one count for both.
    """

    def __init__(self, limit: int = LOGIN_MAX_FAILURES, window: float = LOGIN_WINDOW_SECONDS):
        self.limit = limit
        self.window = window
        self.failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        stamps = self.failures.setdefault(key, deque())
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        return stamps

    def blocked_for(self, username: str, address: str, now: float | None = None) -> float:
        """Seconds until another try is allowed; 0 when it is allowed now."""
        now = time.monotonic() if now is None else now
        stamps = self._recent((username.lower(), address), now)
        if len(stamps) < self.limit:
            return 0.0
        return max(stamps[0] + self.window - now, 1.0)

    def reserve(self, username: str, address: str, now: float | None = None) -> LoginAttempt:
        """Count an attempt as failed before verifying it; LoginThrottled when none is left.

        No await separates the check from the count, so concurrent attempts cannot all pass.
        """
        now = time.monotonic() if now is None else now
        wait = self.blocked_for(username, address, now)
        if wait:
            raise LoginThrottled(wait)
        key = (username.lower(), address)
        self._recent(key, now).append(now)
        if len(self.failures) > 100_000:  # a flood of made-up names must not eat the memory
            self.failures = {k: v for k, v in self.failures.items() if v}
        return LoginAttempt(key, now)

    def succeeded(self, attempt: LoginAttempt) -> None:
        """The password was right: the failures for this name and address are forgiven."""
        self.failures.pop(attempt.key, None)

    def cancel(self, attempt: LoginAttempt) -> None:
        """The attempt was never judged (shed, or the database failed): it does not count."""
        stamps = self.failures.get(attempt.key)
        if stamps is not None and attempt.stamp in stamps:
            stamps.remove(attempt.stamp)


login_throttle = LoginThrottle()


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


class Agent(BaseModel):
    id: int
    username: str
    role: str
    display_name: str | None = None


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.cookies.get(SESSION_COOKIE) or None


async def current_agent(request: Request) -> Agent:
    """The agent behind the bearer token or session cookie; 401 otherwise."""
    token = _token(request)
    if not token:
        raise HTTPException(401, "login required", headers={"WWW-Authenticate": "Bearer"})
    async with runtime(request).pool.acquire() as conn:
        agent = await agents.agent_for_token(conn, token)
    if agent is None:
        raise HTTPException(
            401, "session expired or invalid", headers={"WWW-Authenticate": "Bearer"}
        )
    request.state.agent = agent
    return Agent(**agent)


CurrentAgent = Annotated[Agent, Depends(current_agent)]
# The request's Idempotency-Key, scoped to the agent: see workers/web/idempotency.py.
Idempotent = Annotated[idempotency.Idempotency, Depends(idempotency.for_api(current_agent))]


def ensure_allowed(agent: Agent, permission: str) -> None:
    """403 unless the role matrix lets the agent's role do `permission`."""
    if not roles.allows(agent.role, permission):
        raise HTTPException(403, roles.refusal(permission))


def require(permission: str) -> Any:
    """A route dependency: the logged-in agent may do `permission` (see ticketing/roles.py).

    Every route of the API and the console names its permission this way, so the matrix is
    the one place that says who may do what.
    """
    roles.permission(permission)  # an unknown name fails at import, not at the first request

    async def check(agent: CurrentAgent) -> Agent:
        ensure_allowed(agent, permission)
        return agent

    check.permission = permission  # type: ignore[attr-defined]  # read by tests/test_roles.py
    return Depends(check)


class LoginRequest(BaseModel):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=agents.PASSWORD_MAX)


class LoginResponse(BaseModel):
    token: str
    agent: Agent


class LoginRefused(Exception):
    """A login that gets no session: `status` 401 (wrong), 429 (throttled) or 503 (busy)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


async def log_in(
    rt: Runtime, username: str, password: str, address: str
) -> tuple[dict[str, Any], str]:
    """The agent and a new session token, for the API and the console alike; LoginRefused otherwise.

    The attempt is counted against the throttle before the password is checked, and a login
    that finds the hashing threads full is refused before any database or hashing work.
    """
    try:
        attempt = login_throttle.reserve(username, address)
    except LoginThrottled as exc:
        raise LoginRefused(429, str(exc), int(exc.retry_after) + 1) from exc
    judged = False
    try:
        agent = await agents.authenticate(rt.pool, username, password) if password else None
        token = None
        if agent is not None:
            async with rt.pool.acquire() as conn:
                token = await agents.create_session(conn, agent, rt.settings.session_hours)
        judged = True
    except agents.HashingBusy as exc:
        raise LoginRefused(503, str(exc), exc.retry_after) from exc
    finally:
        if not judged:  # shed, cancelled or a database failure: not a wrong password
            login_throttle.cancel(attempt)
    if agent is None or token is None:
        raise LoginRefused(401, "wrong username or password")
    login_throttle.succeeded(attempt)
    return agent, token


@router.post(
    "/login",
    response_model=LoginResponse,
    tags=["agents"],
    responses={
        429: {"description": "too many failed logins"},
        503: {"description": "too many logins at once"},
    },
)
async def login(body: LoginRequest, request: Request, response: Response) -> LoginResponse:
    """Exchange username and password for a bearer token (also set as an HttpOnly cookie)."""
    rt = runtime(request)
    address = request.client.host if request.client else "-"
    try:
        agent, token = await log_in(rt, body.username, body.password, address)
    except LoginRefused as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        raise HTTPException(exc.status, exc.message, headers=headers) from exc
    response.set_cookie(
        SESSION_COOKIE,
        token,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        max_age=int(rt.settings.session_hours * 3600),
    )
    return LoginResponse(
        token=token,
        agent=Agent(**{k: agent[k] for k in ("id", "username", "role", "display_name")}),
    )


@router.post("/logout", status_code=204, tags=["agents"])
async def logout(request: Request, agent: CurrentAgent) -> Response:
    """End this token's session on the server; the token no longer works anywhere."""
    token = _token(request)
    if token:
        async with runtime(request).pool.acquire() as conn:
            await agents.end_session(conn, token)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE)
    return response


class PasswordChange(BaseModel):
    password: str = Field(min_length=1, max_length=agents.PASSWORD_MAX)
    current_password: str | None = Field(
        default=None, max_length=agents.PASSWORD_MAX,
        description="needed to change one's own password",
    )  # fmt: skip


class PasswordChanged(BaseModel):
    agent_id: int
    sessions_ended: int


@router.post("/agents/{agent_id}/password", response_model=PasswordChanged, tags=["agents"])
async def change_password(
    agent_id: int, body: PasswordChange, request: Request, agent: CurrentAgent
) -> PasswordChanged:
    """Set a password: one's own (with the current one) or, for admins, anyone's. Every session
    of that agent ends, this one too; 422 with the reason when the policy refuses it."""
    own = agent_id == agent.id
    ensure_allowed(agent, "agents.own_password" if own else "agents.password")
    address = request.client.host if request.client else "-"
    async with runtime(request).pool.acquire() as conn:
        try:
            if own:
                # Guessing the current password through here counts like guessing at login.
                try:
                    attempt = login_throttle.reserve(agent.username, address)
                except LoginThrottled as exc:
                    raise HTTPException(
                        429, str(exc), headers={"Retry-After": str(int(exc.retry_after) + 1)}
                    ) from exc
                try:
                    matches = await agents.password_matches(
                        conn, agent.id, body.current_password or ""
                    )
                except agents.HashingBusy:
                    login_throttle.cancel(attempt)  # never judged
                    raise
                if not matches:
                    raise HTTPException(403, "the current password is wrong")
                login_throttle.succeeded(attempt)
            ended = await agents.set_password(conn, agent_id, body.password)
        except agents.HashingBusy as exc:
            raise HTTPException(
                503, str(exc), headers={"Retry-After": str(exc.retry_after)}
            ) from exc
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except agents.WeakPassword as exc:
            raise HTTPException(422, str(exc)) from exc
    return PasswordChanged(agent_id=agent_id, sessions_ended=ended)
