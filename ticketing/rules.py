"""The configurable rules of the help desk: follow-up window and SLA deadlines."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ticketing.sla import (
    DEFAULT_POLICIES,
    BusinessCalendar,
    TierPolicy,
    calendar_from_config,
    due_times,
    policies_from_config,
)


@dataclass(frozen=True)
class TicketRules:
    """What ticketing needs to decide threading and deadlines."""

    followup_window: timedelta = timedelta(days=7)
    calendar: BusinessCalendar = field(default_factory=BusinessCalendar)
    policies: dict[str, TierPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    # Escalate a ticket overdue at its tier automatically (scheduled stage).
    auto_escalate: bool = False

    def due(self, opened_at: datetime, tier: str) -> tuple[datetime, datetime]:
        return due_times(opened_at, tier, self.calendar, self.policies)

    @classmethod
    def from_config(cls, followup_days: float, sections: dict[str, Any]) -> TicketRules:
        sla = sections.get("sla", {})
        calendar = calendar_from_config(sections.get("calendar", {}))
        return cls(
            followup_window=timedelta(days=followup_days),
            calendar=calendar,
            policies=policies_from_config(sla.get("tiers", {}), calendar=calendar),
            auto_escalate=bool(sla.get("auto_escalate", False)),
        )
