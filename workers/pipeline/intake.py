"""The one way in: what a webhook, a poller, the demo or the bench received, onto the broker.

Every message is fitted to the text budget (`LOKET_MAX_TEXT_CHARS`, the full text kept in
the blob store), stamped with when it was accepted (`meta["accepted_at"]`, for the latency
figures) and counted; `publish_inbound` returns once the broker acknowledged every record,
or, with the inbound journal, once PostgreSQL holds them: only then may a source answer
2xx or move its cursor.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from channels.budget import fit_raw
from channels.types import DeliveryReceipt, RawInbound, encoder
from ticketing import journal
from workers.pipeline import bus
from workers.runtime import metrics
from workers.runtime.runtime import Runtime


def _prepare(rt: Runtime, raws: Sequence[RawInbound], topic: str) -> list[journal.Entry]:
    accepted_at = repr(time.time())
    entries = []
    for raw in raws:
        fit_raw(raw, rt.blobs, rt.settings.max_text_chars)
        raw.meta.setdefault("accepted_at", accepted_at)
        natural_key = (raw.channel, raw.account, raw.external_id)
        entries.append(journal.Entry(topic, encoder.encode(raw), raw.key(), natural_key))
    return entries


def _count(raws: Sequence[RawInbound]) -> None:
    for (channel, account), n in Counter((r.channel, r.account) for r in raws).items():
        metrics.INBOUND.labels(channel, account).inc(n)


async def publish_inbound(
    rt: Runtime,
    raws: Sequence[RawInbound],
    *,
    receipts: Sequence[DeliveryReceipt] = (),
    topic: str = bus.RAW,
    journaled: bool = False,
) -> None:
    """Publish messages (to `topic`) and delivery receipts; return once they are safe.

    `journaled`: written to the inbound journal first (see `journal_relay.accept`), safe once
    PostgreSQL committed them. Otherwise safe once the broker acknowledged every record.
    A record the broker can never take raises one of
    `bus.UNWRITABLE_ERRORS`; an outage raises `bus.KafkaError`, `TimeoutError` or `OSError`.
    """
    entries = _prepare(rt, raws, topic)
    for receipt in receipts:
        key = (receipt.provider_id or "").encode()
        entries.append(journal.Entry(bus.RECEIPTS, encoder.encode(receipt), key))
    if journaled:
        from workers.pipeline import journal_relay

        await journal_relay.accept(rt, entries)
    else:
        records = [bus.Publish(e.topic, e.value, e.key) for e in entries]
        await bus.publish_all(rt.producer, records)
    _count(raws)


async def send_inbound(rt: Runtime, raw: RawInbound, topic: str = bus.RAW) -> asyncio.Future[Any]:
    """Send one message without waiting: the future is the broker's acknowledgement.

    For a source that keeps many sends in flight (the bench); it must await every future
    before it counts the messages as accepted.
    """
    [entry] = _prepare(rt, [raw], topic)
    sent = await rt.producer.send(entry.topic, entry.value, key=entry.key)
    _count([raw])
    return sent
