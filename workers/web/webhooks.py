"""Webhook routes: the adapter decides, this hands over; 2xx once the broker or journal has it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from channels import registry
from channels.base import Adapter, WebhookRequest
from channels.types import ChannelError, RejectedInput, WebhookOutcome
from ticketing import health
from workers.pipeline import bus, intake, journal_relay
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks", tags=["webhooks"])

MAX_BODY_BYTES = 1024 * 1024


def _accounts(rt: Runtime, adapter: Adapter[Any]) -> dict[str, Any]:
    """The configured accounts of an adapter, parsed once per process."""
    cache = rt.__dict__.setdefault("_webhook_accounts", {})
    if adapter.name not in cache:
        cache[adapter.name] = registry.accounts(adapter, rt.channels)
    return cache[adapter.name]  # type: ignore[no-any-return]


def _pick(rt: Runtime, adapter: Adapter[Any], request: Request) -> Any:
    accounts = _accounts(rt, adapter)
    kind = adapter.name
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
    journaled = rt.settings.journal_inbound()
    try:
        # Without the journal the request holds until the broker acknowledged: 10 s at most.
        async with asyncio.timeout(None if journaled else 10):
            await intake.publish_inbound(
                rt, outcome.messages, receipts=outcome.receipts, journaled=journaled
            )
    except bus.UNWRITABLE_ERRORS as exc:
        # Never an outage: the same request would be refused again, so say so for good.
        status = 413 if isinstance(exc, bus.TOO_LARGE_ERRORS) else 400
        raise RejectedInput(
            f"cannot be stored: the broker refuses it ({exc})", status=status
        ) from exc


def _refused(kind: str, exc: RejectedInput) -> Response:
    log.warning("webhook %s refused (%d): %s", kind, exc.status, exc.reason)
    return Response(exc.reason, status_code=exc.status, media_type="text/plain")


def _webhook_request(rt: Runtime, request: Request, body: bytes) -> WebhookRequest:
    # The URL as the platform called it: the public URL, then the path and query.
    url = f"{rt.settings.public_base()}{request.url.path}"
    if request.url.query:
        url += f"?{request.url.query}"
    return WebhookRequest(
        method=request.method, url=url, query=dict(request.query_params),
        headers={k.lower(): v for k, v in request.headers.items()}, body=body,
        remote_addr=request.client.host if request.client else None,
    )  # fmt: skip


@router.api_route("/{path:path}", methods=["GET", "POST"])
async def webhook(path: str, request: Request) -> Response:
    """A platform's call: verification, signed events, messages and delivery reports.

    `path` names the adapter (`facebook`, `twitter`, `telegram`, `sms/kannel`, `sms/twilio`);
    the adapter checks the call and says what it carried, and the answer is 2xx once the
    broker or the inbound journal has that.
    """
    adapter = registry.by_path(path)
    if adapter is None or adapter.webhook is None:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    if request.method not in adapter.webhook_methods:
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405,
                            headers={"Allow": ", ".join(adapter.webhook_methods)})  # fmt: skip
    rt: Runtime = request.app.state.runtime
    kind = adapter.name
    try:
        account = _pick(rt, adapter, request)
        body = await _read_body(request)
        outcome = await adapter.webhook(
            account, _webhook_request(rt, request, body), rt.adapter_context()
        )
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
