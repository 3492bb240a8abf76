"""`loket report open`: every ticket not closed, as tables in the terminal."""

from __future__ import annotations

import json
from datetime import timedelta, tzinfo
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ticketing.procedure import OpenReport, OpenTicket
from workers.ops.render import ops_console
from workers.runtime.installation import attach
from workers.runtime.settings import Settings


def human(span: timedelta) -> str:
    """A duration as a person reads it in a queue: 3d 4h, 5h 12m, 7m."""
    minutes = max(int(span.total_seconds() // 60), 0)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def _when(moment, zone: tzinfo) -> str:  # type: ignore[no-untyped-def]
    return moment.astimezone(zone).strftime("%d %b %H:%M") if moment else "-"


def _table(
    title: str, tickets: list[OpenTicket], zone: tzinfo, *, late_column: bool, terminal: bool
) -> Table:
    """One table of tickets. On a terminal long subjects fold at 48 characters; through a
    pipe or into a file every cell stays whole, one line per ticket."""
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("caller", no_wrap=not terminal)
    table.add_column("subject", overflow="fold", max_width=48 if terminal else None,
                     no_wrap=not terminal)  # fmt: skip
    table.add_column("channel", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("idle", justify="right", no_wrap=True)
    table.add_column("answer due", no_wrap=True)
    table.add_column("resolve due", no_wrap=True)
    table.add_column("late by" if late_column else "overdue", no_wrap=True)
    for ticket in tickets:
        late = (
            human(ticket.overdue_by)
            if late_column and ticket.overdue_by
            else ("OVERDUE" if ticket.overdue else "")
        )
        table.add_row(
            str(ticket.id),
            ticket.caller_name or f"caller {ticket.caller_id}",
            ticket.subject,
            ticket.channel,
            human(ticket.age),
            human(ticket.idle),
            _when(ticket.first_response_due, zone),
            _when(ticket.resolution_due, zone),
            Text(late, style="bold red") if late else "",
        )
    return table


def render(report: OpenReport, console: Console, *, tz: str = "Asia/Jakarta") -> None:
    """Print the report: one table per tier and status that has tickets, then the stuck ones."""
    zone = ZoneInfo(tz)
    console.print(
        f"[bold]Open tickets[/bold] at {_when(report.generated_at, zone)} ({tz}):"
        f" {report.total} not closed, {report.overdue} overdue"
    )
    for group in report.groups:
        if not group.tickets:
            console.print(f"  {group.tier} / {group.status}: none")
            continue
        title = f"{group.tier} / {group.status}: {len(group.tickets)}"
        console.print(
            _table(title, group.tickets, zone, late_column=False, terminal=console.is_terminal)
        )
    if report.stuck_pending:
        title = f"Pending at support or management past the deadline: {len(report.stuck_pending)}"
        console.print(
            _table(
                title, report.stuck_pending, zone, late_column=True, terminal=console.is_terminal
            )
        )
    else:
        console.print("Pending at support or management past the deadline: none")


async def run_report_open(settings: Settings, *, as_json: bool = False) -> None:
    """Connect with LOKET_DATABASE_URL, build the open report and print it."""
    import asyncpg

    from ticketing.procedure import open_report
    from workers.runtime.runtime import load_rules
    from workers.web.api.desk import report_model

    settings = attach(settings, broker=False)
    conn = await asyncpg.connect(settings.database_url)
    try:
        report = await open_report(conn)
    finally:
        await conn.close()
    if as_json:
        print(
            json.dumps(report_model(report).model_dump(mode="json"), ensure_ascii=False, indent=2)
        )
        return
    render(report, ops_console(), tz=load_rules(settings).calendar.tz)
