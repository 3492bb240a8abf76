"""Idempotency-Key on the POSTs that create: a repeated request answers what the first one did.

One piece for the API and the console. `Idempotency.run(pool, work)` runs `work(conn)` in one
transaction that first claims the agent's key (ticketing/idempotency.py), then does the work
and records the response, and commits all of it together:

- same key, same request (method, path, canonical JSON body) within 24 h: the first response
  again, status and body byte for byte, with `Idempotent-Replayed: true`; nothing is done;
- same key, another request: 409 saying so;
- a request with the key still running: the insert of the claim waits on its uncommitted row,
  so exactly one request does the work and the others answer its result. A wait longer than
  `WAIT_SECONDS` answers 409 "in progress" with Retry-After (see `WAIT_SECONDS` for why);
- no key: the work runs in a transaction as it always did.

A refusal the work raises as an HTTPException below 500 (404, 409, 422) undoes the work and is
recorded as the answer, like a success; anything else (a bug, the database gone) rolls the
claim back too, so a retry with the key does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import Depends, Header, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import FormData

from ticketing import idempotency as store

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
FORM_FIELD = "idempotency_key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_MAX_LENGTH = 255
_KEY = re.compile(rf"[A-Za-z0-9._~:+/=-]{{1,{KEY_MAX_LENGTH}}}")
KEY_RULES = (
    f"1 to {KEY_MAX_LENGTH} characters of A-Z, a-z, 0-9 and . _ ~ : + / = -"
    " (a UUID, say; an RFC 8941 string in double quotes is accepted too)"
)
# How long a request waits for another one holding its key. The work behind these POSTs is
# one short database transaction (milliseconds), so a retry of a request still running
# normally gets the real answer by waiting, which is what a client retrying after a
# timeout wants. Each waiting request holds a database connection, so the wait is bounded:
# past it something is stuck, and 409 "in progress" with Retry-After frees the connection.
WAIT_SECONDS = 5.0
RETRY_AFTER_SECONDS = 2
PRUNE_INTERVAL_SECONDS = 600.0
# Response headers worth replaying: what a client reads, never a cookie.
_REPLAYED = ("content-type", "location", "retry-after")

Work = Callable[[asyncpg.Connection], Awaitable[Any]]


class KeyRefused(HTTPException):
    """409: the key cannot be used for this request now."""


class KeyReused(KeyRefused):
    """The key was used for another request (another method, path or body)."""


class KeyBusy(KeyRefused):
    """A request with the key is still running."""


def parse_key(values: list[str]) -> str | None:
    """The key given, or None when none was; 400 when it is malformed or given twice."""
    if not values:
        return None
    if len(values) > 1:
        raise HTTPException(400, f"give one {HEADER}, not {len(values)}")
    value = values[0].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not _KEY.fullmatch(value):
        raise HTTPException(400, f"{HEADER} must be {KEY_RULES}")
    return value


def fingerprint(method: str, path: str, payload: Any) -> bytes:
    """sha256 of method, path and the canonical JSON (sorted keys, no spaces) of the body."""
    try:
        canonical = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (TypeError, ValueError, RecursionError):
        canonical = repr(payload).encode()
    return hashlib.sha256(f"{method.upper()} {path}\n".encode() + canonical).digest()


def _json_body(raw: bytes) -> Any:
    """The parsed body, so that spacing and key order do not make another request."""
    try:
        return json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):
        return {"raw": hashlib.sha256(raw).hexdigest()}


def new_form_key() -> str:
    """A fresh key for one rendering of a console form."""
    return secrets.token_urlsafe(18)


def _response(result: Any, status_code: int) -> Response:
    if isinstance(result, Response):
        return result
    return JSONResponse(jsonable_encoder(result), status_code=status_code)


def _refusal(exc: HTTPException) -> Response:
    """An HTTPException as FastAPI's own handler would send it."""
    if exc.status_code < 200 or exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@dataclass(frozen=True)
