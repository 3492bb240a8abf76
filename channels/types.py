"""Messages that cross a topic boundary, as msgspec structs (one schema version each)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Literal, Protocol

import msgspec

from channels.registry import CHANNEL_KINDS

# The channel lists, derived from `channels.registry`, where every channel is declared once.
CHANNELS: tuple[str, ...] = tuple(k.name for k in CHANNEL_KINDS)
OUTBOUND_CHANNELS: tuple[str, ...] = tuple(k.name for k in CHANNEL_KINDS if k.outbound)
# Channels whose senders are the platform's user ids.
PLATFORM_CHANNELS: tuple[str, ...] = tuple(
    k.name for k in CHANNEL_KINDS if k.identity == "platform"
)
# Every kind of identity a caller can have, by which a sender is matched.
IDENTITY_KINDS: tuple[str, ...] = tuple(
    dict.fromkeys(k.identity_kind for k in CHANNEL_KINDS if k.identity_kind)
)
# The channel a reply to an identity of each kind goes out on (the first such channel listed).
REPLY_CHANNEL_OF_IDENTITY: dict[str, str] = {
    kind: k.name
    for k in reversed(CHANNEL_KINDS)
    if k.outbound and (kind := k.identity_kind) is not None
}


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


# --- Values the pipeline can store: checked at the edge, so no stage ever has to shunt them ----

EARLIEST_EPOCH = 946_684_800.0  # 2000-01-01T00:00:00Z: no channel we speak dates from before
# Provider clocks (and SMSCs that report local time as UTC) may run some hours ahead of ours.
FUTURE_SLACK_SECONDS = 24 * 3600.0
# 0001-01-01 to 9999-12-30 (a day short of datetime's end, so any time zone can show it).
EPOCH_RANGE = (-62_135_596_800.0, 253_402_214_400.0)
BIGINT_MAX = 2**63 - 1  # PostgreSQL bigint, the type of every id column
# (channel, account, external_id) and an identity's (kind, value) are unique btree keys, and
# a btree entry holds at most about 2,700 bytes: these bounds keep a key well inside that.
MAX_EXTERNAL_ID_CHARS = 512
MAX_SENDER_CHARS = 256
_ASCII_DIGITS = frozenset("0123456789")


def epoch_problem(seconds: float, *, now: float | None = None) -> str | None:
    """Why `seconds` is not a plausible message time (2000 to a day from now), or None."""
    if not math.isfinite(seconds):
        return "not a finite number"
    if seconds < EARLIEST_EPOCH:
        return "before 2000"
    current = time.time() if now is None else now
    if seconds > current + FUTURE_SLACK_SECONDS:
        return "more than a day in the future"
    return None


def impossible_epoch(seconds: float) -> str | None:
    """Why `seconds` is no time any clock could give (not finite, outside the years 1 to 9999,
    what every stage's datetime spans), or None."""
    if not math.isfinite(seconds):
        return "not a finite number"
    if not EPOCH_RANGE[0] <= seconds <= EPOCH_RANGE[1]:
        return "outside the years 1 to 9999"
    return None


def possible_epoch(seconds: float, what: str, *, given: object = None) -> float:
    """`seconds`, unless it is no time at all (`impossible_epoch`): then RejectedInput (400)
    naming `what` and `given`, the value as the provider wrote it."""
    impossible = impossible_epoch(seconds)
    if impossible is not None:
        shown = str(seconds if given is None else given)[:40]
        raise RejectedInput(f"{what} {shown} is not a possible time: {impossible}", status=400)
    return seconds


def message_epoch(
    seconds: float,
    what: str,
    problems: list[str],
    *,
    given: object = None,
    now: float | None = None,
) -> float:
    """`seconds` as a message's time.

    No time at all (NaN, 30 nines) is RejectedInput (400) naming `what`: a broken integration,
    not a clock. A possible but implausible one (an SMSC clock left at 1970, a provider some
    days ahead) keeps the message with the receive time instead, noted in `problems`: the
    message is worth more than its time. `given` is the value as the provider wrote it.
    """
    possible_epoch(seconds, what, given=given)
    current = time.time() if now is None else now
    implausible = epoch_problem(seconds, now=current)
    if implausible is None:
        return seconds
    shown = str(seconds if given is None else given)[:40]
    problems.append(f"{what} {shown} is {implausible}: the receive time is used")
    return current


def bigint_id(text: str, what: str) -> int:
    """A positive id written in ASCII digits that fits a bigint column, else RejectedInput (400).

    `int()` alone would also take "+5", " 5", "5_0" and non-ASCII digits such as "٥".
    """
    if not text or len(text) > 19 or not _ASCII_DIGITS.issuperset(text):
        raise RejectedInput(f"{what} must be a positive integer of at most 19 digits", status=400)
    value = int(text)
    if not 0 < value <= BIGINT_MAX:
        raise RejectedInput(f"{what} {text} is out of range (1 to {BIGINT_MAX})", status=400)
    return value


def _without_nul(values: dict[str, str]) -> tuple[dict[str, str], bool]:
    if not any("\x00" in k or "\x00" in v for k, v in values.items()):
        return values, False
    return {k.replace("\x00", ""): v.replace("\x00", "") for k, v in values.items()}, True


def checked_inbound(raw: RawInbound, *, now: float | None = None) -> RawInbound:
    """Refuse (RejectedInput, 400) a message whose key or time can never be stored.

    An implausible time is replaced by the receive time (`message_epoch`). NUL characters,
    which PostgreSQL text and jsonb cannot hold, are removed from the meta and header values
    (the normalizer does the same for the text fields) and noted.
    """
    if not raw.external_id or len(raw.external_id) > MAX_EXTERNAL_ID_CHARS:
        raise RejectedInput(
            f"message id must be 1 to {MAX_EXTERNAL_ID_CHARS} characters", status=400
        )
    if "\x00" in raw.external_id:
        raise RejectedInput("message id contains a NUL character", status=400)
    if len(raw.sender) > MAX_SENDER_CHARS:
        raise RejectedInput(f"sender is longer than {MAX_SENDER_CHARS} characters", status=400)
    raw.received_at = message_epoch(raw.received_at, "message time", raw.problems, now=now)
    raw.meta, meta_changed = _without_nul(raw.meta)
    raw.headers, headers_changed = _without_nul(raw.headers)
    attachments_changed = False
    for index, ref in enumerate(raw.attachments):
        fields = {
            "filename": ref.filename,
            "content_type": ref.content_type,
            "dropped": ref.dropped or "",
        }
        cleaned, changed = _without_nul(fields)
        if changed:
            raw.attachments[index] = msgspec.structs.replace(
                ref, filename=cleaned["filename"], content_type=cleaned["content_type"],
                dropped=cleaned["dropped"] or None,
            )  # fmt: skip
            attachments_changed = True
    raw.problems = [problem.replace("\x00", "") for problem in raw.problems]
    if meta_changed or headers_changed or attachments_changed:
        raw.problems.append("NUL characters removed from provider fields")
    return raw


def checked_receipt(receipt: DeliveryReceipt, *, now: float | None = None) -> DeliveryReceipt:
    """Refuse a receipt whose ids cannot be looked up; an implausible `at` becomes `now`.

    `at` is informational (no decision reads it), so a wrong one costs nothing worth a
    refusal that would make the provider retry; the receipt itself is worth keeping.
    """
    if receipt.message_id is not None and not 0 < receipt.message_id <= BIGINT_MAX:
        raise RejectedInput(f"message reference {receipt.message_id} is out of range", status=400)
    if receipt.provider_id is not None and (
        len(receipt.provider_id) > MAX_EXTERNAL_ID_CHARS or "\x00" in receipt.provider_id
    ):
        raise RejectedInput("provider message id is too long or contains NUL", status=400)
    current = time.time() if now is None else now
    if epoch_problem(receipt.at, now=current) is not None:
        receipt.at = current
    if receipt.reason is not None and "\x00" in receipt.reason:
        receipt.reason = receipt.reason.replace("\x00", "")
    return receipt


encoder = msgspec.json.Encoder()
raw_decoder = msgspec.json.Decoder(RawInbound)
matched_decoder = msgspec.json.Decoder(MatchedInbound)
reply_decoder = msgspec.json.Decoder(OutboundReply)
