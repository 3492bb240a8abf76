"""The inbound journal against PostgreSQL and a real broker: what is due, what is pruned, the relay."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer

from channels.blobs import DiskBlobStore
from channels.types import (
    InboundMessage,
    MatchedInbound,
    RawInbound,
    RejectedInput,
    WebhookOutcome,
    encoder,
    raw_decoder,
)
from tests.support import db
from tests.support.broker import TansuBroker
from ticketing import callers, journal
from ticketing.db import create_pool, migrate
from ticketing.inbound import apply_matched
from ticketing.rules import TicketRules
from workers.pipeline import bus, intake, journal_relay
from workers.runtime.runtime import Runtime
from workers.runtime.settings import Settings
from workers.web import webhooks

RULES = TicketRules(followup_window=timedelta(days=7))


@pytest.fixture
def now() -> datetime:
    """The test's own clock reading: a module-level one goes stale in a long run."""
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def journal_db() -> Iterator[str]:
    """A database of this module's own: pruning and relaying look at every row."""
    url = db.create_database("loket_journal")
    yield url
    db.drop_database(url)


@pytest.fixture
async def pool(journal_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(journal_db, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        await conn.execute("DELETE FROM inbound_journal")
    yield pool
    await pool.close()


@pytest.fixture
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as conn:
        yield conn


def sms(external_id: str | None = None) -> RawInbound:
    return RawInbound(
        channel="sms", account="journal", external_id=external_id or uuid.uuid4().hex,
        sender="081234567890", body_text="Listrik padam sejak pagi.",
    )  # fmt: skip


def entry_of(raw: RawInbound) -> journal.Entry:
    natural_key = (raw.channel, raw.account, raw.external_id)
    return journal.Entry(bus.RAW, encoder.encode(raw), raw.key(), natural_key)


def receipt_entry() -> journal.Entry:
    return journal.Entry(bus.RECEIPTS, b'{"channel":"sms","status":"delivered"}', b"ref-1")


async def store(conn: asyncpg.Connection, raw: RawInbound) -> None:
    """Ticketing's write of the message, as the pipeline does it."""
    async with conn.transaction():
        caller_id = await callers.create_anonymous(conn, "Penelepon")
        message = InboundMessage(raw=raw, identity=None, body_display=raw.body_text)
        await apply_matched(conn, MatchedInbound(message=message, caller_id=caller_id), RULES)


def republish(reset_at: datetime | None = None) -> journal.Republish:
    return journal.Republish(reset_at=reset_at, after=timedelta(minutes=1), times=3)


async def lock_due(
    conn: asyncpg.Connection,
    *,
    now: datetime | None = None,
    settle_seconds: float = 0,
    reset_at: datetime | None = None,
    limit: int = 100,
) -> list[int]:
    due = await journal.lock_due(
        conn,
        now=now or datetime.now(UTC),
        settle_seconds=settle_seconds,
        republish=republish(reset_at),
        limit=limit,
    )
    return [d.id for d in due]


async def due_ids(conn: asyncpg.Connection, **kw: Any) -> list[int]:
    async with conn.transaction():
        return await lock_due(conn, **kw)


# --- the table -------------------------------------------------------------------------------


async def test_append_keeps_order_and_natural_keys(conn: asyncpg.Connection) -> None:
    raws = [sms() for _ in range(3)]
    ids = await journal.append(conn, [entry_of(raws[0]), receipt_entry(), entry_of(raws[2])])
    rows = await conn.fetch(
        "SELECT id, topic, key, value, channel, account, external_id, published_at"
        " FROM inbound_journal ORDER BY id"
    )
    assert [r["id"] for r in rows] == ids
    assert [r["topic"] for r in rows] == [bus.RAW, bus.RECEIPTS, bus.RAW]
    assert rows[0]["value"] == encoder.encode(raws[0]) and rows[0]["key"] == raws[0].key()
    assert (rows[2]["channel"], rows[2]["account"], rows[2]["external_id"]) == (
        "sms", "journal", raws[2].external_id,
    )  # fmt: skip
    assert rows[1]["external_id"] is None and all(r["published_at"] is None for r in rows)


async def test_unpublished_rows_are_due_oldest_first_once_settled(
    conn: asyncpg.Connection, now: datetime
) -> None:
    ids = await journal.append(conn, [entry_of(sms()) for _ in range(3)])
    async with conn.transaction():
        fresh = await lock_due(conn, settle_seconds=60)
    assert fresh == []  # still in the hands of the webhooks that wrote them
    assert await due_ids(conn) == ids
    await journal.mark_published(conn, ids[:2], now)
    assert await due_ids(conn) == ids[2:]


async def test_rows_published_before_a_broker_reset_are_due_again(
    conn: asyncpg.Connection, now: datetime
) -> None:
    before, after = await journal.append(conn, [entry_of(sms()), entry_of(sms())])
    await journal.mark_published(conn, [before], now - timedelta(seconds=5))
    await journal.mark_published(conn, [after], now + timedelta(seconds=1))
    assert await due_ids(conn, reset_at=now) == [before]
    # A late mark from an earlier publish does not hide a later one.
    await journal.mark_published(conn, [after], now - timedelta(seconds=10))
    assert await due_ids(conn, reset_at=now) == [before]


async def test_an_acknowledged_message_not_stored_is_published_again_ever_more_rarely(
    conn: asyncpg.Connection, now: datetime
) -> None:
    (message,) = await journal.append(conn, [entry_of(sms())])
    (receipt,) = await journal.append(conn, [receipt_entry()])
    published = now
    await journal.mark_published(conn, [message, receipt], published)
    # Due a minute after the first publish, two after the second, four after the third.
    for wait in (1, 2, 4):
        assert await due_ids(conn, now=published + timedelta(minutes=wait, seconds=-1)) == []
        later = published + timedelta(minutes=wait, seconds=1)
        assert await due_ids(conn, now=later) == [message]  # a receipt is never stored: not it
        published = later
        await journal.mark_published(conn, [message], published)
    # Three times at most (`times`): then it waits to be stored or given up on.
    assert await due_ids(conn, now=published + timedelta(days=1)) == []


async def test_due_rows_locked_by_one_relay_are_skipped_by_another(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as first, pool.acquire() as second:
        ids = await journal.append(first, [entry_of(sms()) for _ in range(4)])
        async with first.transaction():
            taken = await lock_due(first, limit=2)
            async with second.transaction():
                rest = await lock_due(second)
    assert taken == ids[:2] and rest == ids[2:]


async def test_prune_removes_stored_messages_old_receipts_and_long_shunted_ones(
    conn: asyncpg.Connection, now: datetime
) -> None:
    stored, waiting, shunted = sms(), sms(), sms()
    ids = await journal.append(
        conn, [entry_of(stored), entry_of(waiting), entry_of(shunted), receipt_entry(), receipt_entry()]
    )  # fmt: skip
    await journal.mark_published(conn, ids[:2], now)
    await journal.mark_published(conn, [ids[3]], now - timedelta(hours=30))
    await journal.mark_published(conn, [ids[2]], now - timedelta(hours=1))
    await conn.execute(
        "UPDATE inbound_journal SET created_at = now() - interval '30 hours' WHERE id = $1", ids[2]
    )
    await store(conn, stored)

    pruned = await journal.prune(
        conn, receipts_before=now - timedelta(minutes=10), abandon_before=now - timedelta(hours=24)
    )

    assert (pruned.stored, pruned.receipts) == (1, 1)
    assert pruned.abandoned == [("sms", "journal", shunted.external_id)]
    left = [r["id"] for r in await conn.fetch("SELECT id FROM inbound_journal ORDER BY id")]
    # Waiting for ticketing, and a receipt never published: both kept.
    assert left == [ids[1], ids[4]]
    assert await journal.backlog(conn) == 2


def test_journal_setting_follows_the_broker_unless_set() -> None:
    assert Settings(kafka_bootstrap=None).journal_inbound()
    assert not Settings(kafka_bootstrap="kafka:9092").journal_inbound()
    assert Settings(kafka_bootstrap="kafka:9092", inbound_journal="on").journal_inbound()
    assert not Settings(kafka_bootstrap=None, inbound_journal="off").journal_inbound()


# --- with a broker -----------------------------------------------------------------------------


@pytest.fixture
async def runtime(
    pool: asyncpg.Pool, journal_db: str, tmp_path: Path
) -> AsyncIterator[tuple[Runtime, TansuBroker]]:
    broker = TansuBroker.start(log_dir=tmp_path)
    settings = Settings(
        database_url=journal_db, kafka_bootstrap=broker.bootstrap, inbound_journal="on",
        data_dir=tmp_path / "data", partitions=1,
    )  # fmt: skip
    await bus.ensure_topics(broker.bootstrap, 1)
    producer = bus.make_producer(broker.bootstrap, idempotence=False)
    await producer.start()
    rt = Runtime(
        settings=settings, database_url=journal_db, bootstrap=broker.bootstrap, pool=pool,
        producer=producer, blobs=DiskBlobStore(tmp_path / "blobs"), channels={}, rules=RULES,
    )  # fmt: skip
    try:
        yield rt, broker
    finally:
        await producer.stop()
        broker.kill()


async def raw_ids(bootstrap: str, want: int, wait_seconds: float = 20) -> list[str]:
    """External ids on the raw topic, in offset order, once `want` are there."""
    consumer = AIOKafkaConsumer(
        bus.RAW, bootstrap_servers=bootstrap, group_id=f"t-{uuid.uuid4().hex[:6]}",
        auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    found: list[str] = []
    deadline = time.monotonic() + wait_seconds
    try:
        while len(found) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found.extend(raw_decoder.decode(r.value).external_id for r in records)
    finally:
        await consumer.stop()
    return found


async def published_at(conn: asyncpg.Connection) -> list[datetime | None]:
    return [r["published_at"] for r in await conn.fetch("SELECT published_at FROM inbound_journal ORDER BY id")]  # fmt: skip


@pytest.mark.slow
async def test_accept_publishes_right_away_and_the_relay_covers_an_outage_and_a_reset(
    runtime: tuple[Runtime, TansuBroker], conn: asyncpg.Connection
) -> None:
    rt, broker = runtime
    first = sms("first")
    await journal_relay.accept(rt, [entry_of(first)])
    # Acknowledged inside the request; marked published a moment later, with other webhooks'.
    await asyncio.sleep(journal_relay.MARK_EVERY_SECONDS + 0.5)
    assert all(await published_at(conn))
    assert await raw_ids(rt.bootstrap, 1) == ["first"]

    # The broker is away: the webhook still returns soon, its row waits for the relay.
    await asyncio.to_thread(broker.stop)
    started = time.monotonic()
    await journal_relay.accept(rt, [entry_of(sms("during"))])
    assert time.monotonic() - started < journal_relay.PUBLISH_RIGHT_AWAY_SECONDS + 1
    await asyncio.sleep(journal_relay.MARK_EVERY_SECONDS + 0.5)
    assert (await published_at(conn))[1] is None

    # It comes back empty; the runtime's watch notices, and the relay sends both again.
    await asyncio.to_thread(broker._launch)
    await bus.ensure_topics(rt.bootstrap, 1)
    rt.broker_epoch += 1
    rt.broker_reset_at = time.time()
    await conn.execute(
        "UPDATE inbound_journal SET created_at = created_at - interval '1 minute'"
    )  # settled
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if await journal_relay.relay_once(rt) == 0:
                break
        except (bus.KafkaError, TimeoutError):
            await asyncio.sleep(0.5)  # the producer is still reconnecting
    reset_at = datetime.fromtimestamp(rt.broker_reset_at, UTC)
    assert all(at is not None and at >= reset_at for at in await published_at(conn))
    # Both are on the new broker (the one the producer had in hand may be there twice).
    assert set(await raw_ids(rt.bootstrap, 2)) == {"during", "first"}

    await store(conn, first)
    pruned = await journal_relay.prune_once(rt)
    assert pruned.stored == 1 and await journal.backlog(conn) == 1


@pytest.mark.slow
async def test_a_record_over_the_broker_limit_is_refused_for_good_and_not_kept(
    runtime: tuple[Runtime, TansuBroker], conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, _ = runtime
    huge = sms()
    huge.headers = {"x-padding": "a" * 1_200_000}
    with pytest.raises(bus.MessageSizeTooLargeError):
        await journal_relay.accept(rt, [entry_of(huge)])
    assert await journal.backlog(conn) == 0  # nothing for the relay to retry for ever
    # The edge's budget (channels/budget.py) keeps such a record from being made; should one
    # slip past it, the webhook refuses it for good instead of answering "broker unavailable".
    monkeypatch.setattr(intake, "fit_raw", lambda *_: False)
    outcome = WebhookOutcome(messages=[huge])
    with pytest.raises(RejectedInput) as refused:
        await webhooks.publish_outcome(rt, outcome)
    assert refused.value.status == 413 and "cannot be stored" in refused.value.reason
    assert await journal.backlog(conn) == 0
    # Without the journal, the same answer.
    rt.settings = rt.settings.model_copy(update={"inbound_journal": "off"})
    with pytest.raises(RejectedInput) as again:
        await webhooks.publish_outcome(rt, outcome)
    assert again.value.status == 413


async def test_accept_without_the_database_raises_database_unavailable(tmp_path: Path) -> None:
    from tests.support.ports import free_port

    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    pool = await asyncpg.create_pool(nowhere, min_size=0, max_size=1)
    rt = Runtime(
        settings=Settings(inbound_journal="on", data_dir=tmp_path), database_url=nowhere,
        bootstrap="", pool=pool, producer=None, blobs=DiskBlobStore(tmp_path / "blobs"),  # type: ignore[arg-type]
        channels={}, rules=RULES,
    )  # fmt: skip
    try:
        with pytest.raises(journal_relay.DatabaseUnavailable):  # the webhook answers 503
            await journal_relay.accept(rt, [entry_of(sms())])
    finally:
        await pool.close()
