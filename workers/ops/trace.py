"""The path of one message: received, matched, ticketed, replied, delivered, with timestamps."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ticketing import ops as ops_reads
from workers.ops.shunt import ShuntEntry
from workers.ops.status import jsonable

log = logging.getLogger(__name__)


@dataclass
class Hop:
    hop: str  # received, matched, ticketed, replied, sent, delivered, read, failed, shunted, replayed
    at: datetime | None
    detail: str


@dataclass
class Trace:
    query: str
    trace_id: str | None = None
    message_id: int | None = None
    ticket_id: int | None = None
    hops: list[Hop] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return jsonable(asdict(self))  # type: ignore[no-any-return]


def epoch_time(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(float(value), UTC) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError, OSError):
        return None


async def trace(
    conn: asyncpg.Connection,
    ident: str,
    shunt: list[ShuntEntry] | None = None,
    *,
    shunt_errors: bool = True,
) -> Trace:
    """The path of one message (trace id or message id): received, matched, ticketed, replies and their delivery.

    A shunted hop gives the stage's error only with `shunt_errors`: it may quote the record
    (an address, a text) and internals, which are for those who may read the shunt.
    """
    result = Trace(query=ident)
    message = await ops_reads.traced_message(conn, ident)
    if message is not None:
        result.message_id, result.ticket_id = message["id"], message["ticket_id"]
        result.trace_id = message["trace_id"]
        if message["direction"] == "in":
            await _inbound_hops(conn, message, result)
        else:
            await _reply_hops(conn, message, result)
    else:
        result.trace_id = ident
    for entry in shunt or []:
        record = entry.record
        if record is None or not (record.trace_id == (result.trace_id or ident)):
            continue
        why = f": {record.error}" if shunt_errors else ""
        result.hops.append(Hop(
            "shunted", epoch_time(record.at),
            f"stage {record.stage} gave up on {record.topic}@{record.partition}:{record.offset} after"
            f" {record.attempts} attempt(s){why} (shunt record {entry.id})",
        ))  # fmt: skip
        if entry.replayed_at is not None:
            result.hops.append(
                Hop("replayed", entry.replayed_at, f"shunt record {entry.id} republished")
            )
    result.hops.sort(key=lambda h: h.at or datetime.max.replace(tzinfo=UTC))
    return result


async def _inbound_hops(conn: asyncpg.Connection, message: asyncpg.Record, result: Trace) -> None:
    meta = message["meta"] or {}
    sent = (
        f"; the provider dated it {message['received_at'].isoformat()}"
        if message["received_at"]
        else ""
    )
    result.hops.append(Hop(
        "received", epoch_time(meta.get("accepted_at")) or message["received_at"],
        f"{message['channel']}/{message['account']} from {message['sender']}"
        f" (external id {message['external_id']}){sent}",
    ))  # fmt: skip
    caller = await ops_reads.caller_brief(conn, message["caller_id"])
    event = await ops_reads.message_event(conn, message["ticket_id"], message["id"])
    reason = (event["data"] or {}).get("match") if event else None
    name = f" ({caller['name']})" if caller and caller["name"] else ""
    result.hops.append(Hop(
        "matched", epoch_time(meta.get("normalized_at")),
        f"caller #{message['caller_id']}{name}: {reason or 'no match reason recorded'}",
    ))  # fmt: skip
    ticket = await ops_reads.ticket_brief(conn, message["ticket_id"])
    reopened = await ops_reads.reopened_at(conn, message["ticket_id"], message["created_at"])
    if ticket["created_at"] == message["created_at"]:
        outcome = "new ticket"
    elif reopened:
        outcome = "reopened the ticket"
    else:
        outcome = "appended to the open ticket"
    flag = ", auto-reply" if message["auto_reply"] else ""
    result.hops.append(Hop(
        "ticketed", message["created_at"],
        f"ticket #{ticket['id']} \"{ticket['subject']}\": {outcome}{flag}; message #{message['id']}",
    ))  # fmt: skip
    for reply in await ops_reads.answers(conn, message["ticket_id"], message["id"]):
        await _reply_hops(conn, reply, result)


async def _reply_hops(conn: asyncpg.Connection, reply: asyncpg.Record, result: Trace) -> None:
    now_status = reply["status"] + (
        f" ({reply['status_reason']})" if reply["status_reason"] else ""
    )
    result.hops.append(Hop(
        "replied", reply["created_at"],
        f"reply #{reply['id']} by {reply['sender'] or 'an agent'} on {reply['channel']}/{reply['account']}"
        f" to {reply['recipient']}, queued; now {now_status}",
    ))  # fmt: skip
    for event in await ops_reads.delivery_events(conn, reply["ticket_id"], reply["id"]):
        data = event["data"] or {}
        state = data.get("status", "delivery")
        detail = f"reply #{reply['id']}"
        if data.get("provider_id"):
            detail += f", provider id {data['provider_id']}"
        if event["note"]:
            detail += f": {event['note']}"
        result.hops.append(Hop(state, event["at"], detail))
