"""The help-desk procedure over HTTP: caller look-up and registration, logged calls, transitions, the open report.

Who may take which step is the role matrix's (ticketing/roles.py): each route names its permission.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from channels.types import CHANNELS, IDENTITY_KINDS, Identity
from ticketing import procedure, views
from ticketing.callers import IdentityTaken
from ticketing.states import TransitionError
from workers.web.api.auth import CurrentAgent, Idempotent, ensure_allowed, require, runtime
from workers.web.api.tickets import TicketDetail, load_ticket

router = APIRouter(prefix="/api")

# The channels and identity kinds of channels.types, as the API's schema lists them.
Channel = Literal[CHANNELS]  # type: ignore[valid-type]
IdentityKind = Literal[IDENTITY_KINDS]  # type: ignore[valid-type]


# --- models --------------------------------------------------------------------------------


class IdentityOut(BaseModel):
    id: int
    kind: str
    value: str
    display: str | None
    valid: bool


class CallerTicket(BaseModel):
    id: int
    status: str
    tier: str
    close_reason: str | None
    subject: str
    channel: str
    created_at: datetime
    updated_at: datetime


class Caller(BaseModel):
    id: int
    name: str | None
    organization: str | None
    organization_code: str | None
    region: str | None
    notes: str | None
    created_at: datetime
    updated_at: datetime
    identities: list[IdentityOut]
    tickets: list[CallerTicket]


class CallerEvent(BaseModel):
    id: int
    at: datetime
    actor: str
    kind: str
    note: str | None
    data: dict[str, Any]


class CallerDetail(Caller):
    merged_from: int | None = Field(
        description="the id asked for, when it was merged into this caller"
    )
    merged_ids: list[int] = Field(description="every caller id merged into this one")
    events: list[CallerEvent]


class Duplicate(Caller):
    reasons: list[str]


class IdentityIn(BaseModel):
    kind: IdentityKind
    value: str = Field(min_length=1, max_length=320)


class CallerIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    organization: str | None = Field(default=None, max_length=300)
    organization_code: str | None = Field(default=None, max_length=100)
    region: str | None = Field(default=None, max_length=200)
    notes: str | None = Field(default=None, max_length=10_000)
    phone: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=320)
    identities: list[IdentityIn] = Field(default_factory=list, max_length=20)


class MergeIn(BaseModel):
    into: int = Field(description="the caller that survives")
    note: str | None = Field(default=None, max_length=2000)


class TicketIn(BaseModel):
    caller_id: int
    channel: Channel = "phone"
    subject: str = Field(default="", max_length=200)
    body: str = Field(min_length=1, max_length=100_000)


class TransitionIn(BaseModel):
    action: Literal["pend", "resume", "escalate", "close", "reopen"]
    note: str | None = Field(default=None, max_length=10_000)
    solution: str | None = Field(default=None, max_length=100_000)
    reason: Literal["resolved", "withdrawn", "duplicate", "spam"] | None = None


class ReportTicket(BaseModel):
    id: int
    caller_id: int
    caller_name: str | None
    subject: str
    channel: str
    status: str
    tier: str
    created_at: datetime
    last_activity_at: datetime
    first_response_due: datetime | None
    resolution_due: datetime | None
    age_seconds: int
    idle_seconds: int
    overdue: bool
    overdue_seconds: int | None


class ReportGroup(BaseModel):
    tier: str
    status: str
    count: int
    tickets: list[ReportTicket]


class OpenReport(BaseModel):
    generated_at: datetime
    total: int
    overdue: int
    groups: list[ReportGroup]
    stuck_pending: list[ReportTicket] = Field(
        description="pending at support or management beyond the resolution deadline"
    )


# --- helpers -------------------------------------------------------------------------------


def _identity(kind: str, value: str) -> Identity:
    try:
        return procedure.identity_from_input(kind, value)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


async def _taken(conn: asyncpg.Connection, exc: IdentityTaken) -> HTTPException:
    """409 naming who holds the identity, so the agent can open that caller instead."""
    name = await views.caller_name(conn, exc.caller_id)
    return HTTPException(
        409,
        {
            "message": f"{exc.identity.kind} {exc.identity.value} already belongs to caller"
            f" {exc.caller_id} ({name or 'no name'})",
            "identity": {"kind": exc.identity.kind, "value": exc.identity.value},
            "caller": {"id": exc.caller_id, "name": name},
        },
    )


def _report_ticket(ticket: procedure.OpenTicket) -> ReportTicket:
    fields = asdict(ticket)
    age, idle, overdue_by = fields.pop("age"), fields.pop("idle"), fields.pop("overdue_by")
    return ReportTicket(
        **fields,
        age_seconds=int(age.total_seconds()),
        idle_seconds=int(idle.total_seconds()),
        overdue_seconds=int(overdue_by.total_seconds()) if overdue_by is not None else None,
    )


def report_model(report: procedure.OpenReport) -> OpenReport:
    return OpenReport(
        generated_at=report.generated_at,
        total=report.total,
        overdue=report.overdue,
        groups=[
            ReportGroup(
                tier=g.tier,
                status=g.status,
                count=len(g.tickets),
                tickets=[_report_ticket(t) for t in g.tickets],
            )
            for g in report.groups
        ],
        stuck_pending=[_report_ticket(t) for t in report.stuck_pending],
    )


# --- callers -------------------------------------------------------------------------------


@router.get(
    "/callers", response_model=list[Caller], tags=["callers"],
    dependencies=[require("callers.read")],
)  # fmt: skip
async def search_callers(
    request: Request,
    agent: CurrentAgent,
    phone: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    email: Annotated[str | None, Query(min_length=1, max_length=320)] = None,
    q: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = procedure.SEARCH_LIMIT,
) -> list[Caller]:
    """Find callers by a phone or fax number in any typed form, an e-mail address, or free text."""
    if phone is None and email is None and q is None:
        raise HTTPException(422, "give phone, email or q")
    async with runtime(request).pool.acquire() as conn:
        callers = await procedure.search_callers(conn, phone=phone, email=email, q=q, limit=limit)
    return [Caller(**c) for c in callers]


@router.post(
    "/callers", response_model=CallerDetail, status_code=201, tags=["callers"],
    dependencies=[require("callers.write")],
)  # fmt: skip
async def register_caller(
    body: CallerIn, request: Request, agent: CurrentAgent, once: Idempotent
) -> Response:
    """Register a caller with their identities; 409 naming the holder when one is taken."""
    identities = [_identity(i.kind, i.value) for i in body.identities]
    if body.phone:
        identities.insert(0, _identity("phone", body.phone))
    if body.email:
        identities.insert(0, _identity("email", body.email))
    fields = procedure.CallerFields(
        name=body.name.strip(),
        organization=body.organization,
        organization_code=body.organization_code,
        region=body.region,
        notes=body.notes,
    )

    async def work(conn: asyncpg.Connection) -> CallerDetail:
        try:
            caller_id = await procedure.register_caller(
                conn, fields, identities, actor=agent.username, agent_id=agent.id
            )
        except IdentityTaken as exc:
            raise await _taken(conn, exc) from exc
        return CallerDetail(**await procedure.caller_detail(conn, caller_id))

    return await once.run(runtime(request).pool, work, status_code=201)


@router.get(
    "/callers/{caller_id}", response_model=CallerDetail, tags=["callers"],
    dependencies=[require("callers.read")],
)  # fmt: skip
async def get_caller(caller_id: int, request: Request, agent: CurrentAgent) -> CallerDetail:
    """One caller with identities, tickets and history; a merged id answers with its survivor."""
    async with runtime(request).pool.acquire() as conn:
        try:
            return CallerDetail(**await procedure.caller_detail(conn, caller_id))
        except procedure.CallerNotFound as exc:
            raise HTTPException(404, str(exc)) from exc


@router.post(
    "/callers/{caller_id}/identities",
    response_model=CallerDetail,
    status_code=201,
    tags=["callers"],
    dependencies=[require("callers.write")],
)
async def add_identity(
    caller_id: int, body: IdentityIn, request: Request, agent: CurrentAgent
) -> CallerDetail:
    """Give a caller another phone, fax, address or platform id; 409 when someone else has it."""
    identity = _identity(body.kind, body.value)
    async with runtime(request).pool.acquire() as conn, conn.transaction():
        try:
            survivor_id = await procedure.add_identity(
                conn, caller_id, identity, actor=agent.username, agent_id=agent.id
            )
        except procedure.CallerNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except IdentityTaken as exc:
            raise await _taken(conn, exc) from exc
        return CallerDetail(**await procedure.caller_detail(conn, survivor_id))


@router.delete(
    "/callers/{caller_id}/identities/{identity_id}", response_model=CallerDetail, tags=["callers"],
    dependencies=[require("callers.remove_identity")],
)  # fmt: skip
async def remove_identity(
    caller_id: int, identity_id: int, request: Request, agent: CurrentAgent
) -> CallerDetail:
    """Take a wrong or outdated identity away from a caller."""
    async with runtime(request).pool.acquire() as conn, conn.transaction():
        try:
            survivor_id = await procedure.remove_identity(
                conn, caller_id, identity_id, actor=agent.username, agent_id=agent.id
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        return CallerDetail(**await procedure.caller_detail(conn, survivor_id))


@router.post(
    "/callers/{caller_id}/merge", response_model=CallerDetail, tags=["callers"],
    dependencies=[require("callers.merge")],
)  # fmt: skip
async def merge_caller(
    caller_id: int, body: MergeIn, request: Request, agent: CurrentAgent
) -> CallerDetail:
    """Merge this caller into `into`: identities, tickets and history move; this id then redirects."""
    async with runtime(request).pool.acquire() as conn:
        try:
            async with conn.transaction():
                await procedure.merge_callers(
                    conn, caller_id, body.into, actor=agent.username, agent_id=agent.id,
                    note=body.note,
                )  # fmt: skip
        except procedure.CallerNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except procedure.CallerConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        return CallerDetail(**await procedure.caller_detail(conn, caller_id))


@router.get(
    "/callers/{caller_id}/duplicates", response_model=list[Duplicate], tags=["callers"],
    dependencies=[require("callers.read")],
)  # fmt: skip
async def duplicates(caller_id: int, request: Request, agent: CurrentAgent) -> list[Duplicate]:
    """Callers who may be the same person (same name, or same organization and a similar name)."""
    async with runtime(request).pool.acquire() as conn:
        try:
            found = await procedure.find_duplicates(conn, caller_id)
        except procedure.CallerNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
    return [Duplicate(**d) for d in found]


# --- tickets -------------------------------------------------------------------------------


@router.post(
    "/tickets", response_model=TicketDetail, status_code=201, tags=["tickets"],
    dependencies=[require("tickets.create")],
)  # fmt: skip
async def log_contact(
    body: TicketIn, request: Request, agent: CurrentAgent, once: Idempotent
) -> Response:
    """Open a ticket for a call or visit: the problem as told is its first inbound message."""
    rt = runtime(request)

    async def work(conn: asyncpg.Connection) -> TicketDetail:
        try:
            ticket_id = await procedure.log_contact(
                conn, caller_id=body.caller_id, channel=body.channel, subject=body.subject,
                body=body.body, actor=agent.username, agent_id=agent.id, rules=rt.rules,
            )  # fmt: skip
        except procedure.CallerNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        return await load_ticket(conn, ticket_id)

    return await once.run(rt.pool, work, status_code=201)


@router.post(
    "/tickets/{ticket_id}/transitions", response_model=TicketDetail, tags=["tickets"],
    dependencies=[require("tickets.transition")],
)  # fmt: skip
async def transition(
    ticket_id: int, body: TransitionIn, request: Request, agent: CurrentAgent, once: Idempotent
) -> Response:
    """pend, resume, escalate, close (with a reason; resolved needs the solution) or reopen.

    409 with the reason when the procedure does not allow the action from the ticket's state.
    """
    if body.action == "close" and body.reason == "spam":
        ensure_allowed(agent, "tickets.close_spam")
    rt = runtime(request)

    async def work(conn: asyncpg.Connection) -> TicketDetail:
        try:
            await procedure.transition(
                conn, ticket_id, body.action, actor=agent.username, agent_id=agent.id,
                rules=rt.rules, note=body.note, solution=body.solution, reason=body.reason,
            )  # fmt: skip
        except procedure.TicketNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except TransitionError as exc:
            raise HTTPException(409, exc.message) from exc
        return await load_ticket(conn, ticket_id)

    return await once.run(rt.pool, work)


class AssigneeIn(BaseModel):
    agent_id: int | None = Field(description="the agent who takes the ticket; null for nobody")


@router.post(
    "/tickets/{ticket_id}/assignee", response_model=TicketDetail, tags=["tickets"],
    dependencies=[require("tickets.assign")],
)  # fmt: skip
async def assign(
    ticket_id: int, body: AssigneeIn, request: Request, agent: CurrentAgent
) -> TicketDetail:
    """Give the ticket to an agent (yourself to take it), or to nobody; recorded as an event."""
    rt = runtime(request)
    async with rt.pool.acquire() as conn:
        try:
            async with conn.transaction():
                await procedure.assign(
                    conn, ticket_id, body.agent_id, actor=agent.username, agent_id=agent.id
                )
        except procedure.TicketNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except procedure.AgentNotFound as exc:
            raise HTTPException(422, str(exc)) from exc
        return await load_ticket(conn, ticket_id)


# --- reports -------------------------------------------------------------------------------


@router.get(
    "/reports/open", response_model=OpenReport, tags=["reports"],
    dependencies=[require("reports.read")],
)  # fmt: skip
async def open_report(request: Request, agent: CurrentAgent) -> OpenReport:
    """Nothing missed: every ticket not closed by tier and status, oldest first, and the ones
    pending at support or management beyond their deadline."""
    async with runtime(request).pool.acquire() as conn:
        report = await procedure.open_report(conn)
    return report_model(report)
