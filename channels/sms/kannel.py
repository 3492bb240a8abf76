"""Kannel SMS gateway adapter: inbound MO and DLR calls from smsbox, outbound via sendsms.

Kannel reassembles concatenated MO messages itself when bearerbox's core group has
`sms-combine-concatenated-mo = true` (its default), so each MO call here is one whole
message. Set smsbox `mo-recode = true` so UCS-2 texts arrive as UTF-8.

Example `kannel.conf` sms-service for an account named `kannel-main`:

    group = sms-service
    keyword = default
    catch-all = true
    max-messages = 0
    get-url = "http://loket:8080/webhooks/sms/kannel?account=kannel-main&secret=SECRET&from=%p&to=%P&text=%a&ts=%T&id=%I"
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import ipaddress
import re
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from channels.base import Adapter, Context, WebhookRequest
from channels.sms.text import encoding_for
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
    message_epoch,
)

# The secret travels inside URLs that Kannel rewrites (%-escapes), so it must need no escaping.
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]{16,}$")

# Kannel DLR types (%d). Buffered (4) and SMSC ack (8) are interim: they yield no receipt,
# so an ack that arrives after the final report can never move a message backwards.
DLR_DELIVERED = 1
DLR_FAILED = 2
DLR_BUFFERED = 4
DLR_SMSC_ACK = 8
DLR_SMSC_REJECT = 16
DLR_MASK_ALL = 31


@dataclass(frozen=True)
class KannelAccount:
    """A `[[channels.sms]]` entry with `provider = "kannel"`."""

    name: str
    sender: str
    sendsms_url: str
    username: str
    password: str
    inbound_secret: str
    allowed_sources: tuple[str, ...] = ()
    timeout: float = 10.0

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> KannelAccount:
        """Build from a config table whose secrets are already resolved from the environment."""
        secret = str(d["inbound_secret"])
        if not _URL_SAFE.match(secret):
            raise ValueError(
                f"channels.sms {d.get('name')!r}: inbound_secret must be at least 16 characters "
                "of A-Z a-z 0-9 . _ ~ - (it is placed in URLs Kannel rewrites)"
            )
        sources = tuple(str(s) for s in d.get("allowed_sources") or ())
        for source in sources:
            ipaddress.ip_network(source, strict=False)  # fail at start-up, not per request
        return cls(
            name=str(d["name"]),
            sender=str(d["sender"]),
            sendsms_url=str(d["sendsms_url"]),
            username=str(d["username"]),
            password=str(d["password"]),
            inbound_secret=secret,
            allowed_sources=sources,
            timeout=float(d.get("timeout", 10.0)),
        )


def _source_allowed(account: KannelAccount, remote_addr: str | None) -> bool:
    if not account.allowed_sources:
        return True
    if not remote_addr:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(s, strict=False) for s in account.allowed_sources)


def _authenticate(
    account: KannelAccount, params: Mapping[str, str], remote_addr: str | None
) -> None:
    if not _source_allowed(account, remote_addr):
        raise RejectedInput(f"source {remote_addr} not allowed", status=403)
    given = params.get("secret", "")
    if not hmac.compare_digest(given.encode(), account.inbound_secret.encode()):
        raise RejectedInput("missing or wrong secret", status=403)


def _parse_ts(value: str | None, problems: list[str]) -> float | None:
    """Kannel's %T (epoch seconds) or %t (`YYYY-MM-DD HH:MM:SS`, UTC); None when unreadable.

    No possible time (30 nines) is refused; an implausible one (an SMSC clock that is off)
    becomes the receive time, noted in `problems` (`message_epoch`).
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return message_epoch(float(value), "Kannel ts", problems, given=value)
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            parsed = float(calendar.timegm(time.strptime(value, fmt)))
        except ValueError:
            continue
        return message_epoch(parsed, "Kannel ts", problems, given=repr(value))
    return None


def _merged_params(
    method: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes
) -> dict[str, str]:
    params = dict(query)
    content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    if method.upper() == "POST" and body and "application/x-www-form-urlencoded" in content_type:
        for name, value in urllib.parse.parse_qsl(body.decode("utf-8", errors="replace")):
            params.setdefault(name, value)
    return params


def handle_webhook(
    account: KannelAccount,
    method: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    remote_addr: str | None,
) -> WebhookOutcome:
    """Handle a call from Kannel: an MO message (sms-service get-url) or a DLR (dlr-url).

    A call carrying `type` is a delivery report; anything else is an MO message.
    """
    params = _merged_params(method, query, headers, body)
    _authenticate(account, params, remote_addr)
    if "type" in params:
        return handle_dlr(account, params)
    sender = params.get("from", "").strip()
    if not sender:
        raise RejectedInput("MO call without `from`", status=400)
    text = params.get("text", "")
    ts = params.get("ts")
    problems: list[str] = []
    received_at = _parse_ts(ts, problems)
    if received_at is None:
        if ts:
            problems.append(f"unreadable Kannel timestamp {ts!r}")
        received_at = time.time()
    external_id = params.get("id", "").strip()
    if not external_id:
        # Without Kannel's id, the same MO retried by smsbox must still get the same key.
        digest = hashlib.sha256(f"{sender}\x00{ts or ''}\x00{text}".encode()).hexdigest()
        external_id = f"sha256:{digest[:32]}"
    meta = {"gateway": "kannel"}
    if params.get("to"):
        meta["to"] = params["to"]
    raw = RawInbound(
        channel="sms",
        account=account.name,
        external_id=external_id,
        sender=sender,
        body_text=text,
        received_at=received_at,
        meta=meta,
        problems=problems,
    )
    return WebhookOutcome(status=200, messages=[checked_inbound(raw)])


