"""Callers: look-up, registration, the caller card, a logged call."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
    Response,
)

from ticketing import procedure
from ticketing.callers import IdentityTaken
from workers.web import idempotency
from workers.web.console.common import (
    form_field,
    login_required,
    read_form,
    redirect_to,
    render,
    runtime_of,
    translator_of,
)

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


# --- callers -------------------------------------------------------------------------------


@router.get("/callers", response_class=HTMLResponse)
async def caller_lookup(request: Request, phone: str = "", q: str = "") -> HTMLResponse:
    """Type a number in any form: the caller's card, or a registration form with it filled in."""
    agent = await login_required(request, "callers.read")
    phone, q = phone.strip()[:64], q.strip()[:200]
    found: list[dict[str, Any]] | None = None
    normalized = None
    if phone or q:
        async with runtime_of(request).pool.acquire() as conn:
            found = await procedure.search_callers(conn, phone=phone or None, q=q or None)
        if phone:
            with contextlib.suppress(ValueError):
                normalized = procedure.identity_from_input("phone", phone)
    context = {
        "phone": phone, "q": q, "found": found, "error": None,
        "normalized": normalized.display or normalized.value if normalized else None,
        "form": {"phone": phone, "name": "", "organization": "", "organization_code": "",
                 "region": "", "email": "", "notes": ""},
    }  # fmt: skip
    return render(request, "callers.html", context, agent=agent)


@router.post("/callers", response_class=HTMLResponse)
async def caller_register(request: Request) -> Response:
    agent = await login_required(request, "callers.write")
    form = await read_form(request)
    t = translator_of(request)
    values = {
        name: form_field(form, name, limit)
        for name, limit in (("name", 200), ("organization", 300), ("organization_code", 100),
                            ("region", 200), ("phone", 64), ("email", 320), ("notes", 10_000))
    }  # fmt: skip
    error = None
    status = 422
    if not values["name"]:
        error = t("register.need_name")
    else:
        try:
            identities = []
            if values["phone"]:
                identities.append(procedure.identity_from_input("phone", values["phone"]))
            if values["email"]:
                identities.append(procedure.identity_from_input("email", values["email"]))
        except ValueError as exc:
            error = str(exc)
        else:
            fields = procedure.CallerFields(
                name=values["name"], organization=values["organization"] or None,
                organization_code=values["organization_code"] or None,
                region=values["region"] or None, notes=values["notes"] or None,
            )  # fmt: skip
            once = idempotency.from_form(request, agent["id"], form)

            async def work(conn: asyncpg.Connection) -> Response:
                caller_id = await procedure.register_caller(
                    conn, fields, identities, actor=agent["username"], agent_id=agent["id"]
                )
                return redirect_to(f"/callers/{caller_id}")

            try:
                return await once.run(runtime_of(request).pool, work)
            except IdentityTaken as exc:
                error = t("register.taken", value=exc.identity.value, caller_id=exc.caller_id)
            except idempotency.KeyRefused as exc:
                error, status = idempotency.console_message(exc, t.lang), exc.status_code
    context: dict[str, Any] = {"phone": values["phone"], "q": "", "found": [], "error": error,
                               "normalized": None, "form": values}  # fmt: skip
    return render(request, "callers.html", context, status=status, agent=agent)


@router.get("/callers/{caller_id}", response_class=HTMLResponse)
async def caller_card(request: Request, caller_id: int) -> HTMLResponse:
    agent = await login_required(request, "callers.read")
    async with runtime_of(request).pool.acquire() as conn:
        try:
            caller = await procedure.caller_detail(conn, caller_id)
        except procedure.CallerNotFound:
            return render(request, "error.html", {"message": translator_of(request)("error.no_caller")},
                           status=404, agent=agent)  # fmt: skip
    return render(request, "caller.html", {"caller": caller, "error": None}, agent=agent)


@router.post("/callers/{caller_id}/tickets", response_class=HTMLResponse)
async def caller_new_ticket(request: Request, caller_id: int) -> Response:
    """Open a ticket for the call being taken: the problem as told is its first message."""
    agent = await login_required(request, "tickets.create")
    form = await read_form(request)
    body = form_field(form, "body", 100_000)
    channel = form_field(form, "channel", 20)
    rt = runtime_of(request)
    t = translator_of(request)
    error, status = t("call.need_body"), 422
    if body and channel in ("phone", "walk_in"):
        once = idempotency.from_form(request, agent["id"], form)

        async def work(conn: asyncpg.Connection) -> Response:
            ticket_id = await procedure.log_contact(
                conn, caller_id=caller_id, channel=channel, subject=form_field(form, "subject", 200),
                body=body, actor=agent["username"], agent_id=agent["id"], rules=rt.rules,
            )  # fmt: skip
            return redirect_to(f"/tickets/{ticket_id}")

        try:
            return await once.run(rt.pool, work)
        except procedure.CallerNotFound:
            pass  # answered below, as for a form with nothing in it
        except idempotency.KeyRefused as exc:
            error, status = idempotency.console_message(exc, t.lang), exc.status_code
    async with rt.pool.acquire() as conn:
        try:
            caller = await procedure.caller_detail(conn, caller_id)
        except procedure.CallerNotFound:
            return render(
                request, "error.html", {"message": t("error.no_caller")}, status=404, agent=agent
            )
    return render(request, "caller.html", {"caller": caller, "error": error}, status=status,
                   agent=agent)  # fmt: skip
