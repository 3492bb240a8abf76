"""The agents' JSON API for tickets: queues, a ticket with its history, replies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from ticketing import replies, views
from workers.web.api.auth import CurrentAgent, Idempotent, require, runtime

router = APIRouter(prefix="/api")


class TicketSummary(BaseModel):
    id: int
    caller_id: int
    caller_name: str | None
    subject: str
    status: Literal["open", "pending", "closed"]
    tier: Literal["agent", "support", "management"]
    close_reason: str | None
    channel: str
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    first_response_due: datetime | None
    resolution_due: datetime | None
    overdue: bool
    assignee_id: int | None = None
    assignee: str | None = None  # the assigned agent's username


class TicketList(BaseModel):
    total: int
    limit: int
    offset: int
    tickets: list[TicketSummary]


@router.get(
    "/tickets", response_model=TicketList, tags=["tickets"], dependencies=[require("tickets.read")]
)
async def list_tickets(
    request: Request,
    agent: CurrentAgent,
    status: Literal["open", "pending", "closed"] | None = None,
    tier: Literal["agent", "support", "management"] | None = None,
    channel: str | None = None,
    caller_id: int | None = None,
    overdue: bool | None = None,
    assignee: Annotated[str | None, Query(pattern=r"^(me|none|[0-9]{1,18})$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> TicketList:
    """The queue: tickets filtered by status, tier, channel, caller, overdue and assignee
    (`me`, `none` or an agent id); most urgent first."""
    async with runtime(request).pool.acquire() as conn:
        total, rows = await views.ticket_list(
            conn, status=status, tier=tier, channel=channel, caller_id=caller_id, overdue=overdue,
            assignee=(agent.id if assignee == "me" else assignee if assignee in (None, "none")
                      else int(assignee)),
            limit=limit, offset=offset,
        )  # fmt: skip
    return TicketList(
        total=total, limit=limit, offset=offset, tickets=[TicketSummary(**r) for r in rows]
    )


class Attachment(BaseModel):
    id: int
    filename: str
    content_type: str
    size: int
    sha256: str
    dropped: str | None


class Message(BaseModel):
    id: int
    direction: Literal["in", "out"]
    channel: str
    account: str
    sender: str
    recipient: str | None
    subject: str | None
    body_text: str
    body_display: str
    body_html: str | None
    external_id: str | None
    status: str
    status_reason: str | None
    auto_reply: bool
    problems: list[str]
    trace_id: str | None
    created_at: datetime
    sent_at: datetime | None
    attachments: list[Attachment] = []


class Event(BaseModel):
    id: int
    at: datetime
    actor: str
    kind: str
    from_status: str | None
    to_status: str | None
    from_tier: str | None
    to_tier: str | None
    note: str | None
    data: dict[str, Any]


class TicketDetail(TicketSummary):
    solution: str | None
    linked_ticket_id: int | None
    closed_at: datetime | None
    messages: list[Message]
    events: list[Event]


async def load_ticket(conn: Any, ticket_id: int) -> TicketDetail:
    row = await views.ticket(conn, ticket_id)
    if row is None:
        raise HTTPException(404, f"ticket {ticket_id} does not exist")
    return TicketDetail(
        **row,
        messages=await views.messages(conn, ticket_id),
        events=await views.events(conn, ticket_id),
    )


@router.get(
    "/tickets/{ticket_id}", response_model=TicketDetail, tags=["tickets"],
    dependencies=[require("tickets.read")],
)  # fmt: skip
async def get_ticket(ticket_id: int, request: Request, agent: CurrentAgent) -> TicketDetail:
    """One ticket with all its messages (in and out, with delivery status) and its event log."""
    async with runtime(request).pool.acquire() as conn:
        return await load_ticket(conn, ticket_id)


class ReplyRequest(BaseModel):
    body: str = Field(min_length=1, max_length=100_000)
    channel: str | None = Field(
        default=None, description="send on this channel instead of the one the caller used"
    )


@router.post(
    "/tickets/{ticket_id}/replies", response_model=Message, status_code=201, tags=["tickets"],
    dependencies=[require("tickets.reply")],
)  # fmt: skip
async def post_reply(
    ticket_id: int, body: ReplyRequest, request: Request, agent: CurrentAgent, once: Idempotent
) -> Response:
    """Answer on the channel the person used; the reply is queued and its status tracked.

    With an `Idempotency-Key`, a repeat sends nothing again and answers the first reply.
    """
    rt = runtime(request)

    async def work(conn: Any) -> Message:
        try:
            message = await replies.create_reply(
                conn,
                ticket_id,
                body.body,
                agent_id=agent.id,
                actor=agent.username,
                accounts=rt.account_names(),
                channel=body.channel,
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except replies.ReplyError as exc:
            raise HTTPException(422, str(exc)) from exc
        return Message(**message)

    return await once.run(rt.pool, work, status_code=201)
