"""Facebook Messenger: page webhook (verification, signed events) and the Graph Send API."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from channels import media
from channels.base import Adapter, send_without_context, webhook_with_media
from channels.social.common import (
    dropped_attachment,
    filename_from_url,
    hmac_sha256,
    json_object,
    same_secret,
    stored_attachment,
)
from channels.types import (
    AttachmentRef,
    BlobStore,
    ChannelError,
    DeliveryReceipt,
    DeliveryResult,
    OutboundReply,
    RawInbound,
    RejectedInput,
    WebhookOutcome,
    checked_inbound,
    checked_receipt,
    message_epoch,
)

CHANNEL = "facebook"
STANDARD_WINDOW = 24 * 3600  # seconds after the person's last message: any reply allowed
HUMAN_AGENT_WINDOW = 7 * 24 * 3600  # the HUMAN_AGENT tag stretches it to seven days
# Graph error codes that mean "throttled, try later" rather than "this will never work".
RATE_LIMIT_CODES = frozenset({4, 17, 32, 613})
TRANSIENT_CODES = frozenset({1, 2})
DEFAULT_RATE_LIMIT_WAIT = 60.0
TIMEOUT = httpx.Timeout(15.0, connect=5.0)
# Where Messenger serves attachments: scontent.*.fbcdn.net, cdn.fbsbx.com, lookaside.fbsbx.com.
DEFAULT_MEDIA_HOSTS = ("fbcdn.net", "fbsbx.com", "facebook.com")


@dataclass(frozen=True)
class FacebookAccount:
    """One Facebook page connected to Messenger."""

    name: str
    page_id: str
    app_secret: str = field(repr=False)
    verify_token: str = field(repr=False)
    page_token: str = field(repr=False)
    graph_url: str = "https://graph.facebook.com/v19.0"
    # Hosts attachments are fetched from (`media_hosts`); see channels/media.py for the rules.
    media_hosts: tuple[media.HostRule, ...] = media.parse_hosts(DEFAULT_MEDIA_HOSTS, "default")

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> FacebookAccount:
        """Build from a config table whose secrets are already resolved."""
        name = str(d["name"])
        hosts = d.get("media_hosts", DEFAULT_MEDIA_HOSTS)
        if isinstance(hosts, str) or not isinstance(hosts, list | tuple):
            raise ValueError(f"channels.facebook {name!r}: media_hosts must be a list of hosts")
        return cls(
            name=name,
            page_id=str(d.get("page_id", "")),
            app_secret=str(d["app_secret"]),
            verify_token=str(d["verify_token"]),
            page_token=str(d["page_token"]),
            graph_url=str(d.get("graph_url") or cls.graph_url).rstrip("/"),
            media_hosts=media.parse_hosts(hosts, f"channels.facebook {name!r}"),
        )


def signature_valid(account: FacebookAccount, headers: dict[str, str], body: bytes) -> bool:
    """Whether `X-Hub-Signature-256` is the app secret's HMAC of the raw body."""
    expected = "sha256=" + hmac_sha256(account.app_secret, body).hex()
    return same_secret(expected, headers.get("x-hub-signature-256"))


async def handle_webhook(
    account: FacebookAccount,
    method: str,
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes,
    blobs: BlobStore | None = None,
    max_attachment_bytes: int = media.DEFAULT_MAX_BYTES,
) -> WebhookOutcome:
    """Answer the subscription check, or verify and parse a page event batch.

    Raises ChannelError (not permanent) when an attachment cannot be fetched right now;
    answering non-2xx then makes Messenger deliver the batch again.
    """
    if method.upper() == "GET":
        if query.get("hub.mode") == "subscribe" and same_secret(
            account.verify_token, query.get("hub.verify_token")
        ):
            return WebhookOutcome(body=query.get("hub.challenge", "").encode())
        raise RejectedInput("verify token does not match", status=403)
    if "x-hub-signature-256" not in headers:
        raise RejectedInput("missing X-Hub-Signature-256", status=401)
    if not signature_valid(account, headers, body):
        raise RejectedInput("X-Hub-Signature-256 does not match the body", status=403)
    payload = json_object(body)
    if payload.get("object") != "page" or not isinstance(payload.get("entry"), list):
        raise RejectedInput("not a page webhook batch", status=400)
    outcome = WebhookOutcome(body=b"EVENT_RECEIVED")
    policy = media.MediaPolicy(account.media_hosts, max_attachment_bytes)
    for entry in payload["entry"]:
        if not isinstance(entry, dict):
            raise RejectedInput("entry is not an object", status=400)
        for event in entry.get("messaging") or []:
            if not isinstance(event, dict):
                raise RejectedInput("messaging event is not an object", status=400)
            try:
                await _apply_event(account, event, outcome, policy, blobs)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                # A field of the wrong type deep in the event: the batch is malformed.
                raise RejectedInput(f"malformed messaging event: {exc!r}", status=400) from exc
    outcome.messages = [checked_inbound(raw) for raw in outcome.messages]
    outcome.receipts = [checked_receipt(receipt) for receipt in outcome.receipts]
    return outcome


