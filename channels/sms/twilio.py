"""Twilio-style SMS adapter: signed form webhooks (messages, status callbacks) and the Messages API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from channels.base import Adapter, Context, WebhookRequest
from channels.types import (
    ChannelError,
    DeliveryReceipt,
    DeliveryResult,
    OutboundReply,
    RawInbound,
    RejectedInput,
    WebhookOutcome,
    bigint_id,
    checked_inbound,
    checked_receipt,
)

EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_MEDIA = 10  # Twilio attaches at most ten media items to one message

# MessageStatus values that are final; the interim ones (queued, sending, sent, accepted)
# yield no receipt so a late interim callback never moves a message backwards.
_FINAL_STATUS = {
    "delivered": "delivered",
    "read": "read",
    "undelivered": "failed",
    "failed": "failed",
}


@dataclass(frozen=True)
class TwilioAccount:
    """A `[[channels.sms]]` entry with `provider = "twilio"`."""

    name: str
    sender: str
    account_sid: str
    auth_token: str
    api_url: str = "https://api.twilio.com"
    timeout: float = 10.0

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> TwilioAccount:
        """Build from a config table whose secrets are already resolved from the environment."""
        return cls(
            name=str(d["name"]),
            sender=str(d["sender"]),
            account_sid=str(d["account_sid"]),
            auth_token=str(d["auth_token"]),
            api_url=str(d.get("api_url") or "https://api.twilio.com").rstrip("/"),
            timeout=float(d.get("timeout", 10.0)),
        )


def compute_signature(auth_token: str, url: str, params: Mapping[str, list[str]]) -> str:
    """base64(HMAC-SHA1(token, url + each POST param name+value, sorted by name then value))."""
    signed = url + "".join(
        name + value for name in sorted(params) for value in sorted(params[name])
    )
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as given, plus with the default port added or removed (proxies differ)."""
    split = urllib.parse.urlsplit(url)
    default = {"https": 443, "http": 80}.get(split.scheme)
    variants = [url]
    if default is None or not split.hostname:
        return variants
    host = split.hostname if ":" not in split.hostname else f"[{split.hostname}]"
    userinfo = split.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if split.port == default:
        variants.append(urllib.parse.urlunsplit(split._replace(netloc=prefix + host)))
    elif split.port is None:
        variants.append(urllib.parse.urlunsplit(split._replace(netloc=f"{prefix}{host}:{default}")))
    return variants


def verify_signature(
    auth_token: str, url: str, params: Mapping[str, list[str]], signature: str
) -> bool:
    """Constant-time check of an `X-Twilio-Signature` value."""
    if not signature:
        return False
    return any(
        hmac.compare_digest(
            compute_signature(auth_token, variant, params).encode(), signature.encode()
        )
        for variant in _url_variants(url)
    )


def handle_webhook(
    account: TwilioAccount, method: str, url: str, headers: Mapping[str, str], body: bytes
) -> WebhookOutcome:
    """Check the signature, then turn an incoming message or a status callback into what to publish."""
    lower_headers = {k.lower(): v for k, v in headers.items()}
    params: dict[str, list[str]] = {}
    if method.upper() == "POST":
        for name, value in urllib.parse.parse_qsl(
            body.decode("utf-8", errors="replace"), keep_blank_values=True
        ):
            params.setdefault(name, []).append(value)
    if not verify_signature(
        account.auth_token, url, params, lower_headers.get("x-twilio-signature", "")
    ):
        raise RejectedInput("missing or wrong X-Twilio-Signature", status=403)
    # POST params win; a GET webhook carries them in the (signed) URL.
    fields = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    fields.update({name: values[0] for name, values in params.items()})
    if "MessageStatus" in fields:
        return _status_callback(account, fields)
    return _incoming_message(account, fields)


def _status_callback(account: TwilioAccount, fields: Mapping[str, str]) -> WebhookOutcome:
    status = _FINAL_STATUS.get(fields["MessageStatus"].lower())
    if status is None:
        return WebhookOutcome(status=200)
    reason = None
    if status == "failed":
        code = fields.get("ErrorCode", "")
        reason = f"Twilio {fields['MessageStatus']}" + (f", error {code}" if code else "")
    # `ref` is the message id `send` put in the callback URL; parsed back as strictly.
    ref = fields.get("ref", "")
    receipt = DeliveryReceipt(
        channel="sms",
        account=account.name,
        provider_id=fields.get("MessageSid") or fields.get("SmsSid"),
        message_id=bigint_id(ref, "status callback `ref`") if ref else None,
        status=status,
        reason=reason,
    )
    return WebhookOutcome(status=200, receipts=[checked_receipt(receipt)])


