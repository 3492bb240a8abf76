"""The help desk's ticket state machine: statuses, tiers, close reasons and allowed transitions."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

STATUSES: tuple[str, ...] = ("open", "pending", "closed")
TIERS: tuple[str, ...] = ("agent", "support", "management")
CLOSE_REASONS: tuple[str, ...] = ("resolved", "withdrawn", "duplicate", "spam")
ACTIONS: tuple[str, ...] = ("pend", "resume", "escalate", "close", "reopen")
# A message after a ticket closed as one of these starts a new ticket instead of reopening it.
NO_REOPEN_REASONS: frozenset[str] = frozenset({"spam", "duplicate"})

InboundEffect = Literal["append", "reopen", "new"]


class TransitionError(ValueError):
    """An action that the procedure does not allow from the ticket's current state."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class TicketState:
    """Where a ticket stands. A closed ticket has a reason; a resolved one has its solution."""

    status: str
    tier: str
    close_reason: str | None = None
    solution: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}; one of {', '.join(STATUSES)}")
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}; one of {', '.join(TIERS)}")
        if self.status == "closed":
            if self.close_reason not in CLOSE_REASONS:
                raise ValueError(
                    f"a closed ticket needs a reason: one of {', '.join(CLOSE_REASONS)}"
                )
            if self.close_reason == "resolved" and not (self.solution and self.solution.strip()):
                raise ValueError("a ticket closed as resolved needs its solution")
        elif self.close_reason is not None or self.solution is not None:
            raise ValueError(f"an {self.status} ticket has no close reason or solution")


@dataclass(frozen=True)
class Transition:
    """One row of the transition table: which statuses an action starts from and what it does."""

    action: str
    sources: tuple[str, ...]
    target: str
    tier: str  # how the tier changes
    requires: str  # what the agent must give
    summary: str


TRANSITIONS: dict[str, Transition] = {
    t.action: t
    for t in (
        Transition(
            "pend",
            ("open",),
            "pending",
            "unchanged",
            "-",
            "The problem cannot be solved now; it waits, still visible.",
        ),
        Transition(
            "resume",
            ("pending",),
            "open",
            "unchanged",
            "-",
            "Work on a pending ticket starts again.",
        ),
        Transition(
            "escalate",
            ("open", "pending"),
            "open",
            "agent → support → management",
            "a tier below management",
            "Hand the ticket to the next team; it is open there so that team acts on it.",
        ),
        Transition(
            "close",
            ("open", "pending"),
            "closed",
            "unchanged",
            "reason (resolved, withdrawn, duplicate, spam); resolved needs a solution",
            "Resolved feeds the knowledge base; withdrawn when the caller decides not to report.",
        ),
        Transition(
            "reopen",
            ("closed",),
            "open",
            "unchanged",
            "-",
            "The problem is back; the reason and solution are cleared.",
        ),
    )
}


def apply(
    state: TicketState,
    action: str,
    *,
    solution: str | None = None,
    reason: str | None = None,
) -> TicketState:
    """The state after `action`, or TransitionError with a message an agent can read.

    `reason` and `solution` belong to `close` only; any other action given them is refused.
    """
    transition = TRANSITIONS.get(action)
    if transition is None:
        raise TransitionError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    if action != "close" and (reason is not None or solution is not None):
        raise TransitionError(f"a reason or solution is given only when closing, not to {action}")
    if state.status not in transition.sources:
        raise TransitionError(_refusal(state, action))

    if action == "pend":
        return replace(state, status="pending")
    if action == "resume":
        return replace(state, status="open")
    if action == "escalate":
        position = TIERS.index(state.tier)
        if position == len(TIERS) - 1:
            raise TransitionError(f"cannot escalate beyond {TIERS[-1]}")
        return replace(state, status="open", tier=TIERS[position + 1])
    if action == "close":
        return _close(state, reason=reason, solution=solution)
    # reopen: back to work at the same tier, the old outcome no longer holds.
    return TicketState(status="open", tier=state.tier)


def allowed_actions(state: TicketState) -> list[str]:
    """Actions that can apply to `state` (given the right reason/solution for `close`)."""
    return [
        action
        for action, transition in TRANSITIONS.items()
        if state.status in transition.sources
        and not (action == "escalate" and state.tier == TIERS[-1])
    ]


def table_markdown() -> str:
    """The transition table as a Markdown table, for documentation and the agent manual."""
    lines = [
        "| action | from | to | tier | requires | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in TRANSITIONS.values():
        lines.append(
            f"| `{t.action}` | {', '.join(t.sources)} | {t.target} | {t.tier} | {t.requires} | {t.summary} |"
        )
    return "\n".join(lines) + "\n"


def on_inbound(
    status: str | None,
    closed_at: datetime | None,
    now: datetime,
    followup_window: timedelta,
    close_reason: str | None,
    *,
    auto_reply: bool = False,
) -> InboundEffect:
    """What a new message from a caller does to their latest ticket (`status` None: they have none).

    - no ticket → "new".
    - auto-reply (out-of-office, delivery notice) on any ticket → "append": the message is
      stored on the ticket and the state does not change; a closed ticket stays closed.
    - open or pending → "append".
    - closed as spam or duplicate → "new": such a ticket is never brought back.
    - closed at most `followup_window` ago → "reopen"; longer ago → "new" (the caller of
      this function links the new ticket to the old one).
    """
    if status is None:
        return "new"
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    if auto_reply:
        return "append"
    if status in ("open", "pending"):
        return "append"
    if close_reason in NO_REOPEN_REASONS:
        return "new"
    if closed_at is None:
        raise ValueError("a closed ticket must have its closing time")
    # A closing time in the future (clocks of two hosts) counts as just closed.
    if now - closed_at <= followup_window:
        return "reopen"
    return "new"


def _refusal(state: TicketState, action: str) -> str:
    if action == "reopen":
        return f"cannot reopen {_a(state.status)} ticket; only a closed ticket can be reopened"
    if action == "pend" and state.status == "pending":
        return "the ticket is already pending"
    if action == "resume" and state.status == "open":
        return "the ticket is already open"
    if state.status == "closed":
        return f"cannot {action} a closed ticket; reopen it first"
    return f"cannot {action} {_a(state.status)} ticket"


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _close(state: TicketState, *, reason: str | None, solution: str | None) -> TicketState:
    if reason is None or not reason.strip():
        raise TransitionError(f"closing needs a reason: one of {', '.join(CLOSE_REASONS)}")
    if reason not in CLOSE_REASONS:
        raise TransitionError(f"unknown close reason {reason!r}; one of {', '.join(CLOSE_REASONS)}")
    text = solution.strip() if solution is not None else ""
    if reason == "resolved" and not text:
        raise TransitionError("closing as resolved needs the solution")
    # A note given with another reason is kept too; only resolved tickets feed the knowledge base.
    return TicketState(status="closed", tier=state.tier, close_reason=reason, solution=text or None)
