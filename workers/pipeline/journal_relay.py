"""The inbound journal at work: webhooks journal then publish; the relay sends the rest, again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import Gauge

from channels.types import RejectedInput
from ticketing import journal
from ticketing.db import is_transient
from workers.pipeline import bus
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)

# How long a webhook waits for the broker once its journal rows are committed; then it
# answers anyway and the relay publishes what was not acknowledged.
PUBLISH_RIGHT_AWAY_SECONDS = 1.0
# An unacknowledged row younger than this may still be in its webhook's hands.
SETTLE_SECONDS = 3.0
# How often the rows webhooks got acknowledged are marked published (see `_Marks`).
MARK_EVERY_SECONDS = 0.1
RELAY_PUBLISH_SECONDS = 15.0
RELAY_BATCH = 500
# A receipt is dropped this long after the broker acknowledged it: the database keeps no key
# that says it was applied, applying one twice changes nothing, and this covers the receipts
# stage's lag and a broker reset soon after the publish.
RECEIPT_GRACE = timedelta(minutes=10)
# A message the broker acknowledged and not stored this long after is published again, then
# after twice as long, and so on: whatever lost it (a broker that restarted before this process
# noticed, a consumer left with the old broker's offsets), the natural key absorbs a copy.
REPUBLISH_AFTER = timedelta(minutes=1)
REPUBLISH_TIMES = 6
# A message written this long ago, published and still not stored, was shunted: the shunt
# topic has it.
ABANDON_AFTER = timedelta(hours=24)

JOURNAL_ROWS = Gauge("loket_inbound_journal_rows", "Inbound journal rows not yet pruned")


class DatabaseUnavailable(Exception):
    """The journal could not be written: the webhook answers 503 and the provider retries."""


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass
class _Sent:
    """What the broker made of journal rows sent together."""

    acknowledged: list[int] = field(default_factory=list)
    refused: list[tuple[int, bus.KafkaError]] = field(default_factory=list)
    error: BaseException | None = None  # why some were not acknowledged (an outage)


async def _send(rt: Runtime, rows: Sequence[tuple[int, bus.Publish]], seconds: float) -> _Sent:
    refused, failed, error = await asyncio.wait_for(
        bus.send_each(rt.producer, [record for _, record in rows]), timeout=seconds
    )
    refusal = {id(r.record): r.error for r in refused}
    failures = {id(record) for record in failed}
    sent = _Sent(error=error)
    for row_id, record in rows:
        if id(record) in refusal:
            sent.refused.append((row_id, refusal[id(record)]))
        elif id(record) not in failures:
            sent.acknowledged.append(row_id)
    return sent


async def accept(rt: Runtime, entries: Sequence[journal.Entry]) -> None:
    """Journal `entries` (the webhook may answer 2xx after this), then publish them right away.

    The publish is best effort: what the broker does not acknowledge in time, the relay
    sends. A record the broker refuses for good is taken out again and its error raised,
    as without the journal.
    """
    try:
        async with rt.pool.acquire() as conn:
            ids = await journal.append(conn, entries)
    except asyncpg.DataError as exc:  # e.g. a NUL in an id: the message could never be stored
        raise RejectedInput(f"cannot be stored: {exc}", status=400) from exc
    except Exception as exc:
        if is_transient(exc):
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        raise
    sent_at = _utc(time.time())
    rows = [
        (row_id, bus.Publish(e.topic, e.value, e.key))
        for row_id, e in zip(ids, entries, strict=True)
    ]
    try:
        sent = await _send(rt, rows, PUBLISH_RIGHT_AWAY_SECONDS)
    except TimeoutError:
        log.info("journaled %d record(s); the broker did not take them in time", len(rows))
        return
    _marks(rt).add(rt, sent.acknowledged, sent_at)
    if sent.refused:
        try:
            async with rt.pool.acquire() as conn:
                await journal.forget(conn, [row_id for row_id, _ in sent.refused])
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("journal: refused records not taken out, the relay will: %s", exc)
        raise sent.refused[0][1]


@dataclass
class _Marks:
    """Rows this process's webhooks got acknowledged, marked published in one statement a tick.

    A mark that is lost (the process stops first, the database is away) only means the relay
    publishes that row once more; one UPDATE per webhook would cost each of them its time.
    """

    ids: list[int] = field(default_factory=list)
    sent_at: datetime | None = None  # the earliest publish among them
    flushing: asyncio.Task[None] | None = None

    def add(self, rt: Runtime, ids: Sequence[int], sent_at: datetime) -> None:
        if not ids:
            return
        self.ids.extend(ids)
        self.sent_at = min(self.sent_at or sent_at, sent_at)
        if self.flushing is None:
            self.flushing = asyncio.create_task(self._flush(rt))

    async def _flush(self, rt: Runtime) -> None:
        await asyncio.sleep(MARK_EVERY_SECONDS)
        ids, sent_at = self.ids, self.sent_at
        self.ids, self.sent_at, self.flushing = [], None, None
        assert sent_at is not None
        try:
            async with rt.pool.acquire() as conn:
                await journal.mark_published(conn, ids, sent_at)
        except Exception as exc:  # nobody awaits this task: say what it means, and go on
            log.warning("journal: %d acknowledged row(s) not marked, the relay publishes them"
                        " again: %s", len(ids), exc)  # fmt: skip


def _marks(rt: Runtime) -> _Marks:
    marks: _Marks = rt.__dict__.setdefault("_journal_marks", _Marks())
    return marks


async def relay_once(rt: Runtime, limit: int = RELAY_BATCH) -> int:
    """Publish the journal rows that are due (see `journal.lock_due`); returns how many."""
    republish = journal.Republish(
        reset_at=_utc(rt.broker_reset_at) if rt.broker_reset_at else None,
        after=REPUBLISH_AFTER,
        times=REPUBLISH_TIMES,
    )
    async with rt.pool.acquire() as conn, conn.transaction():
        sent_at = _utc(time.time())
        due = await journal.lock_due(
            conn, now=sent_at, settle_seconds=SETTLE_SECONDS, republish=republish, limit=limit
        )
        if not due:
            return 0
        rows = [(d.id, bus.Publish(d.topic, d.value, d.key)) for d in due]
        sent = await _send(rt, rows, RELAY_PUBLISH_SECONDS)
        await journal.mark_published(conn, sent.acknowledged, sent_at)
        if sent.refused:
            await journal.forget(conn, [row_id for row_id, _ in sent.refused])
    for row_id, error in sent.refused:
        log.error("journal: row %d refused by the broker for good, dropped: %s", row_id, error)
    acknowledged = set(sent.acknowledged)
    again = sum(1 for d in due if d.published_at is not None and d.id in acknowledged)
    if again:
        log.warning("journal: published %d record(s) again, not yet stored", again)
    if sent.error is not None:
        raise sent.error
    return len(due)


async def prune_once(rt: Runtime) -> journal.Pruned:
    """Drop stored messages, old receipts and long-shunted messages; update the gauge."""
    now = datetime.now(UTC)
    async with rt.pool.acquire() as conn:
        pruned = await journal.prune(
            conn, receipts_before=now - RECEIPT_GRACE, abandon_before=now - ABANDON_AFTER
        )
        JOURNAL_ROWS.set(await journal.backlog(conn))
    if pruned.abandoned:
        log.error(
            "journal: %d message(s) accepted over %s ago, published and never stored (shunted), dropped: %s",
            len(pruned.abandoned), ABANDON_AFTER, pruned.abandoned[:10],
        )  # fmt: skip
    return pruned


async def run_journal_relay(rt: Runtime, stop: asyncio.Event) -> None:
    """Prune, then publish what is due, every second; keep going through outages."""
    delay = 0.2
    while not stop.is_set():
        try:
            await prune_once(rt)
            while not stop.is_set() and await relay_once(rt) > 0:
                pass
            delay = 0.2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, bus.KafkaError)):
                raise
            log.warning("journal relay: %s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
