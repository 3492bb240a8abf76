"""A ticket: its timeline, replies, notes, transitions, assignment, attachments."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any

import asyncpg
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    Response,
)

from channels.types import OUTBOUND_CHANNELS
from ticketing import procedure, replies, roles, views
from ticketing.states import CLOSE_REASONS, TransitionError
from workers.web import idempotency
from workers.web.console.common import (
    SAFE_INLINE_IMAGES,
    TIMELINE_LIMIT,
    form_field,
    has_route,
    login_required,
    read_form,
    redirect_to,
    render,
    runtime_of,
    session_agent,
    translator_of,
)

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


# --- tickets -------------------------------------------------------------------------------


async def _timeline(conn: asyncpg.Connection, ticket: dict[str, Any]) -> list[dict[str, Any]]:
    """The caller's messages on every ticket and channel, and this ticket's own events, in order."""
    messages = await views.caller_messages(conn, ticket["caller_id"], TIMELINE_LIMIT)
    for message in messages:
        message["kind"] = "message"
        message["at"] = message["received_at"] or message["created_at"]
    events = [
        {**event, "event_kind": event["kind"], "kind": "event"}
        for event in await views.events(conn, ticket["id"], without=views.MESSAGE_EVENT_KINDS)
    ]
    return sorted(
        messages + events, key=lambda item: (item["at"], item["kind"] == "event", item["id"])
    )


async def _ticket_context(
    request: Request, ticket_id: int, reply_to: int | None = None
) -> dict[str, Any] | None:
    async with runtime_of(request).pool.acquire() as conn:
        ticket = await views.ticket(conn, ticket_id)
        if ticket is None:
            return None
        agents_list = await views.active_agents(conn)
        timeline = await _timeline(conn, ticket)
        identities = await views.identities(conn, ticket["caller_id"])
    inbound = [m for m in timeline if m["kind"] == "message" and m["direction"] == "in"
               and m["ticket_id"] == ticket_id and not m["auto_reply"]]  # fmt: skip
    reply_channels = list(
        dict.fromkeys(m["channel"] for m in reversed(inbound) if m["channel"] in OUTBOUND_CHANNELS)
    )
    answered = next((m for m in inbound if m["id"] == reply_to), None)
    default_channel = (answered or (inbound[-1] if inbound else {})).get("channel") or "phone"
    if default_channel not in reply_channels and default_channel not in ("phone", "walk_in"):
        reply_channels.insert(0, default_channel)
    choices = [*reply_channels, *[c for c in ("phone",) if c not in reply_channels]]
    kb_query = ticket["subject"] if has_route(request, "/api/kb") else None
    return {
        "ticket": ticket, "timeline": timeline, "identities": identities, "agents": agents_list,
        "reply_channels": choices, "reply_channel": default_channel, "close_reasons": CLOSE_REASONS,
        "kb_url": "/api/kb?" + urllib.parse.urlencode({"q": kb_query}) if kb_query else None,
        "error": None, "draft": "",
    }  # fmt: skip


@router.get("/tickets/{ticket_id}", response_class=HTMLResponse)
async def ticket_page(
    request: Request, ticket_id: int, reply_to: int | None = None
) -> HTMLResponse:
    agent = await login_required(request, "tickets.read")
    context = await _ticket_context(request, ticket_id, reply_to)
    if context is None:
        return render(request, "error.html", {"message": translator_of(request)("error.no_ticket")},
                       status=404, agent=agent)  # fmt: skip
    return render(request, "ticket.html", context, agent=agent)


async def _ticket_error(
    request: Request,
    agent: dict[str, Any],
    ticket_id: int,
    error: str,
    status: int,
    draft: str = "",
) -> HTMLResponse:
    context = await _ticket_context(request, ticket_id)
    if context is None:
        return render(request, "error.html", {"message": translator_of(request)("error.no_ticket")},
                       status=404, agent=agent)  # fmt: skip
    return render(
        request,
        "ticket.html",
        {**context, "error": error, "draft": draft},
        status=status,
        agent=agent,
    )


@router.post("/tickets/{ticket_id}/reply", response_class=HTMLResponse)
async def ticket_reply(request: Request, ticket_id: int) -> Response:
    """Answer on the channel of the message being answered, through the API's own function."""
    agent = await login_required(request, "tickets.reply")
    form = await read_form(request)
    body = form_field(form, "body", 100_000)
    channel = form_field(form, "channel", 20) or None
    if not body:
        return await _ticket_error(
            request, agent, ticket_id, translator_of(request)("reply.empty"), 422
        )
    rt = runtime_of(request)
    once = idempotency.from_form(request, agent["id"], form)

    async def work(conn: asyncpg.Connection) -> Response:
        await replies.create_reply(
            conn, ticket_id, body, agent_id=agent["id"], actor=agent["username"],
            accounts=rt.account_names(), channel=channel,
        )  # fmt: skip
        return redirect_to(f"/tickets/{ticket_id}#reply")

    try:
        return await once.run(rt.pool, work)
    except LookupError:
        return await _ticket_error(
            request, agent, ticket_id, translator_of(request)("error.no_ticket"), 404
        )
    except replies.ReplyError as exc:
        return await _ticket_error(request, agent, ticket_id, str(exc), 422, draft=body)
    except idempotency.KeyRefused as exc:
        message = idempotency.console_message(exc, translator_of(request).lang)
        return await _ticket_error(request, agent, ticket_id, message, exc.status_code, draft=body)


