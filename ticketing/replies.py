"""Agents' replies: written with their outbox row in one transaction; delivery status after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from typing import Any

import asyncpg
import msgspec

from channels.types import (
    OUTBOUND_CHANNELS,
    REPLY_CHANNEL_OF_IDENTITY,
    DeliveryReceipt,
    OutboundReply,
    outbound_topic,
)

_STATUS_RANK = {"queued": 0, "sent": 1, "delivered": 2, "read": 3}


class ReplyError(Exception):
    """The reply cannot be sent as asked; the message says why (shown to the agent)."""


async def enqueue(
    conn: asyncpg.Connection,
    topic: str,
    key: bytes | None,
    payload: bytes,
    available_at: datetime | None = None,
) -> None:
    """Add an outbox row (inside the caller's transaction) and wake the relay."""
    await conn.execute(
        "INSERT INTO outbox (topic, key, payload, available_at) VALUES ($1, $2, $3, coalesce($4, now()))",
        topic,
        key,
        payload,
        available_at,
    )
    await conn.execute("NOTIFY loket_outbox")


async def _target(
    conn: asyncpg.Connection,
    ticket: asyncpg.Record,
    channel: str | None,
    accounts: dict[str, list[str]],
) -> dict[str, Any]:
    """Where the reply goes: the channel of the latest message the person sent, unless chosen."""
    rows = await conn.fetch(
        "SELECT channel, account, sender, subject, headers, meta, external_id FROM messages"
        " WHERE ticket_id = $1 AND direction = 'in' AND NOT auto_reply ORDER BY id DESC LIMIT 20",
        ticket["id"],
    )
    for row in rows:
        if row["channel"] in OUTBOUND_CHANNELS and (channel is None or row["channel"] == channel):
            if not (row["sender"] or "").strip():
                continue  # e.g. a mail with no From, Reply-To, Sender or Return-Path
            if row["channel"] in accounts and row["account"] in accounts[row["channel"]]:
                return dict(row)
    identities = await conn.fetch(
        "SELECT kind, value FROM identities WHERE caller_id = $1 AND valid ORDER BY id",
        ticket["caller_id"],
    )
    for identity in identities:
        target_channel = REPLY_CHANNEL_OF_IDENTITY.get(identity["kind"])
        if target_channel is None or (channel is not None and target_channel != channel):
            continue
        if accounts.get(target_channel):
            return {"channel": target_channel, "account": accounts[target_channel][0],
                    "sender": identity["value"], "subject": ticket["subject"], "headers": {},
                    "meta": {}, "external_id": None}  # fmt: skip
    wanted = f"on {channel}" if channel else "on any configured channel"
    without_address = await conn.fetchval(
        "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'in'"
        " AND coalesce(btrim(sender), '') = ''",
        ticket["id"],
    )
    if without_address:
        raise ReplyError(
            f"the caller cannot be reached {wanted}: their message has no reply address"
            " (nothing was sent; add a contact to the caller, or call them)"
        )
    raise ReplyError(f"the caller cannot be reached {wanted}: no message or identity to answer")


async def create_reply(
    conn: asyncpg.Connection,
    ticket_id: int,
    body: str,
    *,
    agent_id: int | None,
    actor: str,
    accounts: dict[str, list[str]],
    channel: str | None = None,
) -> dict[str, Any]:
    """Write an outbound message and its outbox row; return the message as stored."""
    ticket = await conn.fetchrow("SELECT * FROM tickets WHERE id = $1 FOR UPDATE", ticket_id)
    if ticket is None:
        raise LookupError(f"ticket {ticket_id} does not exist")
    if channel in ("phone", "walk_in"):
        # What the agent said on the phone is logged on the ticket, nothing is sent.
        target = {"channel": channel, "account": "", "sender": "", "subject": ticket["subject"],
                  "headers": {}, "meta": {}}  # fmt: skip
    else:
        target = await _target(conn, ticket, channel, accounts)
    headers: dict[str, str] = {}
    in_headers = target["headers"] or {}
    if in_headers.get("message-id"):
        headers["in-reply-to"] = in_headers["message-id"]
        headers["references"] = " ".join(
            part for part in (in_headers.get("references", ""), in_headers["message-id"]) if part
        )
    recipient = target["sender"]
    if target["channel"] == "email" and in_headers.get("reply-to"):
        recipient = parseaddr(in_headers["reply-to"])[1].lower() or recipient
    logged_only = target["channel"] in ("phone", "walk_in")
    message = await conn.fetchrow(
        "INSERT INTO messages (ticket_id, caller_id, direction, channel, account, sender, recipient,"
        " subject, body_text, body_display, headers, status, agent_id, sent_at)"
        " VALUES ($1,$2,'out',$3,$4,$5,$6,$7,$8,$8,$9,$10,$11, CASE WHEN $10 = 'sent' THEN now() END)"
        " RETURNING *",
        ticket_id,
        ticket["caller_id"],
        target["channel"],
        target["account"],
        actor,
        recipient,
        target["subject"] or ticket["subject"],
        body,
        headers,
        "sent" if logged_only else "queued",
        agent_id,
    )
    if not logged_only:
        reply = OutboundReply(
            message_id=message["id"],
            ticket_id=ticket_id,
            channel=target["channel"],
            account=target["account"],
            recipient=recipient,
            subject=target["subject"] or ticket["subject"],
            body_text=body,
            headers=headers,
            meta={k: str(v) for k, v in (target["meta"] or {}).items()},
        )
        await enqueue(
            conn, outbound_topic(reply.channel), str(ticket_id).encode(), msgspec.json.encode(reply)
        )
    await conn.execute(
        "UPDATE tickets SET first_response_at = coalesce(first_response_at, now()),"
        " last_activity_at = now(), updated_at = now() WHERE id = $1",
        ticket_id,
    )
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, data) VALUES ($1, $2, $3, 'reply', $4)",
        ticket_id,
        actor,
        agent_id,
        {"message_id": message["id"], "channel": target["channel"]},
    )
    return dict(message)


