"""Sender to caller: the decision for each message of a batch, made without any I/O.

The normalizer stage looks up the callers that hold the batch's identities, creates callers
for the rest, and hands both to `plan`; what `plan` decides it then writes. One caller has
many identities: a message whose sender is known joins that caller, the first message from
an unknown sender makes a new one, and a message with no usable sender gets a caller of its
own ("sender unknown").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from channels.types import Identity, InboundMessage

IdentityKey = tuple[str, str]  # (kind, value)
ANONYMOUS = "sender unknown: new caller"


@dataclass(frozen=True)
class Decision:
    """Which caller a message belongs to; `caller_id` None: a new caller without identity."""

    caller_id: int | None
    created: bool
    reason: str


def key_of(identity: Identity) -> IdentityKey:
    return (identity.kind, identity.value)


def unknown_senders(
    messages: Sequence[InboundMessage], known: Mapping[IdentityKey, int]
) -> list[tuple[Identity, str | None]]:
    """The identities no caller holds yet, with the sender's name, to create callers for."""
    return [
        (m.identity, m.raw.sender_name)
        for m in messages
        if m.identity is not None and key_of(m.identity) not in known
    ]


def plan(
    messages: Sequence[InboundMessage],
    known: Mapping[IdentityKey, int],
    fresh: Mapping[IdentityKey, tuple[int, bool]],
) -> list[Decision]:
    """The caller of each message, in order.

    `known`: the callers that held the batch's identities; `fresh`: `(caller id, created)` of
    those made for the unknown ones (`created` False where another process made it first).
    The first message of a new caller is the one that created it.
    """
    holders = dict(known)
    unused = dict(fresh)
    decisions = []
    for message in messages:
        if message.identity is None:
            decisions.append(Decision(None, True, ANONYMOUS))
            continue
        key = key_of(message.identity)
        if key in unused:
            caller_id, created = unused.pop(key)
            holders[key] = caller_id
            reason = (
                f"new caller for {key[0]}:{key[1]}" if created else f"identity {key[0]}:{key[1]}"
            )
            decisions.append(Decision(caller_id, created, reason))
        else:
            decisions.append(Decision(holders[key], False, f"identity {key[0]}:{key[1]}"))
    return decisions


def joined(reason: str, shared: Identity, caller_id: int) -> str:
    """The match reason once a shared verified identity joined two callers into `caller_id`."""
    return f"{reason}; shared {shared.kind} {shared.value} joined caller {caller_id}"