def _incoming_message(account: TwilioAccount, fields: Mapping[str, str]) -> WebhookOutcome:
    sid = fields.get("MessageSid") or fields.get("SmsMessageSid") or fields.get("SmsSid")
    sender = fields.get("From", "").strip()
    if not sid or not sender:
        raise RejectedInput("message webhook without MessageSid or From", status=400)
    meta = {"gateway": "twilio"}
    if fields.get("To"):
        meta["to"] = fields["To"]
    problems = []
    media_text = fields.get("NumMedia", "") or "0"
    if not (media_text.isascii() and media_text.isdigit() and int(media_text) <= MAX_MEDIA):
        raise RejectedInput(f"NumMedia must be a number from 0 to {MAX_MEDIA}", status=400)
    media_count = int(media_text)
    if media_count:
        urls = [fields[f"MediaUrl{i}"] for i in range(media_count) if fields.get(f"MediaUrl{i}")]
        meta["media_urls"] = " ".join(urls)
        problems.append(f"{media_count} MMS media item(s) not fetched")
    raw = RawInbound(
        channel="sms",
        account=account.name,
        external_id=sid,
        sender=sender,
        body_text=fields.get("Body", ""),
        meta=meta,
        problems=problems,
    )
    # Empty TwiML: Twilio sends nothing back to the person.
    return WebhookOutcome(
        status=200, body=EMPTY_TWIML, content_type="text/xml", messages=[checked_inbound(raw)]
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return float(value)
    except ValueError:
        return None


async def send(
    account: TwilioAccount,
    reply: OutboundReply,
    *,
    status_callback: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> DeliveryResult:
    """Create the message through the Messages API; the message SID becomes `provider_id`.

    `status_callback` gets `ref=<message_id>` added so the status callback names our message.
    Raises ChannelError: retryable for 429, 5xx and no connection; permanent for other 4xx.
    """
    form = {"To": reply.recipient, "From": account.sender, "Body": reply.body_text}
    if status_callback:
        separator = "&" if urllib.parse.urlsplit(status_callback).query else "?"
        form["StatusCallback"] = f"{status_callback}{separator}ref={reply.message_id}"
    url = f"{account.api_url}/2010-04-01/Accounts/{account.account_sid}/Messages.json"
    auth = (account.account_sid, account.auth_token)
    try:
        if client is None:
            async with httpx.AsyncClient(timeout=account.timeout) as own_client:
                response = await own_client.post(url, data=form, auth=auth)
        else:
            response = await client.post(url, data=form, auth=auth, timeout=account.timeout)
    except httpx.HTTPError as exc:
        raise ChannelError(
            f"Twilio API unreachable: {type(exc).__name__}", permanent=False
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if response.status_code in (200, 201):
        sid = answer.get("sid")
        if not sid:
            raise ChannelError("Twilio answered without a message sid", permanent=False)
        return DeliveryResult(status="sent", provider_id=str(sid))
    detail = answer.get("message") or response.text[:200]
    code = answer.get("code")
    reason = f"Twilio HTTP {response.status_code}" + (f" ({code})" if code else "") + f": {detail}"
    if response.status_code == 429 or response.status_code >= 500:
        raise ChannelError(reason, permanent=False, retry_after=_retry_after(response))
    raise ChannelError(reason, permanent=True)


# --- the adapter ------------------------------------------------------------------------------


async def _webhook(account: TwilioAccount, request: WebhookRequest, ctx: Context) -> WebhookOutcome:
    # The signature covers the URL the provider called: loket's public URL, path and query.
    return handle_webhook(account, request.method, request.url, request.headers, request.body)


async def _send(account: TwilioAccount, reply: OutboundReply, ctx: Context) -> DeliveryResult:
    callback = ctx.webhook_url(ADAPTER, account.name)
    return await send(account, reply, status_callback=callback, client=ctx.http)


ADAPTER: Adapter[TwilioAccount] = Adapter(
    name="twilio", channel="sms", path="sms/twilio", account=TwilioAccount.from_config,
    webhook=_webhook, send=_send, default_provider="kannel",
)  # fmt: skip
