"""The ticket state machine: the help desk procedure step by step, and random action sequences."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ticketing.states import (
    ACTIONS,
    CLOSE_REASONS,
    STATUSES,
    TIERS,
    TRANSITIONS,
    TicketState,
    TransitionError,
    allowed_actions,
    apply,
    on_inbound,
    table_markdown,
)

NEW = TicketState(status="open", tier="agent")


def test_procedure_pending_then_support_then_management_then_resolved() -> None:
    ticket = apply(NEW, "pend")
    assert ticket == TicketState("pending", "agent")
    ticket = apply(ticket, "escalate")
    # The receiving team sees it open, to act on it.
    assert ticket == TicketState("open", "support")
    ticket = apply(apply(ticket, "pend"), "escalate")
    assert ticket == TicketState("open", "management")
    ticket = apply(ticket, "close", reason="resolved", solution="  Reset the modem  ")
    assert ticket == TicketState("closed", "management", "resolved", "Reset the modem")


def test_withdrawn_needs_no_solution() -> None:
    assert apply(NEW, "close", reason="withdrawn") == TicketState("closed", "agent", "withdrawn")


def test_resume_and_reopen() -> None:
    assert apply(apply(NEW, "pend"), "resume") == NEW
    closed = apply(apply(NEW, "escalate"), "close", reason="resolved", solution="Fixed")
    assert apply(closed, "reopen") == TicketState("open", "support")


@pytest.mark.parametrize(
    ("state", "action", "kwargs", "message"),
    [
        (TicketState("closed", "agent", "spam"), "pend", {}, "cannot pend a closed ticket"),
        (TicketState("closed", "agent", "spam"), "escalate", {}, "cannot escalate a closed ticket"),
        (
            TicketState("closed", "agent", "spam"),
            "close",
            {"reason": "spam"},
            "cannot close a closed",
        ),
        (TicketState("closed", "agent", "spam"), "resume", {}, "cannot resume a closed ticket"),
        (TicketState("pending", "agent"), "pend", {}, "already pending"),
        (NEW, "resume", {}, "already open"),
        (NEW, "reopen", {}, "cannot reopen an open ticket"),
        (TicketState("pending", "support"), "reopen", {}, "cannot reopen a pending ticket"),
        (TicketState("open", "management"), "escalate", {}, "cannot escalate beyond management"),
        (NEW, "close", {}, "closing needs a reason"),
        (NEW, "close", {"reason": " "}, "closing needs a reason"),
        (NEW, "close", {"reason": "bored"}, "unknown close reason 'bored'"),
        (NEW, "close", {"reason": "resolved"}, "closing as resolved needs the solution"),
        (NEW, "close", {"reason": "resolved", "solution": " \n"}, "needs the solution"),
        (NEW, "pend", {"reason": "waiting"}, "only when closing"),
        (NEW, "escalate", {"solution": "x"}, "only when closing"),
        (NEW, "archive", {}, "unknown action 'archive'"),
    ],
)
def test_refused_actions_say_why(
    state: TicketState, action: str, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(TransitionError, match=message) as refused:
        apply(state, action, **kwargs)
    assert message in refused.value.message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": "done", "tier": "agent"},
        {"status": "open", "tier": "boss"},
        {"status": "closed", "tier": "agent"},
        {"status": "closed", "tier": "agent", "close_reason": "resolved"},
        {"status": "open", "tier": "agent", "close_reason": "spam"},
        {"status": "pending", "tier": "agent", "solution": "x"},
    ],
)
def test_impossible_states_cannot_be_built(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        TicketState(**kwargs)


def test_transition_table_is_data_and_markdown() -> None:
    assert tuple(TRANSITIONS) == ACTIONS
    assert TRANSITIONS["escalate"].sources == ("open", "pending")
    table = table_markdown()
    lines = table.strip().splitlines()
    assert lines[0].startswith("| action | from | to |")
    assert len(lines) == 2 + len(ACTIONS)
    for action in ACTIONS:
        assert f"| `{action}` |" in table


# --- random sequences ---------------------------------------------------------------------------

states = st.one_of(
    st.builds(TicketState, st.sampled_from(["open", "pending"]), st.sampled_from(TIERS)),
    st.builds(
        lambda tier, reason, solution: TicketState("closed", tier, reason, solution),
        st.sampled_from(TIERS),
        st.sampled_from(CLOSE_REASONS),
        st.sampled_from(["Reset the router", "Moved to ticket 12"]),
    ),
)
steps = st.tuples(
    st.sampled_from([*ACTIONS, "archive"]),
    st.one_of(st.none(), st.sampled_from([*CLOSE_REASONS, "", "bored"])),
    st.one_of(st.none(), st.sampled_from(["", "   ", "Restarted the service"])),
)


@given(states, st.lists(steps, max_size=30))
def test_random_sequences_never_reach_a_forbidden_state(
    start: TicketState, sequence: list[tuple[str, str | None, str | None]]
) -> None:
    state = start
    for action, reason, solution in sequence:
        before = state
        try:
            state = apply(state, action, reason=reason, solution=solution)
        except TransitionError as refused:
            assert refused.message
            # A refusal changes nothing: the ticket is exactly as it was.
            assert state == before
            continue
        assert state.status in STATUSES
        assert state.tier in TIERS
        assert TIERS.index(state.tier) >= TIERS.index(before.tier), "tier went down"
        if state.status == "closed":
            assert state.close_reason in CLOSE_REASONS
            if state.close_reason == "resolved":
                assert state.solution and state.solution.strip()
        else:
            assert state.close_reason is None and state.solution is None
        if action == "escalate":
            assert state.status == "open"
            assert TIERS.index(state.tier) == TIERS.index(before.tier) + 1
        if action == "reopen":
            assert state.tier == before.tier


@given(states, st.sampled_from(ACTIONS))
def test_allowed_actions_match_apply(state: TicketState, action: str) -> None:
    kwargs = {"reason": "withdrawn"} if action == "close" else {}
    try:
        apply(state, action, **kwargs)
    except TransitionError:
        assert action not in allowed_actions(state)
    else:
        assert action in allowed_actions(state)


@given(st.lists(steps, max_size=40))
def test_a_ticket_is_never_lost(sequence: list[tuple[str, str | None, str | None]]) -> None:
    # Whatever happened, an unresolved ticket can still be closed or worked on.
    state = NEW
    for action, reason, solution in sequence:
        try:
            state = apply(state, action, reason=reason, solution=solution)
        except TransitionError:
            pass
        assert allowed_actions(state)


# --- inbound messages on the latest ticket -----------------------------------------------------

NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)
WINDOW = timedelta(days=7)


@pytest.mark.parametrize("status", ["open", "pending"])
def test_message_on_a_live_ticket_appends(status: str) -> None:
    assert on_inbound(status, None, NOW, WINDOW, None) == "append"


def test_message_after_closing() -> None:
    recent, old = NOW - timedelta(days=2), NOW - timedelta(days=8)
    assert on_inbound("closed", recent, NOW, WINDOW, "resolved") == "reopen"
    assert on_inbound("closed", NOW - WINDOW, NOW, WINDOW, "withdrawn") == "reopen"
    assert on_inbound("closed", old, NOW, WINDOW, "resolved") == "new"
    assert on_inbound("closed", recent, NOW, WINDOW, "spam") == "new"
    assert on_inbound("closed", recent, NOW, WINDOW, "duplicate") == "new"
    assert on_inbound(None, None, NOW, WINDOW, None) == "new"
    # Clocks a little apart: a ticket closed "in the future" was closed just now.
    assert on_inbound("closed", NOW + timedelta(seconds=3), NOW, WINDOW, "resolved") == "reopen"


def test_closed_ticket_without_closing_time_is_an_error() -> None:
    with pytest.raises(ValueError, match="closing time"):
        on_inbound("closed", None, NOW, WINDOW, "resolved")
    with pytest.raises(ValueError, match="unknown status"):
        on_inbound("archived", None, NOW, WINDOW, None)


@given(
    st.sampled_from(STATUSES),
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=60)),
    st.sampled_from(CLOSE_REASONS),
)
def test_auto_reply_never_reopens(status: str, age: timedelta, reason: str) -> None:
    closed_at = NOW - age if status == "closed" else None
    close_reason = reason if status == "closed" else None
    assert on_inbound(status, closed_at, NOW, WINDOW, close_reason, auto_reply=True) == "append"
    plain = on_inbound(status, closed_at, NOW, WINDOW, close_reason)
    if status == "closed":
        expected = "reopen" if age <= WINDOW and reason not in ("spam", "duplicate") else "new"
    else:
        expected = "append"
    assert plain == expected