def _receipts(
    account: FacebookAccount, event: dict[str, Any], sender: str, timestamp: float | None
) -> list[DeliveryReceipt]:
    """A delivery or read event: receipts by message id, or a watermark for everything before."""
    if "delivery" in event:
        delivery = event["delivery"] or {}
        at = _seconds(delivery.get("watermark")) or timestamp
        mids = delivery.get("mids") or []
        if mids:
            return [
                DeliveryReceipt(channel=CHANNEL, account=account.name, provider_id=str(mid),
                                status="delivered", at=at)
                for mid in mids
            ]  # fmt: skip
        # Only a watermark: everything we sent to this person before `at` arrived.
        return [DeliveryReceipt(channel=CHANNEL, account=account.name, status="delivered",
                                reason=f"watermark psid={sender}", at=at)]  # fmt: skip
    # Messenger reports reads as a watermark: all messages up to that time were seen.
    at = _seconds((event["read"] or {}).get("watermark")) or timestamp
    return [DeliveryReceipt(channel=CHANNEL, account=account.name, status="read",
                            reason=f"watermark psid={sender}", at=at)]  # fmt: skip


async def _apply_event(
    account: FacebookAccount,
    event: dict[str, Any],
    outcome: WebhookOutcome,
    policy: media.MediaPolicy,
    blobs: BlobStore | None,
) -> None:
    sender = str((event.get("sender") or {}).get("id", ""))
    page = str((event.get("recipient") or {}).get("id", ""))
    timestamp = _seconds(event.get("timestamp"))
    problems: list[str] = []
    if timestamp and ("message" in event or "postback" in event):
        # The time the person wrote: stored, and it opens the reply window, so it must be
        # real; an implausible one is replaced by the receive time.
        timestamp = message_epoch(
            timestamp, "messaging event timestamp", problems, given=event.get("timestamp")
        )
    if "delivery" in event or "read" in event:
        outcome.receipts.extend(_receipts(account, event, sender, timestamp))
        return
    if "message" in event:
        message = event["message"] or {}
        if message.get("is_echo"):
            return  # our own send (or one from the page inbox) coming back
        if not message.get("mid") or not sender:
            raise RejectedInput("message event without mid or sender", status=400)
        raw = RawInbound(
            channel=CHANNEL,
            account=account.name,
            external_id=str(message["mid"]),
            sender=sender,
            received_at=timestamp or time.time(),
            body_text=str(message.get("text") or ""),
            meta={"page_id": page, "last_inbound_at": _epoch(timestamp)},
            problems=problems,
        )
        if isinstance(message.get("reply_to"), dict) and message["reply_to"].get("mid"):
            raw.meta["in_reply_to_external_id"] = str(message["reply_to"]["mid"])
        if isinstance(message.get("quick_reply"), dict):
            raw.meta["quick_reply_payload"] = str(message["quick_reply"].get("payload", ""))
        for index, attachment in enumerate(message.get("attachments") or []):
            ref = await _attachment(attachment, index, policy, blobs)
            if ref is not None:
                raw.attachments.append(ref)
                if ref.dropped:
                    raw.problems.append(f"attachment {ref.filename}: {ref.dropped}")
        outcome.messages.append(raw)
        return
    if "postback" in event:
        postback = event["postback"] or {}
        external_id = postback.get("mid") or f"postback:{sender}:{event.get('timestamp')}"
        outcome.messages.append(
            RawInbound(
                channel=CHANNEL,
                account=account.name,
                external_id=str(external_id),
                sender=sender,
                received_at=timestamp or time.time(),
                body_text=str(postback.get("title") or ""),
                meta={
                    "page_id": page,
                    "last_inbound_at": _epoch(timestamp),
                    "postback_payload": str(postback.get("payload") or ""),
                },
                problems=problems,
            )
        )


