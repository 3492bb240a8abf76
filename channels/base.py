"""The channel adapter interface: what every provider implements, and nothing more.

An adapter parses and checks its accounts at start-up, and may take webhooks, send replies
and poll. `channels.registry` lists every adapter; the workers find them there, so adding a
provider is one module here and one entry in the registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx

from channels.types import BlobStore, DeliveryResult, OutboundReply, RawInbound, WebhookOutcome

A = TypeVar("A")


@dataclass(frozen=True)
class WebhookRequest:
    """One call a platform made, as an adapter checks and parses it."""

    method: str
    # The URL the platform called: loket's public URL with the path and query (signatures
    # such as Twilio's cover it).
    url: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: bytes
    remote_addr: str | None = None


@dataclass(frozen=True)
class Context:
    """What the running process lends an adapter."""

    blobs: BlobStore | None = None
    max_attachment_bytes: int = 10 * 1024 * 1024
    public_url: str = "http://127.0.0.1:8080"
    # One connection pool per process, for adapters that make plain HTTP calls.
    http: httpx.AsyncClient | None = field(default=None, compare=False)

    def webhook_url(self, adapter: Adapter[Any], account: str) -> str:
        """Where the platform calls this adapter back for `account` (delivery reports)."""
        return f"{self.public_url.rstrip('/')}/webhooks/{adapter.path}?account={account}"


Webhook = Callable[[A, WebhookRequest, Context], Awaitable[WebhookOutcome]]
Send = Callable[[A, OutboundReply, Context], Awaitable[DeliveryResult]]
Poll = Callable[[A, str | None, Context], Awaitable[tuple[list[RawInbound], str | None]]]


@dataclass(frozen=True)
class Adapter(Generic[A]):
    """One provider of one channel.

    `name` is the provider (`kannel`); `channel` the channel its messages come from and its
    replies go to (`sms`), whose `[[channels.<channel>]]` entries hold the accounts; `path`
    the webhook path under `/webhooks/`. Where a channel has several providers, an entry
    names its own with `provider` (`default_provider` when it does not).
    """

    name: str
    channel: str
    path: str
    account: Callable[[dict[str, Any]], A]  # one config entry, parsed and checked
    webhook: Webhook[A] | None = None
    webhook_methods: tuple[str, ...] = ("POST",)
    send: Send[A] | None = None
    poll: Poll[A] | None = None
    poll_seconds: float = 60.0  # the pause between empty polls unless `poll_seconds` is set
    default_provider: str | None = None
    # Called once at shutdown, for clients the adapter keeps open (Telegram's bots).
    close: Callable[[], Awaitable[None]] | None = None

    def owns(self, entry: dict[str, Any]) -> bool:
        """Whether a `[[channels.<channel>]]` entry is an account of this provider."""
        if self.default_provider is None:
            return True
        return entry.get("provider", self.default_provider) == self.name


# Adapters for providers whose functions predate this interface, by the shape they take.


def send_without_context(
    send: Callable[[A, OutboundReply], Awaitable[DeliveryResult]],
) -> Send[A]:
    """`send(account, reply)` for a provider that needs nothing from the process."""

    async def adapted(account: A, reply: OutboundReply, ctx: Context) -> DeliveryResult:
        return await send(account, reply)

    return adapted


def webhook_with_media(handle: Callable[..., Awaitable[WebhookOutcome]]) -> Webhook[A]:
    """`handle(account, method, query, headers, body, *, blobs, max_attachment_bytes)`: a
    platform whose calls carry media to fetch into the blob store."""

    async def adapted(account: A, request: WebhookRequest, ctx: Context) -> WebhookOutcome:
        return await handle(
            account, request.method, request.query, request.headers, request.body,
            blobs=ctx.blobs, max_attachment_bytes=ctx.max_attachment_bytes,
        )  # fmt: skip

    return adapted


def poll_with_media(
    poll: Callable[..., Awaitable[tuple[list[RawInbound], str | None]]],
) -> Poll[A]:
    """`poll(account, cursor, blobs, *, max_attachment_bytes)`."""

    async def adapted(
        account: A, cursor: str | None, ctx: Context
    ) -> tuple[list[RawInbound], str | None]:
        return await poll(account, cursor, ctx.blobs, max_attachment_bytes=ctx.max_attachment_bytes)

    return adapted
