"""Scheduled work: SLA escalation of overdue tickets (none yet)."""

from __future__ import annotations

from workers.runtime import Runtime
from workers.wiring import StageFactory


def scheduler_tasks(rt: Runtime) -> dict[str, StageFactory]:
    return {}
