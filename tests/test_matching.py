"""Caller matching as a decision: which caller each message of a batch joins."""

from __future__ import annotations

from channels.types import Identity, InboundMessage, RawInbound
from normalizer.matching import ANONYMOUS, Decision, joined, plan, unknown_senders

SITI = Identity(kind="phone", value="+6281234567890")
BUDI = Identity(kind="email", value="budi@sekolah.example.id")


def message(identity: Identity | None, name: str | None = None) -> InboundMessage:
    raw = RawInbound(channel="sms", account="a", external_id=str(id(name)), sender="x",
                     sender_name=name)  # fmt: skip
    return InboundMessage(raw=raw, identity=identity)


def test_only_senders_nobody_holds_get_a_new_caller() -> None:
    batch = [message(SITI, "Siti"), message(BUDI, "Budi"), message(None)]
    assert unknown_senders(batch, {("email", BUDI.value): 7}) == [(SITI, "Siti")]


def test_the_first_message_of_a_new_sender_creates_its_caller_the_next_join_it() -> None:
    batch = [message(SITI), message(SITI), message(BUDI)]
    decisions = plan(batch, {("email", BUDI.value): 7}, {("phone", SITI.value): (42, True)})
    assert decisions == [
        Decision(42, True, "new caller for phone:+6281234567890"),
        Decision(42, False, "identity phone:+6281234567890"),
        Decision(7, False, "identity email:budi@sekolah.example.id"),
    ]


def test_a_caller_another_process_made_first_is_joined_not_created() -> None:
    [decision] = plan([message(SITI)], {}, {("phone", SITI.value): (42, False)})
    assert decision == Decision(42, False, "identity phone:+6281234567890")


def test_a_message_without_a_sender_gets_a_caller_of_its_own() -> None:
    assert plan([message(None), message(None)], {}, {}) == [Decision(None, True, ANONYMOUS)] * 2


def test_a_shared_identity_says_which_callers_it_joined() -> None:
    assert joined("identity phone:+62812", BUDI, 9) == (
        "identity phone:+62812; shared email budi@sekolah.example.id joined caller 9"
    )
