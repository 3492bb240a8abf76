"""The channel adapters at work: a delivery sender per channel, and pollers for accounts set to poll.

Senders and pollers come from `channels.registry`: a reply goes out through the adapter of
the account it names. An X or Telegram account polls instead of waiting for webhooks when its
config says `polling = true` (`poll_seconds` sets the pause between empty polls). The cursor
is stored in `channel_cursors` only once what it covers is in the database, because for
Telegram the next getUpdates call with that offset makes the Bot API forget the earlier
updates: a restart then resumes from what was committed, and an outage is backfilled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec

from channels import registry
from channels.base import Adapter, Context
from channels.types import ChannelError, DeliveryResult, OutboundReply, RawInbound
from normalizer.phone import normalize_phone
from ticketing import cursors, health
from ticketing.db import is_transient
from workers.pipeline import bus, intake
from workers.pipeline.wiring import Sender, StageFactory
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)

# How long a poller waits for what it published to reach the database before moving on
# anyway: a message that was shunted stays in the shunt topic and must not stall the channel.
COMMIT_WAIT_SECONDS = 120.0
MAX_BACKOFF_SECONDS = 60.0


def channel_accounts(rt: Runtime, channel: str) -> dict[str, tuple[Adapter[Any], Any]]:
    """Every account of `channel` by name, with the adapter of its provider."""
    return {entry["name"]: registry.account_of(channel, entry)
            for entry in rt.channels.get(channel, [])}  # fmt: skip


def senders(rt: Runtime) -> dict[str, Sender]:
    found: dict[str, Sender] = {}
    for channel in dict.fromkeys(a.channel for a in registry.adapters() if a.send is not None):
        accounts = channel_accounts(rt, channel)
        if accounts:
            found[channel] = _by_account(channel, accounts, rt.adapter_context())
    return found


def sms_recipient(recipient: str) -> str:
    """The caller's number in E.164 when it is a valid number, else as the gateway gave it.

    An MO's sender may arrive national (`0812…`) or without its plus (`62812…`); gateways
    route an MT reliably only in international form. Short codes stay as they are.
    """
    identity = normalize_phone(recipient)
    return identity.value if identity.valid else recipient.strip()


def _by_account(
    channel: str, accounts: dict[str, tuple[Adapter[Any], Any]], ctx: Context
) -> Sender:
    async def deliver(reply: OutboundReply) -> DeliveryResult:
        found = accounts.get(reply.account)
        if found is None:
            raise ChannelError(
                f"no {channel} account named {reply.account!r} is configured", permanent=True
            )
        adapter, account = found
        if adapter.send is None:
            raise ChannelError(f"{adapter.name} cannot send replies", permanent=True)
        if channel == "sms":
            reply = msgspec.structs.replace(reply, recipient=sms_recipient(reply.recipient))
        return await adapter.send(account, reply, ctx)

    return deliver


def polling_enabled(entry: dict[str, Any]) -> bool:
    """Whether an account's config table asks for polling (`polling = true`)."""
    return entry.get("polling") is True


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    found: dict[str, StageFactory] = {}
    for adapter in registry.adapters():
        if adapter.poll is None:
            continue
        for entry in rt.channels.get(adapter.channel, []):
            if not adapter.owns(entry) or not polling_enabled(entry):
                continue
            seconds = float(entry.get("poll_seconds", adapter.poll_seconds))
            poller = Poller(rt, adapter, adapter.account(entry), seconds)
            found[f"poll-{adapter.channel}-{entry['name']}"] = poller.run
    return found


class Poller:
    """One polling account: fetch, publish, wait for the database, then store the cursor."""

    def __init__(self, rt: Runtime, adapter: Adapter[Any], account: Any, poll_seconds: float):
        assert adapter.poll is not None
        self.rt = rt
        self.adapter = adapter
        self.channel = adapter.channel
        self.account = account
        self.poll = adapter.poll
        self.poll_seconds = poll_seconds
        self.last_error: str | None = None

    async def load_cursor(self) -> str | None:
        async with self.rt.pool.acquire() as conn:
            stored = await cursors.load(conn, self.channel, self.account.name)
        value = (stored or {}).get("cursor")
        return str(value) if value is not None else None

    async def save_cursor(self, cursor: str) -> None:
        async with self.rt.pool.acquire() as conn:
            await cursors.save(conn, self.channel, self.account.name, {"cursor": cursor})

    async def _stored_count(self, external_ids: list[str]) -> int:
        async with self.rt.pool.acquire() as conn:
            return len(
                await cursors.stored_ids(conn, self.channel, self.account.name, external_ids)
            )

    async def wait_committed(self, messages: list[RawInbound], stop: asyncio.Event) -> bool:
        """Wait until the published messages are in the database; False if stopped first."""
        external_ids = sorted({raw.external_id for raw in messages})
        deadline = time.monotonic() + COMMIT_WAIT_SECONDS
        pause = 0.05
        while await self._stored_count(external_ids) < len(external_ids):
            if stop.is_set():
                return False
            if time.monotonic() > deadline:
                log.warning(
                    "%s/%s: %d published messages not in the database after %.0fs; moving on",
                    self.channel,
                    self.account.name,
                    len(external_ids),
                    COMMIT_WAIT_SECONDS,
                )
                return True
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        return True

    async def poll_once(self, cursor: str | None, stop: asyncio.Event) -> tuple[int, str | None]:
        """One round: returns how many messages were published and the cursor to continue from."""
        messages, next_cursor = await self.poll(self.account, cursor, self.rt.adapter_context())
        if messages:
            await intake.publish_inbound(self.rt, messages)
            if not await self.wait_committed(messages, stop):
                return len(messages), cursor  # stopping: the next start fetches these again
        if next_cursor is not None and next_cursor != cursor:
            await self.save_cursor(next_cursor)
            cursor = next_cursor
        return len(messages), cursor

    async def run(self, stop: asyncio.Event) -> None:
        delay = 1.0
        cursor: str | None = None
        loaded = False
        while not stop.is_set():
            try:
                if not loaded:
                    cursor, loaded = await self.load_cursor(), True
                published, cursor = await self.poll_once(cursor, stop)
                metrics.channel_ok(self.channel, self.account.name, time.time())
                await health.note_channel_ok(self.rt.pool, self.channel, self.account.name)
                self.last_error, delay = None, 1.0
                # A full batch may have more behind it: poll again at once.
                pause = 0.0 if published else self.poll_seconds
            except (ChannelError, OSError, TimeoutError, bus.KafkaError) as exc:
                await self._down(exc)
                hint = exc.retry_after if isinstance(exc, ChannelError) else None
                pause = max(delay, hint or 0.0)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await self._down(exc)
                pause, delay = delay, min(delay * 2, MAX_BACKOFF_SECONDS)
            if pause > 0 and not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=pause)
                except TimeoutError:
                    pass

    async def _down(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        metrics.channel_down(self.channel, self.account.name)
        log.warning("%s/%s: %s", self.channel, self.account.name, self.last_error)
        await health.note_channel_down(
            self.rt.pool, self.channel, self.account.name, self.last_error
        )