def handle_dlr(account: KannelAccount, params: Mapping[str, str]) -> WebhookOutcome:
    """Map a Kannel dlr-url call (`ref` = our message id, `type` = %d) to a receipt.

    Only final reports (delivered, failed, SMSC reject) produce a receipt.
    Authentication is `handle_webhook`'s job; call this only with checked params.
    `ref` is the message id `build_dlr_url` put there; it is parsed back as strictly as
    it was written, since it selects a row by a bigint key.
    """
    type_text = params.get("type", "")
    if not (type_text.isascii() and type_text.isdigit() and len(type_text) <= 4):
        raise RejectedInput("DLR call needs a numeric `type` (Kannel's %d)", status=400)
    dlr_type = int(type_text)
    ref = bigint_id(params.get("ref", ""), "DLR `ref`")
    if dlr_type & DLR_DELIVERED:
        status, reason = "delivered", None
    elif dlr_type & (DLR_FAILED | DLR_SMSC_REJECT):
        smsc_reply = params.get("reason", "").strip()
        what = "rejected by SMSC" if dlr_type & DLR_SMSC_REJECT else "delivery failed"
        status, reason = "failed", f"{what}: {smsc_reply}" if smsc_reply else what
    else:
        return WebhookOutcome(status=200)
    receipt = DeliveryReceipt(
        channel="sms", account=account.name, message_id=ref, status=status, reason=reason
    )
    return WebhookOutcome(status=200, receipts=[checked_receipt(receipt)])


def build_dlr_url(account: KannelAccount, dlr_url: str, message_id: int) -> str:
    """Our webhook URL with the secret, our reference and Kannel's %d / %A escapes added."""
    own = urllib.parse.urlencode({"secret": account.inbound_secret, "ref": str(message_id)})
    separator = "&" if urllib.parse.urlsplit(dlr_url).query else "?"
    # %d and %A are left for Kannel to fill in: report type and the SMSC's reply text.
    return f"{dlr_url}{separator}{own}&type=%d&reason=%A"


def sendsms_query(account: KannelAccount, reply: OutboundReply, *, dlr_url: str) -> str:
    """The sendsms query string; `quote` (not `quote_plus`) so '+' goes out as %2B."""
    params = {
        "username": account.username,
        "password": account.password,
        "from": account.sender,
        "to": reply.recipient,
        "text": reply.body_text,
        "charset": "UTF-8",
        "coding": "2" if encoding_for(reply.body_text) == "ucs2" else "0",
        "dlr-mask": str(DLR_MASK_ALL),
        "dlr-url": build_dlr_url(account, dlr_url, reply.message_id),
    }
    return urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="")


async def send(
    account: KannelAccount,
    reply: OutboundReply,
    *,
    dlr_url: str,
    client: httpx.AsyncClient | None = None,
) -> DeliveryResult:
    """Submit one reply through Kannel's sendsms interface.

    Kannel splits a long text into concatenated parts itself (sendsms-user
    `concatenation = true`, `max-messages` >= the segment count).
    Raises ChannelError: permanent for a 4xx answer, retryable for 5xx or no connection.
    """
    url = f"{account.sendsms_url}?{sendsms_query(account, reply, dlr_url=dlr_url)}"
    try:
        if client is None:
            async with httpx.AsyncClient(timeout=account.timeout) as own_client:
                response = await own_client.get(url)
        else:
            response = await client.get(url, timeout=account.timeout)
    except httpx.HTTPError as exc:
        # The URL holds the password: report the exception's type and the host only.
        host = urllib.parse.urlsplit(account.sendsms_url).netloc
        raise ChannelError(
            f"Kannel at {host} unreachable: {type(exc).__name__}", permanent=False
        ) from None
    answer = response.text.strip()
    if response.status_code >= 500:
        raise ChannelError(f"Kannel HTTP {response.status_code}: {answer}", permanent=False)
    if response.status_code >= 400:
        raise ChannelError(f"Kannel HTTP {response.status_code}: {answer}", permanent=True)
    if answer.startswith("3:") and "queued" not in answer.lower():
        raise ChannelError(f"Kannel refused the message: {answer}", permanent=True)
    return DeliveryResult(status="sent", reason=answer or None)


# --- the adapter ------------------------------------------------------------------------------


async def _webhook(account: KannelAccount, request: WebhookRequest, ctx: Context) -> WebhookOutcome:
    return handle_webhook(
        account, request.method, request.query, request.headers, request.body,
        remote_addr=request.remote_addr,
    )  # fmt: skip


async def _send(account: KannelAccount, reply: OutboundReply, ctx: Context) -> DeliveryResult:
    return await send(
        account, reply, dlr_url=ctx.webhook_url(ADAPTER, account.name), client=ctx.http
    )


ADAPTER: Adapter[KannelAccount] = Adapter(
    name="kannel", channel="sms", path="sms/kannel", account=KannelAccount.from_config,
    webhook=_webhook, webhook_methods=("GET", "POST"), send=_send, default_provider="kannel",
)  # fmt: skip
