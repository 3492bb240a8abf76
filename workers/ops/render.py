"""The ops commands (`loket status`, `trace`, `dlq`): what they read, and what they print."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from workers.ops.shunt import ShuntEntry, ShuntSelectionError, replay, select, shunt_entries
from workers.ops.status import Status, ago, collect_status
from workers.ops.trace import Trace, epoch_time, trace
from workers.runtime.installation import attach

log = logging.getLogger(__name__)


def ops_console() -> Any:
    """A rich console at the terminal's width, or, for a pipe or a file, one wide enough for
    whole cells (rich falls back to 80 characters without a terminal; tables take only the
    width their cells need)."""
    import shutil
    import sys

    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=max(shutil.get_terminal_size((1000, 24)).columns, 1000))


@contextlib.asynccontextmanager
async def _connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection that speaks JSON for json/jsonb columns, like the workers' pools."""
    from ticketing.db import create_pool

    pool = await create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            yield conn
    finally:
        await pool.close()


async def _open_pool(url: str) -> tuple[asyncpg.Pool | None, str | None]:
    from ticketing.db import create_pool

    try:
        pool = await asyncio.wait_for(create_pool(url, min_size=1, max_size=2), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return pool, None


def render_status(status: Status, console: Any) -> None:
    """One screen: stages, shunt, outbox, channels, traffic, and the verdict."""
    from rich.table import Table
    from rich.text import Text

    colours = {"ok": "green", "warning": "yellow", "outage": "bold red"}
    local = status.checked_at.astimezone()
    console.print(
        f"[bold]loket status[/bold] at {local:%Y-%m-%d %H:%M:%S %Z}  "
        f"database: {'ok' if status.database is None else '[red]unreachable[/red]'}  "
        f"broker: {'ok' if status.broker is None else '[red]unreachable[/red]'} ({status.bootstrap or '-'})"
    )
    stages = Table(title="Stages", title_justify="left")
    for column, justify in (("stage", "left"), ("topic", "left"), ("consumers", "right"), ("lag", "right"),
                            ("rate/min", "right"), ("state", "left")):  # fmt: skip
        stages.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    state_colours = {"ok": "green", "idle": "green", "stopped": "yellow", "lagging": "yellow",
                     "stalled": "bold red", "no consumer": "bold red"}  # fmt: skip
    for stage in status.stages:
        rate = f"{stage.rate_per_min:.1f}" if stage.rate_per_min is not None else "-"
        state = stage.state + (f" {stage.stalled_seconds:.0f}s" if stage.stalled_seconds else "")
        stages.add_row(
            stage.stage,
            stage.topic,
            str(stage.members),
            str(stage.lag),
            rate,
            Text(state, style=state_colours.get(stage.state, "")),
        )
    if status.stages:
        console.print(stages)
    elif status.broker is None:
        console.print("Stages: no consumer group and no records yet")
    shunt = "-" if status.shunt_total is None else f"{status.shunt_total} record(s)"
    if status.shunt_pending:
        shunt += f", [yellow]{status.shunt_pending} not replayed[/yellow]"
    console.print(f"Shunt: {shunt}")
    if status.outbox_due is not None:
        oldest = (
            f", oldest due {status.outbox_oldest_seconds:.0f}s ago"
            if status.outbox_oldest_seconds
            else ""
        )
        console.print(
            f"Outbox: {status.outbox_due} due, {status.outbox_scheduled} scheduled for retry{oldest}"
        )
    if status.channels:
        channels = Table(title="Channels", title_justify="left")
        for column in ("channel", "account", "state", "last ok", "last error"):
            channels.add_column(
                column, no_wrap=column != "last error", overflow="fold", max_width=60
            )
        for channel in status.channels:
            colour = "green" if channel.state == "up" else "bold red"
            channels.add_row(
                channel.channel,
                channel.account,
                Text(channel.state, style=colour),
                ago(channel.last_ok_at, status.checked_at),
                channel.last_error or "",
            )
        console.print(channels)
    elif status.database is None:
        console.print("Channels: none has reported yet")
    if status.inbound_per_min is not None:
        console.print(
            f"Traffic (last 5 min): {status.inbound_per_min:.1f} inbound stored/min,"
            f" {status.outbound_per_min:.1f} replies sent/min"
        )
    for problem in status.problems:
        console.print(f"[bold red]OUTAGE[/bold red] {problem}")
    for warning in status.warnings:
        console.print(f"[yellow]warning[/yellow] {warning}")
    console.print(Text(f"verdict: {status.verdict}", style=colours[status.verdict]))


async def run_status(
    settings: Any,
    *,
    as_json: bool = False,
    stall_seconds: float | None = None,
    lag_warning: int = 1000,
) -> int:
    """`loket status`: exit 0 when healthy or only warnings, 1 on an outage."""
    import json

    settings = attach(settings)
    if stall_seconds is None:
        stall_seconds = float(settings.stall_seconds)
    pool, error = await _open_pool(settings.database_url)
    try:
        status = await collect_status(
            settings.kafka_bootstrap,
            pool,
            database_error=error,
            stall_seconds=stall_seconds,
            lag_warning=lag_warning,
        )
    finally:
        if pool is not None:
            await pool.close()
    if as_json:
        print(json.dumps(status.as_json(), ensure_ascii=False, indent=2))
    else:
        render_status(status, ops_console())
    return status.exit_code


def render_trace(found: Trace, console: Any) -> None:
    from rich.table import Table

    heading = f"trace {found.trace_id or found.query}"
    if found.message_id:
        heading += f": message #{found.message_id} on ticket #{found.ticket_id}"
    table = Table(title=heading, title_justify="left")
    table.add_column("when", no_wrap=True)
    table.add_column("+", justify="right", no_wrap=True)
    table.add_column("hop", no_wrap=True)
    table.add_column("detail", overflow="fold")
    first = next((h.at for h in found.hops if h.at), None)
    for hop in found.hops:
        when = hop.at.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if hop.at else "-"
        since = f"{(hop.at - first).total_seconds():.3f}s" if hop.at and first else ""
        table.add_row(when, since, hop.hop, hop.detail)
    console.print(table)


async def run_trace(settings: Any, ident: str, *, as_json: bool = False) -> int:
    """`loket trace ID`: exit 1 when nothing is known about the id."""
    import json

    settings = attach(settings)
    async with _connection(settings.database_url) as conn:
        entries = await shunt_entries(settings.kafka_bootstrap, conn)
        found = await trace(conn, ident, entries)
    if as_json:
        print(json.dumps(found.as_json(), ensure_ascii=False, indent=2))
    elif found.hops:
        render_trace(found, ops_console())
    if not found.hops:
        if not as_json:
            print(
                f"nothing known about {ident}: no stored message and no shunted record carries it"
                " (still on its way? see loket status)"
            )
        return 1
    return 0


def _render_shunt_list(entries: list[ShuntEntry], console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    if not entries:
        console.print("the shunt is empty")
        return
    table = Table(title=f"Shunt: {len(entries)} record(s)", title_justify="left")
    for column in ("id", "when", "stage", "from", "error", "replayed"):
        table.add_column(column, no_wrap=column != "error", overflow="fold")
    for entry in entries:
        s = entry.summary()
        shunted = epoch_time(entry.record.at) if entry.record else None
        when = shunted.astimezone().strftime("%m-%d %H:%M:%S") if shunted else "-"
        replayed = (Text(entry.replayed_at.astimezone().strftime("%m-%d %H:%M:%S"), style="green")
                    if entry.replayed_at else Text("no", style="yellow"))  # fmt: skip
        table.add_row(
            entry.id,
            when,
            s["stage"] or "?",
            f"{s['topic']}:{s['source_partition']}@{s['source_offset']}",
            s["error"],
            replayed,
        )
    console.print(table)


_SHOWN_FIELDS = ("stage", "topic", "source_partition", "source_offset", "key", "trace_id",
                 "attempts", "at", "replayed_at", "error")  # fmt: skip


def _render_shunt_record(entry: ShuntEntry, console: Any) -> None:
    from rich.markup import escape

    document = entry.full()
    console.rule(f"shunt record {entry.id}")
    for name in _SHOWN_FIELDS:
        console.print(f"[bold]{name}[/bold]: {escape(str(document[name]))}", highlight=False)
    console.print("[bold]traceback[/bold]:")
    console.print(document.get("traceback") or "-", markup=False, highlight=False)
    console.print("[bold]payload[/bold]:")
    console.print(document["payload"], markup=False, highlight=False)


async def run_dlq(
    settings: Any,
    command: str,
    ids: list[str],
    *,
    stage: str | None = None,
    everything: bool = False,
    force: bool = False,
    as_json: bool = False,
) -> int:
    """`loket dlq list|show|replay`."""
    import json

    settings = attach(settings)
    console = ops_console()
    async with _connection(settings.database_url) as conn:
        entries = await shunt_entries(settings.kafka_bootstrap, conn)
        if command == "list":
            if as_json:
                print(json.dumps([e.summary() for e in entries], ensure_ascii=False, indent=2))
            else:
                _render_shunt_list(entries, console)
            return 0
        try:
            chosen = select(entries, ids, stage, everything)
        except ShuntSelectionError as exc:
            print(f"loket dlq: {exc}")
            return 1
        if command == "show":
            for entry in chosen:
                if as_json:
                    print(json.dumps(entry.full(), ensure_ascii=False, indent=2))
                else:
                    _render_shunt_record(entry, console)
            return 0
        results = await replay(settings.kafka_bootstrap, conn, chosen, force=force)
    if as_json:
        print(json.dumps([{"id": r.entry.id, "outcome": r.outcome} for r in results], indent=2))
    else:
        for result in results:
            print(f"{result.entry.id}: {result.outcome}")
        if not results:
            print("nothing to replay")
    return 0