class Idempotency:
    """One request's key (None without one), scoped to its agent, and its fingerprint."""

    agent_id: int
    key: str | None
    method: str
    path: str
    fingerprint: bytes

    async def run(self, pool: asyncpg.Pool, work: Work, *, status_code: int = 200) -> Response:
        """`work(conn)` in a transaction, at most once per key; its result as a Response.

        `work` returns a Response or something JSON-encodable (answered with `status_code`).
        """
        if self.key is None:
            async with pool.acquire() as conn, conn.transaction():
                return _response(await work(conn), status_code)
        try:
            async with pool.acquire() as conn, conn.transaction():
                stored = await store.claim(
                    conn, self.agent_id, self.key, self.fingerprint, self.method, self.path,
                    wait=WAIT_SECONDS,
                )  # fmt: skip
                if stored is not None:
                    return self._replay(stored)
                try:
                    async with conn.transaction():  # a savepoint: a refusal undoes the work only
                        response = _response(await work(conn), status_code)
                except HTTPException as exc:
                    if exc.status_code >= 500:
                        raise
                    response = _refusal(exc)
                headers = {k: v for k, v in response.headers.items() if k in _REPLAYED}
                await store.record(
                    conn,
                    self.agent_id,
                    self.key,
                    response.status_code,
                    headers,
                    bytes(response.body),
                )
                return response
        except store.StillRunning as exc:
            raise KeyBusy(
                409,
                f"a request with this {HEADER} is still in progress; retry later with the same key",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc

    def _replay(self, stored: store.Stored) -> Response:
        if stored.fingerprint != self.fingerprint:
            raise KeyReused(
                409,
                f"this {HEADER} was already used for another request ({stored.method}"
                f" {stored.path} with other content) within the last 24 hours; use a new key",
            )
        if stored.status is None:  # never committed without its response; be safe anyway
            raise store.StillRunning(self.key)
        headers = {**stored.headers, REPLAYED_HEADER: "true"}
        return Response(stored.body, status_code=stored.status, headers=headers)


def for_api(agent_dependency: Callable[..., Any]) -> Callable[..., Awaitable[Idempotency]]:
    """The FastAPI dependency for an API route, after `agent_dependency` (the logged-in agent).

    Taking the agent dependency as an argument keeps this module free of workers.web.api.auth,
    which uses it; FastAPI runs the agent dependency once per request however many ask for it.
    """

    # Defaults, not Annotated: with postponed annotations FastAPI would look for
    # `agent_dependency` among the module's globals.
    async def idempotency_key(
        request: Request,
        agent: Any = Depends(agent_dependency),  # noqa: B008 - FastAPI's way
        key: str | None = Header(  # noqa: B008
            default=None,
            alias=HEADER,
            description="Do the request at most once: a repeat with the same key and body"
            " within 24 h answers the first response again, another body with the key"
            f" answers 409. The key is {KEY_RULES}; keys are per agent.",
        ),
    ) -> Idempotency:
        given = parse_key(request.headers.getlist(HEADER)) if key is not None else None
        path = request.url.path
        body = _json_body(await request.body()) if given is not None else None
        return Idempotency(
            agent_id=int(agent.id), key=given, method=request.method, path=path,
            fingerprint=fingerprint(request.method, path, body),
        )  # fmt: skip

    return idempotency_key


def from_form(request: Request, agent_id: int, form: FormData) -> Idempotency:
    """The key of a console form (its hidden field, or the header), over the form's fields.

    The CSRF token and the key itself are not part of what is compared.
    """
    values = request.headers.getlist(HEADER) or [
        v for v in form.getlist(FORM_FIELD) if isinstance(v, str) and v
    ]
    key = parse_key(values)
    payload = {
        name: [v if isinstance(v, str) else getattr(v, "filename", "") for v in form.getlist(name)]
        for name in sorted(set(form.keys()))
        if name not in ("csrf", FORM_FIELD)
    }
    path = request.url.path
    return Idempotency(
        agent_id=agent_id, key=key, method=request.method, path=path,
        fingerprint=fingerprint(request.method, path, payload),
    )  # fmt: skip


# What the console says when a form's key is refused (the console speaks id and en).
_CONSOLE_MESSAGES = {
    "id": {
        "reused": "Formulir ini sudah dikirim dengan isian lain. Muat ulang halaman, lalu coba lagi.",
        "busy": "Formulir ini masih diproses. Tunggu sebentar, lalu muat ulang halaman.",
    },
    "en": {
        "reused": "This form was already sent with other content. Reload the page and try again.",
        "busy": "This form is still being processed. Wait a moment, then reload the page.",
    },
}


def console_message(exc: KeyRefused, lang: str) -> str:
    """The console's words for a refused key (KeyReused or KeyBusy)."""
    messages = _CONSOLE_MESSAGES.get(lang, _CONSOLE_MESSAGES["id"])
    return messages["busy" if isinstance(exc, KeyBusy) else "reused"]


async def run_prune(
    pool: asyncpg.Pool, stop: asyncio.Event, *, interval: float = PRUNE_INTERVAL_SECONDS
) -> None:
    """Delete keys older than 24 h every `interval` seconds until `stop` (a scheduler task).

    Expired keys are already ignored by the claim; pruning only keeps the table small. Safe in
    several processes: a batch skips the rows another one holds.
    """
    while not stop.is_set():
        async with pool.acquire() as conn:
            removed = await store.prune(conn)
        if removed:
            log.info("pruned %d idempotency keys older than 24 hours", removed)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
