"""The ops view's JSON: pipeline summary with small series, message traces, and the shunt."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from ticketing import roles
from workers.ops.shunt import shunt_entries
from workers.ops.status import Status, collect_status, series
from workers.ops.trace import trace as trace_of
from workers.runtime.runtime import Runtime
from workers.web.api.auth import CurrentAgent, require

router = APIRouter(prefix="/api/ops", tags=["ops"])

# The console polls the summary; keep a sample for rates and the lag series at most this often.
SAMPLE_SECONDS = 10.0


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def snapshot(rt: Runtime) -> tuple[Status, dict[str, Any] | None]:
    """What `loket status` collects, and the last hour per minute when the database answers."""
    status = await collect_status(
        rt.bootstrap, rt.pool, stall_seconds=rt.settings.stall_seconds,
        sample_interval=SAMPLE_SECONDS,
    )  # fmt: skip
    if status.database is not None:
        return status, None
    async with rt.pool.acquire() as conn:
        return status, await series(conn)


@router.get("/summary", dependencies=[require("ops.read")])
async def summary(request: Request, agent: CurrentAgent) -> dict[str, Any]:
    """Per-stage lag and rate, shunt count, outbox backlog, channel health, and the last hour per minute."""
    status, history = await snapshot(_runtime(request))
    document = status.as_json()
    if history is not None:
        document["series"] = history
    return document


@router.get("/trace/{ident}", dependencies=[require("ops.read")])
async def trace(ident: str, request: Request, agent: CurrentAgent) -> dict[str, Any]:
    """The path of a message, by trace id or message id; 404 when nothing carries that id.

    A shunted hop names the stage's error only for a role that may read the shunt.
    """
    rt = _runtime(request)
    errors = roles.allows(agent.role, "ops.shunt")
    async with rt.pool.acquire() as conn:
        entries = await shunt_entries(rt.bootstrap, conn)
        found = await trace_of(conn, ident, entries, shunt_errors=errors)
    if not found.hops:
        raise HTTPException(404, f"no stored message and no shunted record carries {ident}")
    return found.as_json()


@router.get("/shunt", dependencies=[require("ops.shunt")])
async def shunt(request: Request, agent: CurrentAgent) -> list[dict[str, Any]]:
    """Shunted records (stage, source, error, when, replayed), oldest first."""
    rt = _runtime(request)
    async with rt.pool.acquire() as conn:
        entries = await shunt_entries(rt.bootstrap, conn)
    return [entry.summary() for entry in entries]
