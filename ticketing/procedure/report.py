"""The open report: every ticket not closed, by tier and status, oldest first."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from ticketing.states import STATUSES, TIERS

# --- the open report -----------------------------------------------------------------------


@dataclass(frozen=True)
class OpenTicket:
    """One ticket not closed, as the report shows it."""

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
    age: timedelta
    idle: timedelta
    overdue: bool
    overdue_by: timedelta | None


@dataclass(frozen=True)
class ReportGroup:
    tier: str
    status: str
    tickets: list[OpenTicket]


@dataclass(frozen=True)
class OpenReport:
    """Every ticket not closed, by tier and status, oldest first; and the ones stuck pending."""

    generated_at: datetime
    total: int
    overdue: int
    groups: list[ReportGroup]
    # Pending at support or management beyond their resolution deadline.
    stuck_pending: list[OpenTicket] = field(default_factory=list)


async def open_report(conn: asyncpg.Connection, now: datetime | None = None) -> OpenReport:
    """Nothing missed: each open or pending ticket appears exactly once in `groups`."""
    now = now or datetime.now(UTC)
    rows = await conn.fetch(
        "SELECT t.id, t.caller_id, c.name AS caller_name, t.subject, t.channel, t.status, t.tier,"
        " t.created_at, t.last_activity_at, t.first_response_due, t.first_response_at, t.resolution_due"
        " FROM tickets t JOIN callers c ON c.id = t.caller_id"
        " WHERE t.status <> 'closed' ORDER BY t.created_at, t.id"
    )
    tickets = []
    for r in rows:
        late_resolution = r["resolution_due"] is not None and r["resolution_due"] < now
        late_answer = (
            r["first_response_at"] is None
            and r["first_response_due"] is not None
            and r["first_response_due"] < now
        )
        tickets.append(
            OpenTicket(
                id=r["id"],
                caller_id=r["caller_id"],
                caller_name=r["caller_name"],
                subject=r["subject"],
                channel=r["channel"],
                status=r["status"],
                tier=r["tier"],
                created_at=r["created_at"],
                last_activity_at=r["last_activity_at"],
                first_response_due=r["first_response_due"],
                resolution_due=r["resolution_due"],
                age=now - r["created_at"],
                idle=now - r["last_activity_at"],
                overdue=late_resolution or late_answer,
                overdue_by=now - r["resolution_due"] if late_resolution else None,
            )  # fmt: skip
        )
    groups = [
        ReportGroup(tier, status, [t for t in tickets if t.tier == tier and t.status == status])
        for tier in TIERS
        for status in STATUSES
        if status != "closed"
    ]
    stuck = [
        t
        for t in tickets
        if t.status == "pending"
        and t.tier in ("support", "management")
        and t.overdue_by is not None
    ]
    return OpenReport(
        generated_at=now,
        total=len(tickets),
        overdue=sum(t.overdue for t in tickets),
        groups=groups,
        stuck_pending=stuck,
    )
