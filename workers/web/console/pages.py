"""The agent console: server-rendered pages for the queue, callers and tickets, with live updates.

Every page module's routes, in one router; the report page."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
)

from ticketing import procedure
from workers.web.console import callers, ops, queue, session, tickets
from workers.web.console.common import login_required, render, runtime_of

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


# --- reports -----------------------------------------------------------------------


@router.get("/reports", response_class=HTMLResponse)
async def reports_page(request: Request) -> HTMLResponse:
    """The open report: every ticket not closed, by tier and status (managers and admins)."""
    agent = await login_required(request, "reports.read")
    async with runtime_of(request).pool.acquire() as conn:
        report = await procedure.open_report(conn)
    return render(request, "reports.html", {"report": report}, agent=agent)


# Every console route, in the order the app matches them.
ROUTERS = (session.router, queue.router, callers.router, tickets.router, ops.router, router)
