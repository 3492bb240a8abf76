"""Webhook routes: the adapter decides, this hands over; 2xx once the broker or journal has it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from channels import facebook, kannel, telegram, twilio, twitter
from channels.budget import fit_raw
from channels.types import ChannelError, RejectedInput, WebhookOutcome, encoder
from ticketing import health, journal
from workers.pipeline import bus, journal_relay
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks", tags=["webhooks"])

MAX_BODY_BYTES = 1024 * 1024
_ACCOUNT_TYPES: dict[str, Any] = {
    "facebook": facebook.FacebookAccount, "twitter": twitter.TwitterAccount,
    "telegram": telegram.TelegramAccount, "kannel": kannel.KannelAccount, "twilio": twilio.TwilioAccount,
}  # fmt: skip


def _accounts(rt: Runtime, kind: str) -> dict[str, Any]:
    """Configured accounts for a webhook kind (`kannel`/`twilio` are SMS providers)."""
    cache = rt.__dict__.setdefault("_webhook_accounts", {})
    if kind not in cache:
        if kind in ("kannel", "twilio"):
            entries = [e for e in rt.channels.get("sms", []) if e.get("provider", "kannel") == kind]
        else:
            entries = rt.channels.get(kind, [])
        cache[kind] = {e["name"]: _ACCOUNT_TYPES[kind].from_config(e) for e in entries}
    return cache[kind]  # type: ignore[no-any-return]


def _pick(rt: Runtime, kind: str, request: Request) -> Any:
    accounts = _accounts(rt, kind)
    name = request.query_params.get("account")
    if name is not None:
        if name not in accounts:
            raise RejectedInput(f"no {kind} account named {name!r}", status=404)
        return accounts[name]
    if len(accounts) == 1:
        return next(iter(accounts.values()))
    if not accounts:
        raise RejectedInput(f"no {kind} account is configured", status=404)
    raise RejectedInput(f"several {kind} accounts: name one with ?account=", status=400)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RejectedInput(f"body larger than {MAX_BODY_BYTES} bytes", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RejectedInput(f"body larger than {MAX_BODY_BYTES} bytes", status=413)
    return body


async def publish_outcome(rt: Runtime, outcome: WebhookOutcome) -> None:
    """Hand over what the adapter accepted.

    With the inbound journal, done once PostgreSQL committed it (the broker gets it right
    away if it can, else from the journal relay); without, once the broker acknowledged it.
    """
    now = repr(time.time())
    entries: list[journal.Entry] = []
    for raw in outcome.messages:
        fit_raw(raw, rt.blobs, rt.settings.max_text_chars)
        raw.meta.setdefault("accepted_at", now)
        natural_key = (raw.channel, raw.account, raw.external_id)
        entries.append(journal.Entry(bus.RAW, encoder.encode(raw), raw.key(), natural_key))
        metrics.INBOUND.labels(raw.channel, raw.account).inc()
    for receipt in outcome.receipts:
        key = (receipt.provider_id or "").encode()
        entries.append(journal.Entry(bus.RECEIPTS, encoder.encode(receipt), key))
    try:
        if rt.settings.journal_inbound():
            await journal_relay.accept(rt, entries)
            return
        records = [bus.Publish(e.topic, e.value, e.key) for e in entries]
        await asyncio.wait_for(bus.publish_all(rt.producer, records), timeout=10)
    except bus.UNWRITABLE_ERRORS as exc:
        # Never an outage: the same request would be refused again, so say so for good.
        status = 413 if isinstance(exc, bus.TOO_LARGE_ERRORS) else 400
        raise RejectedInput(
            f"cannot be stored: the broker refuses it ({exc})", status=status
        ) from exc


Handler = Callable[[Any, Request, bytes], Awaitable[WebhookOutcome]]


def _refused(kind: str, exc: RejectedInput) -> Response:
    log.warning("webhook %s refused (%d): %s", kind, exc.status, exc.reason)
    return Response(exc.reason, status_code=exc.status, media_type="text/plain")


async def _dispatch(request: Request, kind: str, handler: Handler) -> Response:
    rt: Runtime = request.app.state.runtime
    try:
        account = _pick(rt, kind, request)
        body = await _read_body(request)
        outcome = await handler(account, request, body)
    except RejectedInput as exc:
        return _refused(kind, exc)
    except ChannelError as exc:
        # E.g. an attachment could not be fetched yet: the platform will send it again.
        return Response(exc.reason, status_code=503, media_type="text/plain")
    if outcome.messages or outcome.receipts:
        try:
            await publish_outcome(rt, outcome)
        except RejectedInput as exc:  # e.g. a NUL in an id, a record over the broker's limit
            return _refused(kind, exc)
        except journal_relay.DatabaseUnavailable as exc:
            log.error("webhook %s: database unavailable, answering 503: %s", kind, exc)
            return Response(
                "database unavailable, retry later", status_code=503, media_type="text/plain"
            )
        except (bus.KafkaError, TimeoutError, OSError) as exc:
            log.error("webhook %s: broker unavailable, answering 503: %s", kind, exc)
            return Response(
                "broker unavailable, retry later", status_code=503, media_type="text/plain"
            )
    metrics.channel_ok(kind, getattr(account, "name", kind), time.time())
    await health.note_channel_ok(rt.pool, kind, getattr(account, "name", kind))
    return Response(outcome.body, status_code=outcome.status, media_type=outcome.content_type)


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _query(request: Request) -> dict[str, str]:
    return dict(request.query_params)


@router.api_route("/facebook", methods=["GET", "POST"])
async def facebook_webhook(request: Request) -> Response:
    """Messenger: verification GET and signed event POSTs."""
    rt: Runtime = request.app.state.runtime

    async def handle(account: Any, req: Request, body: bytes) -> WebhookOutcome:
        return await facebook.handle_webhook(
            account, req.method, _query(req), _headers(req), body, blobs=rt.blobs,
            max_attachment_bytes=rt.settings.max_attachment_bytes,
        )  # fmt: skip

    return await _dispatch(request, "facebook", handle)


@router.api_route("/twitter", methods=["GET", "POST"])
async def twitter_webhook(request: Request) -> Response:
    """X Account Activity: CRC GET and signed event POSTs."""
    rt: Runtime = request.app.state.runtime

    async def handle(account: Any, req: Request, body: bytes) -> WebhookOutcome:
        return await twitter.handle_webhook(
            account, req.method, _query(req), _headers(req), body, blobs=rt.blobs
        )

    return await _dispatch(request, "twitter", handle)


@router.post("/telegram")
async def telegram_webhook(request: Request) -> Response:
    """Telegram Bot API updates, checked against the secret token header."""
    rt: Runtime = request.app.state.runtime

    async def handle(account: Any, req: Request, body: bytes) -> WebhookOutcome:
        return await telegram.handle_webhook(
            account, req.method, _query(req), _headers(req), body, blobs=rt.blobs,
            max_attachment_bytes=rt.settings.max_attachment_bytes,
        )  # fmt: skip

    return await _dispatch(request, "telegram", handle)


@router.api_route("/sms/kannel", methods=["GET", "POST"])
async def kannel_webhook(request: Request) -> Response:
    """Kannel sms-service get-url (MO) and dlr-url (delivery reports)."""

    async def handle(account: Any, req: Request, body: bytes) -> WebhookOutcome:
        remote = req.client.host if req.client else None
        return kannel.handle_webhook(
            account, req.method, _query(req), _headers(req), body, remote_addr=remote
        )

    return await _dispatch(request, "kannel", handle)


@router.post("/sms/twilio")
async def twilio_webhook(request: Request) -> Response:
    """Twilio-style gateways: incoming messages and status callbacks, signed."""
    rt: Runtime = request.app.state.runtime

    async def handle(account: Any, req: Request, body: bytes) -> WebhookOutcome:
        # The signature covers the URL the provider called: our public URL plus path and query.
        public = rt.settings.public_url.rstrip("/")
        url = f"{public}{req.url.path}" + (f"?{req.url.query}" if req.url.query else "")
        return twilio.handle_webhook(account, req.method, url, _headers(req), body)

    return await _dispatch(request, "twilio", handle)
