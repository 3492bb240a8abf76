"""The ops dashboard: the pipeline as it flows, live, and the banner the queue shows when a
channel is down or a stage stalled.

`/ops` draws one screen from what `loket status` collects (stages with rate, lag and state,
the broker and the database, each channel account's health, the outbox, the shunt) and the
last hour per minute as charts; `/ops/board` is that screen alone, fetched again every few
seconds by the page. `/ops/shunt` lists the shunted records.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from ticketing import ops as ops_reads
from workers.ops.shunt import shunt_entries
from workers.ops.status import Status
from workers.runtime import metrics
from workers.runtime.runtime import Runtime
from workers.web.api.ops import snapshot
from workers.web.console.charts import line_chart
from workers.web.console.common import (
    login_required,
    render,
    runtime_of,
    session_agent,
    translator_of,
    zone_of,
)

router = APIRouter(include_in_schema=False)

# How often the page fetches the board again, and how long one look serves every board.
REFRESH_SECONDS = 5
SNAPSHOT_SECONDS = 4.0


async def board(request: Request) -> dict[str, Any]:
    status, history = await _snapshot(request)
    charts = _charts(request, history) if history is not None else {}
    return {"status": status, "charts": charts, "refresh": REFRESH_SECONDS,
            "flow": _flow(status)}  # fmt: skip


async def _snapshot(request: Request) -> tuple[Status, dict[str, Any] | None]:
    """What the board shows, shared by every open board of this process for a few seconds:
    each look opens connections to the broker, and many tabs must not multiply that."""
    cached = getattr(request.app.state, "ops_snapshot", None)
    if cached is not None and time.monotonic() - cached[0] < SNAPSHOT_SECONDS:
        return cached[1], cached[2]
    status, history = await snapshot(runtime_of(request))
    request.app.state.ops_snapshot = (time.monotonic(), status, history)
    return status, history


def _flow(status: Status) -> list[list[Any]]:
    """The stages in the order messages pass them: in (raw to tickets), then out (replies)."""
    inbound = ("normalizer", "ticketing", "kb-suggest")
    by_name = {stage.stage: stage for stage in status.stages}
    first = [by_name[name] for name in inbound if name in by_name]
    # Replies go out through the delivery stages; the providers' receipts come back after.
    rest = sorted((stage for stage in status.stages if stage.stage not in inbound),
                  key=lambda stage: (not stage.stage.startswith("delivery-"), stage.stage))  # fmt: skip
    return [row for row in (first, rest) if row]


def _charts(request: Request, history: dict[str, Any]) -> dict[str, Any]:
    t = translator_of(request)
    zone = zone_of(request)
    minutes = [datetime.fromisoformat(m).astimezone(zone) for m in history["minutes"]]
    first, last = (f"{minutes[0]:%H:%M}", f"{minutes[-1]:%H:%M}") if minutes else ("", "")
    throughput = line_chart(
        {t("ops.chart.in"): history["inbound"], t("ops.chart.out"): history["outbound"]},
        title=t("ops.chart.throughput"), first=first, last=last,
    )  # fmt: skip
    lag = line_chart(history["lag"] or {"–": []}, title=t("ops.chart.lag"), first=first, last=last)
    return {"throughput": throughput, "lag": lag}


@router.get("/ops", response_class=HTMLResponse)
async def ops_page(request: Request) -> HTMLResponse:
    agent = await login_required(request, "ops.read")
    return render(request, "ops.html", await board(request), agent=agent)


@router.get("/ops/board", response_class=HTMLResponse)
async def ops_board(request: Request) -> HTMLResponse:
    # 401 when the session ended: htmx swaps nothing, rather than a login page into the board.
    agent = await session_agent(request, "ops.read")
    return render(request, "_ops_board.html", await board(request), agent=agent)


@router.get("/ops/shunt", response_class=HTMLResponse)
async def shunt_page(request: Request) -> HTMLResponse:
    agent = await login_required(request, "ops.shunt")
    rt = runtime_of(request)
    async with rt.pool.acquire() as conn:
        entries = await shunt_entries(rt.bootstrap, conn)
    rows = [entry.summary() for entry in entries]
    for row in rows:
        row["at"] = datetime.fromisoformat(row["at"]) if row["at"] else None
    return render(request, "ops_shunt.html", {"entries": rows}, agent=agent)


async def pipeline_alerts(rt: Runtime, conn: Any) -> list[dict[str, Any]]:
    """What the queue shows above the tickets: channel accounts down, stages stalled (those of
    this process; `/ops` shows every process's). An account no longer configured is left out.
    """
    configured = {c: {e["name"] for e in entries} for c, entries in rt.channels.items()}
    alerts: list[dict[str, Any]] = [
        {"kind": "channel", "channel": row["channel"], "account": row["account"],
         "last_ok": row["last_ok_at"], "error": row["last_error"]}
        for row in await ops_reads.channel_health(conn)
        if row["state"] == "down" and row["account"] in configured.get(row["channel"], ())
    ]  # fmt: skip
    for stage, seconds in sorted(metrics.stalled_stages(rt.settings.stall_seconds).items()):
        alerts.append({"kind": "stage", "stage": stage, "seconds": round(seconds)})
    return alerts
