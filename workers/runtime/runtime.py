"""What every stage of one process shares: settings, pool, producer, blob store, accounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from channels.base import Context
from channels.blobs import DiskBlobStore
from channels.email.smtp import EmailAccount
from channels.types import CHANNELS
from ticketing.rules import TicketRules
from workers.pipeline import bus
from workers.pipeline.stage import Stage
from workers.runtime.embedded import EmbeddedBroker
from workers.runtime.settings import ConfigError, Settings, load_channels, other_sections

log = logging.getLogger(__name__)
# How often the topics of the embedded broker are looked at while its process runs.
EMBEDDED_LOOK_SECONDS = 15.0
StageFactory = Callable[[asyncio.Event], Awaitable[None]]


@dataclass
class Runtime:
    settings: Settings
    database_url: str
    bootstrap: str
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    blobs: DiskBlobStore
    channels: dict[str, list[dict[str, Any]]]
    rules: TicketRules
    started: dict[str, str] = field(
        default_factory=dict
    )  # what infrastructure this process started
    # How often the broker came back without its topics (an in-memory broker restarted).
    broker_epoch: int = 0
    # When this process last saw that (time.time()); 0 when it never did.
    broker_reset_at: float = 0.0
    # The broker this process started (nothing configured); started again when it dies.
    embedded_broker: EmbeddedBroker | None = None
    # `loket up --demo`: the demo accounts and the sinks that answer replies on them
    # (workers/tools/demo/sinks.py); None otherwise.
    demo: Any = None
    _senders: dict[str, Any] | None = field(default=None, init=False, repr=False)
    _adapter_context: Context | None = field(default=None, init=False, repr=False)

    def adapter_context(self) -> Context:
        """What channel adapters get from this process: blobs, limits, public URL, HTTP pool."""
        if self._adapter_context is None:
            self._adapter_context = Context(
                blobs=self.blobs, max_attachment_bytes=self.settings.max_attachment_bytes,
                public_url=self.settings.public_base(), http=httpx.AsyncClient(),
            )  # fmt: skip
        return self._adapter_context

    def senders(self) -> dict[str, Any]:
        """The delivery function of each outbound channel with accounts, built once."""
        if self._senders is None:
            from workers.pipeline.wiring import all_senders

            self._senders = all_senders(self)
            if self.demo is not None:
                self._senders.update(self.demo.senders())
        return self._senders

    def stage_task(
        self,
        name: str,
        topics: list[str],
        handler: bus.BatchHandler,
        *,
        group_id: str | None = None,
        batch_size: int = 500,
        idle_fetch_wait_ms: int = bus.IDLE_FETCH_MAX_WAIT_MS,
    ) -> StageFactory:
        """A supervised consumer-group stage running `handler` over `topics`."""

        async def run(stop: asyncio.Event) -> None:
            stage = Stage(
                name=name, topics=topics, handle=handler, bootstrap=self.bootstrap,
                producer=self.producer, max_attempts=self.settings.max_attempts,
                batch_size=batch_size, group_id=group_id, partitions=self.settings.partitions,
                replication=self.settings.kafka_replication, epoch=lambda: self.broker_epoch,
                idle_fetch_wait_ms=idle_fetch_wait_ms,
            )  # fmt: skip
            watcher = asyncio.create_task(_stop_when(stop, stage.stop))
            try:
                await stage.run()
            finally:
                watcher.cancel()

        return run

    async def watch_broker(self, stop: asyncio.Event) -> None:
        """Notice a broker that came back empty, recreate the topics, and bump the epoch.

        The embedded broker keeps everything in memory: after a restart its topics, offsets
        and groups are gone, and consumers that kept their old positions would skip the
        first messages of the new topics. Stages and pollers restart on a new epoch. The
        marker topic tells: a webhook accepted right after the restart creates its own topic
        again, but nothing ever creates the marker except `ensure_topics`. An embedded broker
        that died is started again here, and that is a reset whatever the marker says.
        """
        reset = False
        last_look = time.monotonic()
        while not stop.is_set():
            try:
                broker = self.embedded_broker
                if broker is not None and not broker.running:
                    log.warning("the embedded broker stopped; starting it again (empty)")
                    # Before it is back: no stage may commit its old positions to the new one.
                    self.broker_epoch += 1
                    await broker.restart()
                    reset = True
                # A broker elsewhere may restart unseen: its topics are looked at every second.
                # The embedded one loses them only when its process dies, seen above; it is
                # looked at now and then all the same, so an idle process asks it little.
                if not (
                    reset or broker is None or time.monotonic() - last_look > EMBEDDED_LOOK_SECONDS
                ):
                    await _pause(stop, 1.0)
                    continue
                last_look = time.monotonic()
                metadata = await asyncio.wait_for(
                    self.producer.client.fetch_all_metadata(), timeout=5
                )
                if reset or bus.MARKER not in metadata.topics():
                    await bus.ensure_topics(
                        self.bootstrap, self.settings.partitions, self.settings.kafka_replication
                    )
                    reset = False
                    self.broker_epoch += 1
                    self.broker_reset_at = time.time()
                    # The producer's partitions are the old broker's: topics created again may
                    # have other counts, and a record sent to a partition that is gone fails.
                    with contextlib.suppress(bus.KafkaError, OSError, TimeoutError):
                        await asyncio.wait_for(self.producer.client.force_metadata_update(), 5)
                    log.warning(
                        "the broker came back without its topics; recreated them (epoch %d)",
                        self.broker_epoch,
                    )
            except (bus.KafkaError, OSError, TimeoutError) as exc:
                log.debug("broker watch: %s", exc)
            except RuntimeError as exc:  # the embedded broker did not come up: try again
                log.error("broker watch: %s", exc)
            await _pause(stop, 1.0)

    @property
    def email_accounts(self) -> dict[str, EmailAccount]:
        return {e["name"]: EmailAccount.from_config(e) for e in self.channels.get("email", [])}

    def account_names(self) -> dict[str, list[str]]:
        """Configured account names by outbound channel, for choosing where a reply goes."""
        names = {kind: [a["name"] for a in entries] for kind, entries in self.channels.items()}
        for kind, demo_names in (self.demo.account_names() if self.demo else {}).items():
            names[kind] = [*names.get(kind, []), *demo_names]
        return names

    def own_addresses(self) -> frozenset[str]:
        return frozenset(a.address.lower() for a in self.email_accounts.values())


def load_rules(settings: Settings) -> TicketRules:
    return TicketRules.from_config(settings.followup_days, other_sections(settings.config))


def load_accounts(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """Every channel account of the TOML file, each parsed by its channel once to check it.

    An account its provider refuses (a Kannel `inbound_secret` that is too short, a fax
    gateway without a number) is a ConfigError naming the file, the entry and the reason,
    before anything starts.
    """
    channels = load_channels(settings.config)
    for channel, entries in channels.items():
        for entry in entries:
            try:
                _parse_account(channel, entry)
            except (ValueError, TypeError, KeyError) as exc:
                reason = str(exc) if isinstance(exc, ValueError) else f"missing or wrong {exc}"
                if not reason.startswith("channels."):
                    reason = f"channels.{channel} {entry.get('name')!r}: {reason}"
                raise ConfigError(f"{settings.config}: {reason}") from None
    return channels


def _parse_account(channel: str, entry: dict[str, Any]) -> None:
    from channels import registry

    if channel == "email":
        EmailAccount.from_config(entry)
    elif channel == "fax":
        from workers.pipeline.wiring.fax import fax_setup

        fax_setup(entry)
    elif registry.adapters(channel):
        registry.account_of(channel, entry)
    elif channel not in CHANNELS:
        log.warning("channels.%s in the configuration is no channel loket knows; ignored", channel)


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _stop_when(stop: asyncio.Event, action: Callable[[], None]) -> None:
    await stop.wait()
    action()
