"""Messages that cross a topic boundary, as msgspec structs (one schema version each)."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Protocol

import msgspec

Channel = Literal["email", "sms", "fax", "facebook", "twitter", "telegram", "phone", "walk_in"]
CHANNELS: tuple[str, ...] = (
    "email",
    "sms",
    "fax",
    "facebook",
    "twitter",
    "telegram",
    "phone",
    "walk_in",
)
# Channels that have an outbound delivery stage; phone/walk-in replies are logged, not sent.
OUTBOUND_CHANNELS: tuple[str, ...] = ("email", "sms", "fax", "facebook", "twitter", "telegram")


def outbound_topic(channel: str) -> str:
    """The topic a channel's replies wait on for its delivery stage."""
    return f"loket.outbound.{channel}"


def new_trace_id() -> str:
    """A fresh trace id carried by a message from its adapter to its ticket."""
    return uuid.uuid4().hex


class AttachmentRef(msgspec.Struct, frozen=True):
    """An attachment stored in the blob store; only its reference travels on the bus.

    `sha256` is empty when the attachment was dropped; `dropped` then says why.
    """

    filename: str
    content_type: str
    size: int
    sha256: str = ""
    dropped: str | None = None


class RawInbound(msgspec.Struct, kw_only=True):
    """What a channel adapter publishes to `loket.inbound.raw`.

    `(channel, account, external_id)` is the natural key: the same provider message
    always gets the same key, so a redelivery is a no-op in ticketing.
    `sender` is the sender as the provider gave it (address, number, user id);
    normalizer turns it into an identity.
    """

    v: int = 1
    channel: str
    account: str
    external_id: str
    sender: str
    sender_name: str | None = None
    received_at: float = msgspec.field(default_factory=time.time)
    subject: str | None = None
    body_text: str = ""
    body_html: str | None = None  # already sanitized by the adapter
    # Threading and loop-safety headers (lower-case names): message-id, in-reply-to,
    # references, auto-submitted, precedence, x-autoreply, x-loop, to, ...
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    attachments: list[AttachmentRef] = msgspec.field(default_factory=list)
    # Channel specifics needed for the reply or for identity: chat_id, shared_phone,
    # fax_number, in_reply_to_external_id, reply_token, original blob sha256, ...
    meta: dict[str, str] = msgspec.field(default_factory=dict)
    # Problems met while parsing; the message is kept and the agent sees them.
    problems: list[str] = msgspec.field(default_factory=list)
    trace_id: str = msgspec.field(default_factory=new_trace_id)

    def key(self) -> bytes:
        """Partition key on the raw topic: channel + sender."""
        return f"{self.channel}:{self.sender}".encode()


class Identity(msgspec.Struct, frozen=True):
    """A normalized way to reach a caller: kind is phone, fax, email, facebook, twitter, telegram."""

    kind: str
    value: str
    display: str | None = None
    valid: bool = True  # False for short codes and numbers that do not parse: kept as typed


class InboundMessage(msgspec.Struct, kw_only=True):
    """The canonical inbound message (normalizer output, before caller matching)."""

    v: int = 1
    raw: RawInbound
    identity: Identity | None  # None when the sender is unknown (e.g. fax without number)
    extra_identities: list[Identity] = msgspec.field(default_factory=list)
    body_display: str = ""  # quoted replies and signatures stripped
    auto_reply: bool = False
    bounce_of: str | None = None  # Message-ID (or external id) of our message that bounced
    bounce_reason: str | None = None


class MatchedInbound(msgspec.Struct, kw_only=True):
    """What normalizer publishes to `loket.inbound.matched`, keyed by caller id."""

    v: int = 1
    message: InboundMessage
    caller_id: int
    caller_created: bool = False
    match_reason: str = ""  # e.g. "identity email:a@b.c", "new caller"


class OutboundReply(msgspec.Struct, kw_only=True):
    """An agent's reply on its way to a provider (topic `loket.outbound.<channel>`)."""

    v: int = 1
    message_id: int  # the outbound row in `messages`; also the idempotency key
    ticket_id: int
    channel: str
    account: str
    recipient: str  # address, E.164 number, platform user/chat id
    subject: str | None = None
    body_text: str
    attempt: int = 0
    headers: dict[str, str] = msgspec.field(
        default_factory=dict
    )  # message-id, in-reply-to, references
    meta: dict[str, str] = msgspec.field(default_factory=dict)
    trace_id: str = msgspec.field(default_factory=new_trace_id)


DeliveryStatus = Literal["queued", "sent", "delivered", "read", "failed"]


class DeliveryResult(msgspec.Struct, kw_only=True):
    """The outcome of one delivery attempt, as a channel's `send` reports it."""

    v: int = 1
    status: str  # "sent" | "failed" | "retry"
    provider_id: str | None = (
        None  # provider's message id (SMTP Message-ID, Telegram message_id, ...)
    )
    reason: str | None = None
    retry_after: float | None = None  # seconds, when the provider said so


class DeliveryReceipt(msgspec.Struct, kw_only=True):
    """A provider's later word on a reply we sent (SMS DLR, Messenger delivered/read, bounce)."""

    v: int = 1
    channel: str
    account: str
    provider_id: str | None = None  # the id the provider gave when we sent
    message_id: int | None = None  # our outbound message id, when the provider echoes our reference
    status: str  # "delivered" | "read" | "failed"
    reason: str | None = None
    at: float = msgspec.field(default_factory=time.time)


class WebhookOutcome(msgspec.Struct, kw_only=True):
    """What a channel's webhook handler decided: the HTTP answer and what to publish."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    messages: list[RawInbound] = msgspec.field(default_factory=list)
    receipts: list[DeliveryReceipt] = msgspec.field(default_factory=list)


class BlobStore(Protocol):
    """Content-addressed storage for attachments and original messages."""

    def put(self, data: bytes) -> str:
        """Store bytes; return their sha256 hex digest."""
        ...

    def get(self, sha256: str) -> bytes: ...


class ChannelError(Exception):
    """A provider call failed. `permanent` says whether retrying can help."""

    def __init__(self, reason: str, *, permanent: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


class RejectedInput(Exception):
    """Inbound input refused at the edge (forged signature, bad body): nothing is published."""

    def __init__(self, reason: str, *, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


encoder = msgspec.json.Encoder()
raw_decoder = msgspec.json.Decoder(RawInbound)
matched_decoder = msgspec.json.Decoder(MatchedInbound)
reply_decoder = msgspec.json.Decoder(OutboundReply)