@router.post("/tickets/{ticket_id}/notes", response_class=HTMLResponse)
async def ticket_note(request: Request, ticket_id: int) -> Response:
    """An internal note: on the ticket's event log, never sent to the caller."""
    agent = await login_required(request, "tickets.note")
    form = await read_form(request)
    note = form_field(form, "note", 10_000)
    if not note:
        return await _ticket_error(
            request, agent, ticket_id, translator_of(request)("note.empty"), 422
        )
    async with runtime_of(request).pool.acquire() as conn:
        inserted = await procedure.add_note(conn, ticket_id, agent["id"], agent["username"], note)
    if inserted is None:
        return await _ticket_error(
            request, agent, ticket_id, translator_of(request)("error.no_ticket"), 404
        )
    return redirect_to(f"/tickets/{ticket_id}#notes")


@router.post("/tickets/{ticket_id}/transition", response_class=HTMLResponse)
async def ticket_transition(request: Request, ticket_id: int) -> Response:
    """pend, resume, escalate, close (reason; resolved needs the solution) or reopen."""
    agent = await login_required(request, "tickets.transition")
    form = await read_form(request)
    action = form_field(form, "action", 20)
    reason = form_field(form, "reason", 20) if action == "close" else ""
    solution = form_field(form, "solution", 100_000) if action == "close" else ""
    if reason == "spam" and not roles.allows(agent["role"], "tickets.close_spam"):
        return await _ticket_error(
            request, agent, ticket_id, roles.refusal("tickets.close_spam"), 403
        )
    rt = runtime_of(request)
    once = idempotency.from_form(request, agent["id"], form)

    async def work(conn: asyncpg.Connection) -> Response:
        await procedure.transition(
            conn, ticket_id, action, actor=agent["username"], agent_id=agent["id"],
            rules=rt.rules, note=form_field(form, "note", 10_000) or None,
            solution=solution or None, reason=reason or None,
        )  # fmt: skip
        return redirect_to(f"/tickets/{ticket_id}")

    try:
        return await once.run(rt.pool, work)
    except procedure.TicketNotFound:
        return await _ticket_error(
            request, agent, ticket_id, translator_of(request)("error.no_ticket"), 404
        )
    except TransitionError as exc:
        return await _ticket_error(request, agent, ticket_id, exc.message, 409)
    except idempotency.KeyRefused as exc:
        message = idempotency.console_message(exc, translator_of(request).lang)
        return await _ticket_error(request, agent, ticket_id, message, exc.status_code)


@router.post("/tickets/{ticket_id}/assign", response_class=HTMLResponse)
async def ticket_assign(request: Request, ticket_id: int) -> Response:
    """Give the ticket to an agent: `me`, an agent id, or empty for nobody."""
    agent = await login_required(request, "tickets.assign")
    form = await read_form(request)
    choice = form_field(form, "agent_id", 20)
    t = translator_of(request)
    if choice == "me":
        assignee: int | None = agent["id"]
    elif choice.isdigit():
        assignee = int(choice)
    elif not choice:
        assignee = None
    else:
        return await _ticket_error(request, agent, ticket_id, t("error.no_agent"), 422)
    async with runtime_of(request).pool.acquire() as conn:
        try:
            async with conn.transaction():
                await procedure.assign(
                    conn, ticket_id, assignee, actor=agent["username"], agent_id=agent["id"]
                )
        except procedure.TicketNotFound:
            return await _ticket_error(request, agent, ticket_id, t("error.no_ticket"), 404)
        except procedure.AgentNotFound:
            return await _ticket_error(request, agent, ticket_id, t("error.no_agent"), 422)
    return redirect_to(f"/tickets/{ticket_id}")


# --- attachments ---------------------------------------------------------------------------


def sniff_image(data: bytes) -> str | None:
    """A raster image type recognized by its first bytes (never SVG, which can carry script)."""
    for magic, content_type in SAFE_INLINE_IMAGES.items():
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _disposition(kind: str, filename: str) -> str:
    ascii_name = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename
    )
    quoted = urllib.parse.quote(filename, safe="")
    return f"{kind}; filename=\"{ascii_name or 'attachment'}\"; filename*=UTF-8''{quoted}"


@router.get("/attachments/{attachment_id}")
async def attachment(request: Request, attachment_id: int, inline: int = 0) -> Response:
    """An attachment as a download; raster images recognized by their bytes may be shown inline."""
    await session_agent(request, "tickets.read")
    rt = runtime_of(request)
    async with rt.pool.acquire() as conn:
        row = await views.attachment(conn, attachment_id)
    if row is None or row["dropped"] or not row["sha256"]:
        raise HTTPException(404, "no such attachment, or it was not kept")
    try:
        data = await asyncio.to_thread(rt.blobs.get, row["sha256"])
    except (FileNotFoundError, ValueError) as exc:
        raise HTTPException(404, "the attachment's content is missing from the blob store") from exc
    image = sniff_image(data)
    show_inline = bool(inline) and image is not None
    return Response(
        data,
        media_type=image if show_inline else "application/octet-stream",
        headers={
            "Content-Disposition": _disposition(
                "inline" if show_inline else "attachment", row["filename"]
            ),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-store",
        },
    )
