"""What the procedure's parts share: its limits, errors, and reading an identity an agent typed."""

from __future__ import annotations

from channels.types import IDENTITY_KINDS, Identity
from normalizer.identity import identity_for
from normalizer.phone import PHONE_KINDS, normalize_phone

# The past tense of each action, as the event log names what happened.
EVENT_KINDS: dict[str, str] = {
    "pend": "pended",
    "resume": "resumed",
    "escalate": "escalated",
    "close": "closed",
    "reopen": "reopened",
}
# A call or a visit is answered while the person is there: it needs no separate first answer.
LIVE_CHANNELS: frozenset[str] = frozenset({"phone", "walk_in"})
KB_PROBLEM_MAX = 4000
SEARCH_LIMIT = 50
TICKETS_PER_CALLER = 50


class CallerNotFound(LookupError):
    """No caller with that id."""


class TicketNotFound(LookupError):
    """No ticket with that id."""


class AgentNotFound(LookupError):
    """No active agent with that id."""


class CallerConflict(Exception):
    """The caller records are not in a state that allows the change (e.g. already merged)."""


def identity_from_input(kind: str, value: str) -> Identity:
    """An identity from what an agent typed; ValueError when it cannot be one."""
    typed = value.strip()
    if not typed:
        raise ValueError(f"empty {kind} identity")
    if kind in PHONE_KINDS:
        return normalize_phone(typed, kind=kind)
    if kind == "email":
        identity = identity_for("email", typed)
        if identity is None:
            raise ValueError(f"not an e-mail address: {typed!r}")
        return identity
    if kind in IDENTITY_KINDS:
        return Identity(kind=kind, value=typed)
    raise ValueError(f"unknown identity kind {kind!r}; one of {', '.join(IDENTITY_KINDS)}")
