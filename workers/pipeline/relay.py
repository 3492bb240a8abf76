"""The outbox relay: publishes rows written with database transactions, then deletes them."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from ticketing import replies
from ticketing.db import is_transient
from workers.pipeline import bus
from workers.pipeline.wiring import StageFactory
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)


async def relay_once(rt: Runtime, limit: int = 1000) -> int:
    """Publish what is due; returns how many rows went out."""
    async with rt.pool.acquire() as conn, conn.transaction():
        rows = await replies.lock_due_outbox(conn, limit)
        if not rows:
            return 0
        await bus.publish_all(
            rt.producer, [bus.Publish(r["topic"], r["payload"], r["key"]) for r in rows]
        )
        await replies.delete_outbox(conn, [r["id"] for r in rows])
    return len(rows)


async def run_relay(rt: Runtime, stop: asyncio.Event) -> None:
    """Wake on NOTIFY or every second; keep going through database and broker outages."""
    wake = asyncio.Event()
    listener: asyncpg.Connection | None = None
    delay = 0.2
    while not stop.is_set():
        try:
            if listener is None or listener.is_closed():
                listener = await asyncpg.connect(rt.database_url)
                await listener.add_listener("loket_outbox", lambda *_: wake.set())
            while await relay_once(rt) > 0:
                pass
            async with rt.pool.acquire() as conn:
                metrics.OUTBOX_BACKLOG.set(await replies.outbox_backlog(conn))
            delay = 0.2
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), timeout=1.0)
            except TimeoutError:
                pass
        except Exception as exc:
            if not (is_transient(exc) or isinstance(exc, bus.KafkaError)):
                raise
            log.warning("relay: %s; retrying in %.1fs", exc, delay)
            listener = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    if listener is not None and not listener.is_closed():
        await listener.close()


def relay_tasks(rt: Runtime) -> dict[str, StageFactory]:
    """The relay worker: the outbox relay, and the inbound journal's where the journal is on."""
    from workers.pipeline.journal_relay import run_journal_relay

    relays: dict[str, StageFactory] = {"relay": lambda stop: run_relay(rt, stop)}
    if rt.settings.journal_inbound():
        relays["journal-relay"] = lambda stop: run_journal_relay(rt, stop)
    return relays
