"""Messenger, X and Telegram wiring: delivery senders by account, and pollers for accounts set to poll.

An X or Telegram account polls instead of waiting for webhooks when its config says
`polling = true` (`poll_seconds` sets the pause between empty polls). The cursor is
stored in `channel_cursors` only once what it covers is in the database, because for
Telegram the next getUpdates call with that offset makes the Bot API forget the earlier
updates: a restart then resumes from what was committed, and an outage is backfilled.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from channels import facebook, telegram, twitter
from channels.budget import fit_raw
from channels.types import (
    BlobStore,
    ChannelError,
    DeliveryResult,
    OutboundReply,
    RawInbound,
    encoder,
)
from ticketing import health
from ticketing.db import is_transient
from workers.pipeline import bus
from workers.pipeline.wiring import Sender, StageFactory
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)

Poll = Callable[[Any, str | None, BlobStore | None], Awaitable[tuple[list[RawInbound], str | None]]]

# channel -> (account type, send function)
_SENDERS: dict[str, tuple[Any, Callable[[Any, OutboundReply], Awaitable[DeliveryResult]]]] = {
    "facebook": (facebook.FacebookAccount, facebook.send),
    "twitter": (twitter.TwitterAccount, twitter.send),
    "telegram": (telegram.TelegramAccount, telegram.send),
}
# channel -> (account type, poll function, default seconds between empty polls)
_POLLERS: dict[str, tuple[Any, Poll, float]] = {
    "telegram": (telegram.TelegramAccount, telegram.poll, 2.0),
    # X's read endpoints allow a few hundred calls per 15 minutes; once a minute stays well inside.
    "twitter": (twitter.TwitterAccount, twitter.poll, 60.0),
}
# How long a poller waits for what it published to reach the database before moving on
# anyway: a message that was shunted stays in the shunt topic and must not stall the channel.
COMMIT_WAIT_SECONDS = 120.0
MAX_BACKOFF_SECONDS = 60.0


def senders(rt: Runtime) -> dict[str, Sender]:
    found: dict[str, Sender] = {}
    for channel, (account_type, send) in _SENDERS.items():
        accounts = {e["name"]: account_type.from_config(e) for e in rt.channels.get(channel, [])}
        if accounts:
            found[channel] = _by_account(channel, accounts, send)
    return found


def _by_account(
    channel: str,
    accounts: dict[str, Any],
    send: Callable[[Any, OutboundReply], Awaitable[DeliveryResult]],
) -> Sender:
    async def deliver(reply: OutboundReply) -> DeliveryResult:
        account = accounts.get(reply.account)
        if account is None:
            raise ChannelError(
                f"no {channel} account named {reply.account!r} is configured", permanent=True
            )
        return await send(account, reply)

    return deliver


def polling_enabled(entry: dict[str, Any]) -> bool:
    """Whether an account's config table asks for polling (`polling = true`)."""
    return entry.get("polling") is True


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    found: dict[str, StageFactory] = {}
    for channel, (account_type, poll, default_seconds) in _POLLERS.items():
        for entry in rt.channels.get(channel, []):
            if not polling_enabled(entry):
                continue
            seconds = float(entry.get("poll_seconds", default_seconds))
            # Attachments fetched while polling are held to the same cap as the webhooks'.
            capped = functools.partial(poll, max_attachment_bytes=rt.settings.max_attachment_bytes)
            poller = SocialPoller(rt, channel, account_type.from_config(entry), capped, seconds)
            found[f"poll-{channel}-{entry['name']}"] = poller.run
    return found


class SocialPoller:
    """One polling account: fetch, publish, wait for the database, then store the cursor."""

    def __init__(self, rt: Runtime, channel: str, account: Any, poll: Poll, poll_seconds: float):
        self.rt = rt
        self.channel = channel
        self.account = account
        self.poll = poll
        self.poll_seconds = poll_seconds
        self.last_error: str | None = None

    async def load_cursor(self) -> str | None:
        async with self.rt.pool.acquire() as conn:
            stored = await conn.fetchval(
                "SELECT cursor FROM channel_cursors WHERE channel = $1 AND account = $2 AND scope = ''",
                self.channel,
                self.account.name,
            )
        value = (stored or {}).get("cursor")
        return str(value) if value is not None else None

    async def save_cursor(self, cursor: str) -> None:
        async with self.rt.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO channel_cursors (channel, account, scope, cursor) VALUES ($1, $2, '', $3)"
                " ON CONFLICT (channel, account, scope) DO UPDATE SET cursor = excluded.cursor, updated_at = now()",
                self.channel,
                self.account.name,
                {"cursor": cursor},
            )

    async def _stored_count(self, external_ids: list[str]) -> int:
        async with self.rt.pool.acquire() as conn:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM messages WHERE channel = $1 AND account = $2"
                    " AND direction = 'in' AND external_id = ANY($3::text[])",
                    self.channel,
                    self.account.name,
                    external_ids,
                )
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
        messages, next_cursor = await self.poll(self.account, cursor, self.rt.blobs)
        if messages:
            accepted = repr(time.time())
            for raw in messages:
                fit_raw(raw, self.rt.blobs, self.rt.settings.max_text_chars)
                raw.meta.setdefault("accepted_at", accepted)
            await bus.publish_all(
                self.rt.producer,
                [bus.Publish(bus.RAW, encoder.encode(raw), raw.key()) for raw in messages],
            )
            metrics.INBOUND.labels(self.channel, self.account.name).inc(len(messages))
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
