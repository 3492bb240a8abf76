"""Telegram: webhook Updates and getUpdates polling into RawInbound, replies via sendMessage."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import httpx
from telegram import Message, Update
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import AIORateLimiter, ExtBot

from channels import media
from channels.base import Adapter, poll_with_media, send_without_context, webhook_with_media
from channels.social.common import (
    dropped_attachment,
    json_object,
    same_secret,
    stored_attachment,
)
from channels.types import (
    AttachmentRef,
    BlobStore,
    ChannelError,
    DeliveryResult,
    OutboundReply,
    RawInbound,
    RejectedInput,
    WebhookOutcome,
    checked_inbound,
    message_epoch,
)

CHANNEL = "telegram"
MAX_DOWNLOAD = 20 * 1024 * 1024  # the Bot API refuses getFile for larger files anyway


@dataclass(frozen=True)
class TelegramAccount:
    """One Telegram bot."""

    name: str
    token: str = field(repr=False)
    secret_token: str = field(repr=False)
    api_url: str = "https://api.telegram.org"

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> TelegramAccount:
        """Build from a config table whose secrets are already resolved."""
        return cls(
            name=str(d["name"]),
            token=str(d["token"]),
            secret_token=str(d.get("secret_token") or ""),
            api_url=str(d.get("api_url") or cls.api_url).rstrip("/"),
        )

    def file_policy(self, max_bytes: int) -> media.MediaPolicy:
        """Files come from the Bot API server itself (`api_url`), no larger than `max_bytes`."""
        url = httpx.URL(self.api_url)
        port = url.port or media.DEFAULT_PORTS.get(url.scheme, 443)
        host = f"[{url.host}]" if ":" in url.host else url.host
        rules = media.parse_hosts([f"{host}:{port}"], f"channels.telegram {self.name!r}")
        return media.MediaPolicy(rules, min(max_bytes, MAX_DOWNLOAD))


# One bot per account and event loop: its HTTP pool belongs to the loop, and its rate
# limiter only paces sends if every send of the account goes through the same instance.
_bots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[TelegramAccount, ExtBot[int]]]
_bots = weakref.WeakKeyDictionary()


async def bot_for(account: TelegramAccount) -> ExtBot[int]:
    """The initialized bot of an account on the running loop (created on first use)."""
    per_loop = _bots.setdefault(asyncio.get_running_loop(), {})
    bot = per_loop.get(account)
    if bot is None:
        bot = ExtBot(
            account.token,
            base_url=f"{account.api_url}/bot",
            base_file_url=f"{account.api_url}/file/bot",
            # max_retries=0: a flood-wait is handed back to the pipeline, which reschedules
            # the reply instead of holding a worker asleep.
            rate_limiter=AIORateLimiter(max_retries=0),
        )
        per_loop[account] = bot
    try:
        await bot.initialize()
    except TelegramError as exc:
        raise _channel_error(exc) from exc
    return bot


async def close_bots() -> None:
    """Shut down the bots opened on the running loop (call at worker shutdown)."""
    per_loop = _bots.pop(asyncio.get_running_loop(), {})
    for bot in per_loop.values():
        await bot.shutdown()


async def handle_webhook(
    account: TelegramAccount,
    method: str,
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes,
    blobs: BlobStore | None = None,
    max_attachment_bytes: int = media.DEFAULT_MAX_BYTES,
) -> WebhookOutcome:
    """Check the secret token header and turn one Update into RawInbound messages.

    Raises ChannelError (not permanent) when an attachment cannot be fetched right now;
    answering non-2xx then makes Telegram deliver the Update again.
    """
    if method.upper() != "POST":
        return WebhookOutcome(status=405, body=b"POST only")
    given = headers.get("x-telegram-bot-api-secret-token")
    if given is None:
        raise RejectedInput("missing X-Telegram-Bot-Api-Secret-Token", status=401)
    if not same_secret(account.secret_token, given):
        raise RejectedInput("X-Telegram-Bot-Api-Secret-Token does not match", status=403)
    payload = json_object(body)
    update_id = payload.get("update_id")
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise RejectedInput("not a Telegram Update: update_id missing", status=400)
    try:
        update = Update.de_json(payload, None)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
        # OverflowError and OSError: a date the platform's time_t cannot hold.
        raise RejectedInput(f"not a Telegram Update: {exc!r}", status=400) from exc
    raw = await _raw_from_update(account, update, blobs, max_attachment_bytes)
    return WebhookOutcome(messages=[checked_inbound(raw)] if raw is not None else [])


async def poll(
    account: TelegramAccount,
    cursor: str | None,
    blobs: BlobStore | None = None,
    *,
    max_attachment_bytes: int = media.DEFAULT_MAX_BYTES,
) -> tuple[list[RawInbound], str | None]:
    """Fetch Updates after `cursor` (the last update_id handled); return them and the new cursor.

    Passing the returned cursor next time confirms these Updates to Telegram, so call it
    again with the new cursor only after the messages are safely published.
    """
    bot = await bot_for(account)
    offset = int(cursor) + 1 if cursor else None
    try:
        updates = await bot.get_updates(
            offset=offset, timeout=0, allowed_updates=["message", "edited_message"]
        )
    except TelegramError as exc:
        raise _channel_error(exc) from exc
    messages: list[RawInbound] = []
    last = int(cursor) if cursor else None
    for update in updates:
        raw = await _raw_from_update(account, update, blobs, max_attachment_bytes)
        if raw is not None:
            messages.append(raw)
        last = update.update_id if last is None else max(last, update.update_id)
    return messages, str(last) if last is not None else None


async def _raw_from_update(
    account: TelegramAccount,
    update: Update,
    blobs: BlobStore | None,
    max_attachment_bytes: int,
) -> RawInbound | None:
    """The Update as a RawInbound; a message date outside the plausible window (a date no
    datetime holds never gets this far: the Update is refused) is replaced by the receive
    time, noted for the agent."""
    message = update.message or update.edited_message or update.business_message
    if message is None:
        return None  # callback queries, polls, member changes: nothing for a ticket
    now = time.time()
    problems: list[str] = []
    received_at = now
    if message.date is not None:
        received_at = message_epoch(message.date.timestamp(), "message date", problems, now=now)
    user = message.from_user
    sender = str(user.id) if user else str(message.chat.id)
    external_id = f"{message.chat.id}:{message.message_id}"
    if message.edit_date is not None and update.edited_message is not None:
        # An edit is new content for the same message; give it its own key so it is not
        # swallowed as a duplicate of the original.
        external_id += f":edit:{int(message.edit_date.timestamp())}"
    raw = RawInbound(
        channel=CHANNEL,
        account=account.name,
        external_id=external_id,
        sender=sender,
        sender_name=user.full_name if user else message.chat.title,
        received_at=received_at,
        body_text=message.text or message.caption or "",
        meta={
            "chat_id": str(message.chat.id),
            "chat_type": str(message.chat.type),
            "message_id": str(message.message_id),
            "update_id": str(update.update_id),
        },
        problems=problems,
    )
    if user and user.username:
        raw.meta["username"] = user.username
    if message.reply_to_message is not None:
        raw.meta["in_reply_to_external_id"] = (
            f"{message.chat.id}:{message.reply_to_message.message_id}"
        )
    contact = message.contact
    if contact is not None:
        if user is not None and contact.user_id == user.id:
            # The person shared their own number (request_contact button): an identity.
            raw.meta["shared_phone"] = contact.phone_number
        else:
            raw.meta["contact_phone"] = contact.phone_number
        if not raw.body_text:
            name = " ".join(p for p in (contact.first_name, contact.last_name) if p)
            raw.body_text = f"Contact: {name} {contact.phone_number}".strip()
    if message.location is not None and not raw.body_text:
        raw.body_text = f"Location: {message.location.latitude},{message.location.longitude}"
    for ref in await _attachments(account, message, blobs, max_attachment_bytes):
        raw.attachments.append(ref)
        if ref.dropped:
            raw.problems.append(f"attachment {ref.filename}: {ref.dropped}")
    return raw


# (file_id, filename, content type, size) of each file a message carries
_File = tuple[str, str, str, int | None]


def _files(message: Message) -> list[_File]:
    """The files a message carries: its largest photo, a document, voice, audio, video, note."""
    files: list[_File] = []
    if message.photo:
        largest = message.photo[-1]
        files.append(
            (largest.file_id, f"{largest.file_unique_id}.jpg", "image/jpeg", largest.file_size)
        )
    named = (
        (message.document, "", ""),
        (message.voice, ".ogg", "audio/ogg"),
        (message.audio, ".mp3", ""),
        (message.video, ".mp4", ""),
    )
    for item, suffix, default_type in named:
        if item is None:
            continue
        # A voice note has no file name; the others may.
        name = getattr(item, "file_name", None) or f"{item.file_unique_id}{suffix}"
        files.append((item.file_id, name, item.mime_type or default_type, item.file_size))
    if message.video_note:
        note = message.video_note
        files.append((note.file_id, f"{note.file_unique_id}.mp4", "video/mp4", note.file_size))
    return files


async def _attachments(
    account: TelegramAccount, message: Message, blobs: BlobStore | None, max_attachment_bytes: int
) -> list[AttachmentRef]:
    files = _files(message)
    refs: list[AttachmentRef] = []
    policy = account.file_policy(max_attachment_bytes)
    for file_id, filename, content_type, size in files:
        if blobs is None:
            refs.append(
                dropped_attachment(
                    filename,
                    content_type or None,
                    f"not downloaded: no blob store configured (file_id {file_id})",
                )
            )
            continue
        if size is not None and size > policy.max_bytes:
            refs.append(
                dropped_attachment(
                    filename,
                    content_type or None,
                    f"too large: {size} bytes > limit {policy.max_bytes}",
                )
            )
            continue
        try:
            bot = await bot_for(account)
            telegram_file = await bot.get_file(file_id)
        except (BadRequest, Forbidden, InvalidToken) as exc:
            # The file is gone or refused for good: keep the message, note the loss.
            refs.append(
                dropped_attachment(filename, content_type or None, f"download failed: {exc}")
            )
            continue
        except TelegramError as exc:
            # Transient: fail the whole Update so Telegram redelivers it (or the poll repeats).
            raise _channel_error(exc) from exc
        try:
            # Through the media fetcher, not PTB's download: it caps the size while reading,
            # and PTB would read a `file_path` naming a local file straight from our disk.
            # A transient failure raises ChannelError, as above.
            fetched = await media.fetch(str(telegram_file.file_path or ""), policy)
        except media.MediaRefused as refused:
            refs.append(
                dropped_attachment(
                    filename, content_type or None, f"not downloaded: {refused.reason}"
                )
            )
            continue
        refs.append(stored_attachment(blobs, fetched.data, filename, content_type or None))
    return refs


async def send(account: TelegramAccount, reply: OutboundReply) -> DeliveryResult:
    """Send a text reply with sendMessage to the chat the person wrote from."""
    chat_id = reply.meta.get("chat_id") or reply.recipient
    bot = await bot_for(account)
    try:
        sent = await bot.send_message(
            chat_id=int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id,
            text=reply.body_text,
        )
    except TelegramError as exc:
        raise _channel_error(exc) from exc
    return DeliveryResult(status="sent", provider_id=f"{sent.chat.id}:{sent.message_id}")


def _channel_error(exc: TelegramError) -> ChannelError:
    """Map a python-telegram-bot error onto retry-or-give-up."""
    if isinstance(exc, RetryAfter):
        # The private timedelta avoids PTB's deprecation warning on the int-typed property;
        # its own AIORateLimiter reads the same attribute.
        wait = getattr(exc, "_retry_after", None) or exc.retry_after
        seconds = wait.total_seconds() if isinstance(wait, dt.timedelta) else float(wait)
        return ChannelError(f"Telegram: {exc.message}", permanent=False, retry_after=seconds)
    if isinstance(exc, ChatMigrated):
        # The group became a supergroup; the reply must go to the new chat id.
        return ChannelError(f"Telegram: chat migrated to {exc.new_chat_id}", permanent=True)
    if isinstance(exc, Forbidden | InvalidToken | BadRequest):
        return ChannelError(f"Telegram: {exc.message}", permanent=True)
    if isinstance(exc, TimedOut | NetworkError):
        return ChannelError(f"Telegram: {exc.message}", permanent=False)
    return ChannelError(f"Telegram: {exc.message}", permanent=False)


# --- the adapter ------------------------------------------------------------------------------


ADAPTER: Adapter[TelegramAccount] = Adapter(
    name="telegram", channel="telegram", path="telegram", account=TelegramAccount.from_config,
    webhook=webhook_with_media(handle_webhook), send=send_without_context(send),
    poll=poll_with_media(poll), poll_seconds=2.0, close=close_bots,
)  # fmt: skip
