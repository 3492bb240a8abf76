"""Process assembly: open the runtime (embedded parts where nothing is configured) and supervise stages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from channels import registry as channel_registry
from ticketing.db import create_pool, migrate
from workers.pipeline import bus, registry
from workers.pipeline.wiring import StageFactory
from workers.runtime.embedded import EmbeddedBroker, EmbeddedPostgres
from workers.runtime.runtime import Runtime, load_accounts, load_rules
from workers.runtime.settings import Settings

log = logging.getLogger(__name__)

# The pause before a task is started again; it doubles after each crash, up to 30 s.
RESTART_PAUSE = 0.5


@contextlib.asynccontextmanager
async def open_runtime(
    settings: Settings, *, run_migrations: bool = True
) -> AsyncIterator[Runtime]:
    """Connect to (or start) the database and broker, migrate, create topics, start the producer."""
    started: dict[str, str] = {}
    embedded_pg: EmbeddedPostgres | None = None
    broker: EmbeddedBroker | None = None
    database_url = settings.database_url
    bootstrap = settings.kafka_bootstrap
    channels = load_accounts(settings)  # a wrong account stops the start before anything runs
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        if not database_url:
            embedded_pg = EmbeddedPostgres(settings.data_dir / "postgres")
            database_url = await asyncio.to_thread(embedded_pg.start)
            started["database"] = f"embedded PostgreSQL, data in {settings.data_dir / 'postgres'}"
        if not bootstrap:
            broker = EmbeddedBroker(log_path=settings.data_dir / "broker.log")
            bootstrap = await broker.start()
            started["broker"] = f"embedded Tansu broker on {bootstrap} (in memory)"
        pool = await create_pool(database_url, max_size=12)
        if run_migrations:
            async with pool.acquire() as conn:
                await migrate(conn)
        await bus.ensure_topics(bootstrap, settings.partitions, settings.kafka_replication)
        producer = await bus.start_producer(
            bootstrap, idempotence=settings.kafka_idempotence and broker is None
        )
        from channels.blobs import DiskBlobStore

        rt = Runtime(
            settings=settings,
            database_url=database_url,
            bootstrap=bootstrap,
            pool=pool,
            producer=producer,
            blobs=DiskBlobStore(settings.blobs_path()),
            channels=channels,
            rules=load_rules(settings),
            started=started,
            embedded_broker=broker,
        )
        try:
            yield rt
        finally:
            # Only where the adapters were loaded (webhooks, delivery, pollers): a worker that
            # never needed them does not import every provider's SDK to close nothing.
            for adapter in channel_registry.loaded():
                if adapter.close is None:
                    continue
                try:
                    await adapter.close()
                except Exception as exc:  # shutting down: say so, and stop the rest
                    log.warning("closing the %s adapter failed: %s", adapter.name, exc)
            await producer.stop()
            await pool.close()
    finally:
        if broker is not None:
            broker.stop()
        if embedded_pg is not None:
            await asyncio.to_thread(embedded_pg.stop)


@dataclass
class Supervisor:
    """Runs named tasks and restarts one that crashes, with a growing pause."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    running: dict[str, bool] = field(default_factory=dict)

    async def supervise(self, name: str, factory: StageFactory) -> None:
        delay = RESTART_PAUSE
        while not self.stop.is_set():
            self.running[name] = True
            started = time.monotonic()
            try:
                await factory(self.stop)
                if self.stop.is_set():
                    break
                # A task that ends by itself (a stage replacing its consumer after a broker
                # reset) is started again at once: the growing pause is for crashes.
                log.warning("task %s returned; restarting", name)
                delay = RESTART_PAUSE
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task %s crashed; restarting in %.1fs", name, delay)
            self.running[name] = False
            if time.monotonic() - started > 60:
                delay = RESTART_PAUSE
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
            delay = min(delay * 2, 30.0)
        self.running[name] = False

    async def run(self, tasks: dict[str, StageFactory]) -> None:
        jobs = [
            asyncio.create_task(self.supervise(name, factory), name=name)
            for name, factory in tasks.items()
        ]
        try:
            await self.stop.wait()
            # Let stages finish their batch and leave their groups before anything is cut.
            await asyncio.wait(jobs, timeout=10)
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)


def stage_tasks(rt: Runtime, stage: str) -> dict[str, StageFactory]:
    """The tasks that make up one named stage (`loket worker STAGE`)."""
    return registry.worker(stage).build(rt)


def all_tasks(rt: Runtime) -> dict[str, StageFactory]:
    """Every stage's tasks: what `loket up` runs."""
    tasks: dict[str, StageFactory] = {}
    for worker in registry.WORKERS:
        tasks.update(worker.build(rt))
    return tasks
