"""The pipeline's stages: each decodes a batch, calls normalizer/ticketing, and says what to publish."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiokafka.structs import ConsumerRecord

from channels.types import (
    DeliveryReceipt,
    DeliveryResult,
    MatchedInbound,
    OutboundReply,
    encoder,
    matched_decoder,
    raw_decoder,
    reply_decoder,
)
from normalizer import matching
from normalizer.canonical import canonicalize
from ticketing import callers, replies
from ticketing.delivery import next_try
from ticketing.inbound import apply_matched_batch
from workers.pipeline import bus
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)

_receipt_decoder = msgspec.json.Decoder(DeliveryReceipt)


def _decode(decoder: msgspec.json.Decoder, record: ConsumerRecord):  # type: ignore[no-untyped-def]
    try:
        return decoder.decode(record.value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise bus.PoisonMessage(f"cannot decode {record.topic}@{record.offset}: {exc}") from exc


def normalizer_handler(rt: Runtime) -> bus.BatchHandler:
    """RAW -> MATCHED: canonical message, sender matched to a caller (created when new)."""
    own = rt.own_addresses()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        messages = [canonicalize(_decode(raw_decoder, r), own) for r in records]
        normalized_at = repr(time.time())
        for message in messages:
            # Stored with the message, so a trace shows when the normalizer passed it on.
            message.raw.meta["normalized_at"] = normalized_at
        out: list[bus.Publish] = []
        async with rt.pool.acquire() as conn, conn.transaction():
            known = await callers.find_by_identities(
                conn, [m.identity for m in messages if m.identity]
            )
            # Callers for every unknown sender of the batch at once.
            fresh = await callers.create_with_identities(
                conn, matching.unknown_senders(messages, known)
            )
            for message, decision in zip(
                messages, matching.plan(messages, known, fresh), strict=True
            ):
                caller_id, reason = decision.caller_id, decision.reason
                if caller_id is None:
                    caller_id = await callers.create_anonymous(conn, "(sender unknown)")
                for extra in message.extra_identities:
                    holder = await callers.attach_identity(conn, caller_id, extra)
                    if holder != caller_id:
                        caller_id = await callers.merge_on_verified_identity(
                            conn, caller_id, holder, extra
                        )
                        reason = matching.joined(reason, extra, caller_id)
                matched = MatchedInbound(
                    message=message,
                    caller_id=caller_id,
                    caller_created=decision.created,
                    match_reason=reason,
                )
                out.append(
                    bus.Publish(bus.MATCHED, encoder.encode(matched), str(caller_id).encode())
                )
        return out

    return handle


def ticketing_handler(rt: Runtime) -> bus.BatchHandler:
    """MATCHED -> PostgreSQL: one transaction per batch; duplicates are no-ops."""

    own = rt.own_addresses()

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        matched: list[MatchedInbound] = [_decode(matched_decoder, r) for r in records]
        async with rt.pool.acquire() as conn, conn.transaction():
            results = await apply_matched_batch(conn, matched, rt.rules, own)
        applied = [
            (message, result) for message, result in zip(matched, results, strict=True) if result
        ]
        now = time.time()
        out = []
        for message, result in applied:
            accepted = message.message.raw.meta.get("accepted_at")
            if accepted:
                metrics.INGEST_LATENCY.observe(max(now - float(accepted), 0.0))
            out.append(
                bus.Publish(
                    bus.EVENTS, json.dumps(result.event()).encode(), str(result.ticket_id).encode()
                )
            )
        return out

    return handle


def receipts_handler(rt: Runtime) -> bus.BatchHandler:
    """RECEIPTS -> message status (delivered, read, failed)."""

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        receipts = [_decode(_receipt_decoder, r) for r in records]
        async with rt.pool.acquire() as conn, conn.transaction():
            for receipt in receipts:
                await replies.apply_receipt(conn, receipt)
        return []

    return handle


Sender = Callable[[OutboundReply], Awaitable[DeliveryResult]]


def delivery_handler_for(rt: Runtime, channel: str) -> bus.BatchHandler | None:
    """The delivery stage of `channel`, where an account of it is configured."""
    send = rt.senders().get(channel)
    return delivery_handler(rt, channel, send) if send is not None else None


def delivery_handler(rt: Runtime, channel: str, send: Sender) -> bus.BatchHandler:
    """OUTBOUND.<channel> -> provider; temporary failures go back to the outbox with a delay."""
    from channels.types import ChannelError

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        for record in records:
            reply: OutboundReply = _decode(reply_decoder, record)
            async with rt.pool.acquire() as conn:
                state = await replies.delivery_state(conn, reply.message_id)
            if state != "queued":
                continue  # sent already (a redelivered record) or failed for good
            try:
                result = await send(reply)
            except ChannelError as exc:
                delay = next_try(permanent=exc.permanent, attempt=reply.attempt,
                                 max_attempts=rt.settings.max_delivery_attempts,
                                 retry_after=exc.retry_after)  # fmt: skip
                async with rt.pool.acquire() as conn, conn.transaction():
                    if delay is None:
                        await replies.mark_failed(conn, reply.message_id, exc.reason)
                    else:
                        await replies.schedule_retry(conn, reply, delay, exc.reason)
                outcome = "failed" if delay is None else "retry"
                metrics.OUTBOUND.labels(channel, reply.account, outcome).inc()
                continue
            async with rt.pool.acquire() as conn, conn.transaction():
                created = await replies.mark_sent(conn, reply.message_id, result.provider_id)
            metrics.OUTBOUND.labels(channel, reply.account, "sent").inc()
            if created is not None:
                metrics.DELIVERY_LATENCY.observe(max(time.time() - created.timestamp(), 0.0))
        return []

    return handle