async def delivery_state(conn: asyncpg.Connection, message_id: int) -> str | None:
    return await conn.fetchval("SELECT status FROM messages WHERE id = $1", message_id)


async def mark_sent(
    conn: asyncpg.Connection, message_id: int, provider_id: str | None
) -> datetime | None:
    """Record a reply sent; returns when it was written, None when it was marked before."""
    row = await conn.fetchrow(
        "UPDATE messages SET status = 'sent', provider_id = coalesce($2, provider_id), sent_at = now(),"
        " status_reason = NULL, attempts = attempts + 1 WHERE id = $1 AND status IN ('queued', 'failed')"
        " RETURNING ticket_id, created_at",
        message_id,
        provider_id,
    )
    if row is None:
        return None
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, data) VALUES ($1, 'delivery', $2)",
        row["ticket_id"],
        {"message_id": message_id, "status": "sent", "provider_id": provider_id},
    )
    created: datetime = row["created_at"]
    return created


async def mark_failed(conn: asyncpg.Connection, message_id: int, reason: str) -> None:
    row = await conn.fetchrow(
        "UPDATE messages SET status = 'failed', status_reason = $2, attempts = attempts + 1"
        " WHERE id = $1 RETURNING ticket_id",
        message_id,
        reason,
    )
    if row is not None:
        await conn.execute(
            "INSERT INTO ticket_events (ticket_id, kind, note, data) VALUES ($1, 'delivery', $2, $3)",
            row["ticket_id"],
            f"delivery failed: {reason}",
            {"message_id": message_id, "status": "failed"},
        )


async def schedule_retry(
    conn: asyncpg.Connection, reply: OutboundReply, delay: float, reason: str
) -> None:
    """Put the reply back in the outbox for a later attempt and say why on the message."""
    await conn.execute(
        "UPDATE messages SET status_reason = $2, attempts = attempts + 1 WHERE id = $1",
        reply.message_id,
        f"retrying in {delay:.0f}s: {reason}",
    )
    again = msgspec.structs.replace(reply, attempt=reply.attempt + 1)
    await enqueue(
        conn,
        outbound_topic(reply.channel),
        str(reply.ticket_id).encode(),
        msgspec.json.encode(again),
        datetime.now(UTC) + timedelta(seconds=delay),
    )


async def apply_receipt(conn: asyncpg.Connection, receipt: DeliveryReceipt) -> int | None:
    """Update a reply's status from a provider's receipt; never moves a status backwards."""
    if receipt.message_id is not None:
        row = await conn.fetchrow(
            "SELECT id, ticket_id, status FROM messages WHERE id = $1 AND direction = 'out' AND channel = $2",
            receipt.message_id,
            receipt.channel,
        )
    else:
        row = await conn.fetchrow(
            "SELECT id, ticket_id, status FROM messages WHERE provider_id = $1 AND direction = 'out'"
            " AND channel = $2 ORDER BY id DESC LIMIT 1",
            receipt.provider_id,
            receipt.channel,
        )
    if row is None:
        return None
    if receipt.status == "failed":
        await mark_failed(conn, row["id"], receipt.reason or "the provider reported a failure")
        return row["id"]
    if _STATUS_RANK.get(receipt.status, -1) <= _STATUS_RANK.get(row["status"], 99):
        return row["id"]
    await conn.execute("UPDATE messages SET status = $2 WHERE id = $1", row["id"], receipt.status)
    await conn.execute(
        "INSERT INTO ticket_events (ticket_id, kind, data) VALUES ($1, 'delivery', $2)",
        row["ticket_id"],
        {"message_id": row["id"], "status": receipt.status},
    )
    return row["id"]


# --- the outbox, as its relay reads it ----------------------------------------------------


async def lock_due_outbox(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Outbox rows due now (`id, topic, key, payload`), oldest first, locked until the
    caller's transaction ends; rows another relay holds are skipped."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id, topic, key, payload FROM outbox WHERE available_at <= now()"
        " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    return rows


async def delete_outbox(conn: asyncpg.Connection, ids: list[int]) -> None:
    """Rows the broker acknowledged."""
    await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", ids)


async def outbox_backlog(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM outbox"))
