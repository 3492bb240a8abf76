"""Scheduled work: SLA escalation of overdue tickets, pruning of old idempotency keys."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import asyncpg

from ticketing.procedure import escalate_overdue
from ticketing.rules import TicketRules
from workers.pipeline.wiring import StageFactory
from workers.runtime.runtime import Runtime
from workers.web.idempotency import run_prune

log = logging.getLogger(__name__)

# How often overdue tickets are looked for; deadlines are in hours, a minute is precise enough.
SLA_INTERVAL_SECONDS = 60.0


async def run_sla(
    pool: asyncpg.Pool,
    rules: TicketRules,
    stop: asyncio.Event,
    *,
    interval: float = SLA_INTERVAL_SECONDS,
) -> None:
    """Escalate overdue tickets every `interval` seconds until `stop` is set.

    Safe to run in several processes: each pass skips the tickets another one holds.
    """
    if not rules.auto_escalate:
        log.info("automatic SLA escalation is off ([sla] auto_escalate = false)")
        await stop.wait()
        return
    while not stop.is_set():
        async with pool.acquire() as conn:
            escalated = await escalate_overdue(conn, rules, datetime.now(UTC))
        if escalated:
            log.info("escalated %d overdue tickets: %s", len(escalated), escalated)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def scheduler_tasks(rt: Runtime) -> dict[str, StageFactory]:
    """The scheduler worker: SLA escalation, key pruning, and the stage samples."""
    from workers.ops.status import watch_stages

    async def samples(stop: asyncio.Event) -> None:
        # Stage samples let `loket status` tell a stalled stage at its first look.
        await watch_stages(rt.bootstrap, rt.pool, stop, rt.settings.stall_seconds)

    return {
        "sla": lambda stop: run_sla(rt.pool, rt.rules, stop),
        "idempotency-prune": lambda stop: run_prune(rt.pool, stop),
        "stage-samples": samples,
    }