async def _attachment(
    attachment: Any, index: int, policy: media.MediaPolicy, blobs: BlobStore | None
) -> AttachmentRef | None:
    if not isinstance(attachment, dict):
        return None
    url = (attachment.get("payload") or {}).get("url")
    kind = str(attachment.get("type") or "file")
    if not url:
        return None  # location pins and link previews carry no file
    filename = filename_from_url(str(url), f"{kind}-{index}")
    if blobs is None:
        return dropped_attachment(filename, None, "not downloaded: no blob store configured")
    try:
        # A transient failure raises ChannelError: the batch fails and Messenger redelivers it.
        fetched = await media.fetch(str(url), policy)
    except media.MediaRefused as refused:
        return dropped_attachment(filename, None, f"not downloaded: {refused.reason}")
    return stored_attachment(blobs, fetched.data, filename, fetched.content_type)


def _seconds(milliseconds: Any) -> float:
    """Messenger's milliseconds as seconds; 0.0 when absent or not a number."""
    if isinstance(milliseconds, bool):
        return 0.0
    try:
        return float(milliseconds) / 1000.0
    except (TypeError, ValueError):
        return 0.0


def _epoch(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds else ""


def messaging_type(last_inbound_at: float | None, now: float) -> tuple[str, str | None]:
    """Pick `messaging_type` and `tag` for a reply, or raise once the 7-day window has passed.

    Without a known last inbound time the reply goes out as RESPONSE and Messenger decides.
    """
    if last_inbound_at is None:
        return "RESPONSE", None
    age = now - last_inbound_at
    if age <= STANDARD_WINDOW:
        return "RESPONSE", None
    if age <= HUMAN_AGENT_WINDOW:
        return "MESSAGE_TAG", "HUMAN_AGENT"
    raise ChannelError(
        f"the 7-day window has passed: last message from this person {age / 86400:.1f} days ago",
        permanent=True,
    )


async def send(account: FacebookAccount, reply: OutboundReply) -> DeliveryResult:
    """Send a text reply through the Send API, with the messaging type the window allows."""
    last = reply.meta.get("last_inbound_at")
    kind, tag = messaging_type(float(last) if last else None, time.time())
    message: dict[str, Any] = {
        "recipient": {"id": reply.recipient},
        "messaging_type": kind,
        "message": {"text": reply.body_text},
    }
    if tag:
        message["tag"] = tag
    node = account.page_id or "me"
    # The token travels in the Authorization header, not the query string, so that URL
    # logging (httpx logs every request line) never reveals it.
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            response = await http.post(
                f"{account.graph_url}/{node}/messages",
                json=message,
                headers={"Authorization": f"Bearer {account.page_token}"},
            )
    except httpx.HTTPError as exc:
        raise ChannelError(f"Graph API unreachable: {exc!r}", permanent=False) from exc
    if response.is_success:
        try:
            return DeliveryResult(status="sent", provider_id=str(response.json()["message_id"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ChannelError(
                f"Graph API answered {response.status_code} without message_id", permanent=False
            ) from exc
    raise _graph_error(response)


def _graph_error(response: httpx.Response) -> ChannelError:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = error.get("code")
    text = str(error.get("message") or f"HTTP {response.status_code}")
    reason = f"Graph API error {code}: {text}" if code is not None else f"Graph API: {text}"
    if response.status_code == 429 or code in RATE_LIMIT_CODES:
        return ChannelError(reason, permanent=False, retry_after=_regain_access(response))
    if response.status_code >= 500 or code in TRANSIENT_CODES or error.get("is_transient"):
        return ChannelError(reason, permanent=False)
    return ChannelError(reason, permanent=True)


def _regain_access(response: httpx.Response) -> float:
    """Seconds until Graph accepts calls again, from its usage headers (given in minutes)."""
    waits: list[float] = []
    for header in ("x-business-use-case-usage", "x-app-usage", "x-page-usage"):
        value = response.headers.get(header)
        if not value:
            continue
        try:
            usage = json.loads(value)
        except ValueError:
            continue
        for entries in usage.values() if isinstance(usage, dict) else []:
            for entry in entries if isinstance(entries, list) else [entries]:
                minutes = (
                    entry.get("estimated_time_to_regain_access")
                    if isinstance(entry, dict)
                    else None
                )
                if isinstance(minutes, int | float) and minutes > 0:
                    waits.append(float(minutes) * 60.0)
    return max(waits) if waits else DEFAULT_RATE_LIMIT_WAIT


# --- the adapter ------------------------------------------------------------------------------


ADAPTER: Adapter[FacebookAccount] = Adapter(
    name="facebook", channel="facebook", path="facebook", account=FacebookAccount.from_config,
    webhook=webhook_with_media(handle_webhook), webhook_methods=("GET", "POST"),
    send=send_without_context(send),
)  # fmt: skip
