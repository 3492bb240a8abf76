"""The demo's messages, each through its channel's real inbound path onto the raw topic.

Every message enters where a real one does (the mail parser, the SMS gateway's webhook
handler, the platforms' signed webhook handlers); the accounts are in-process, and their
secrets only this process knows: the demo signs its own payloads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from dataclasses import dataclass

from channels.email import parse_email
from channels.sms import kannel
from channels.social import facebook, telegram, twitter
from channels.types import OutboundReply, RawInbound, WebhookOutcome
from workers.pipeline import intake
from workers.runtime.runtime import Runtime
from workers.tools.demo.content import mail
from workers.web.webhooks import publish_outcome


@dataclass(frozen=True)
class DemoAccounts:
    """In-process accounts whose secrets only this process knows: the demo signs its own payloads."""

    sms: kannel.KannelAccount
    telegram: telegram.TelegramAccount
    facebook: facebook.FacebookAccount
    twitter: twitter.TwitterAccount

    @classmethod
    def create(cls) -> DemoAccounts:
        return cls(
            sms=kannel.KannelAccount(
                name="demo-sms", sender="1500123", sendsms_url="http://127.0.0.1:9/cgi-bin/sendsms",
                username="demo", password=secrets.token_urlsafe(16),
                inbound_secret=secrets.token_urlsafe(24),
            ),
            telegram=telegram.TelegramAccount(
                name="demo-telegram", token=f"0:{secrets.token_urlsafe(16)}",
                secret_token=secrets.token_urlsafe(24), api_url="http://127.0.0.1:9",
            ),
            facebook=facebook.FacebookAccount(
                name="demo-facebook", page_id="100200300", app_secret=secrets.token_urlsafe(24),
                verify_token=secrets.token_urlsafe(16), page_token=secrets.token_urlsafe(16),
                graph_url="http://127.0.0.1:9",
            ),
            twitter=twitter.TwitterAccount(
                name="demo-twitter", consumer_key="demo", consumer_secret=secrets.token_urlsafe(24),
                access_token="demo", access_token_secret=secrets.token_urlsafe(16),
                api_url="http://127.0.0.1:9", user_id="4337869213",
            ),
        )  # fmt: skip


def _demo(raw: RawInbound) -> RawInbound:
    raw.meta["demo"] = "1"
    return raw


# --- channels ------------------------------------------------------------------------------


async def send_email(rt: Runtime, name: str, address: str, subject: str, body: str,
                     extra: str | None = None, *, in_reply_to: str | None = None) -> None:  # fmt: skip
    """Through the mail parser, as the IMAP poller does, onto the raw topic."""
    raw = parse_email(
        mail(name, address, subject, body, extra, in_reply_to), account="demo-email", external_id="",
        blobs=rt.blobs, max_attachment_bytes=rt.settings.max_attachment_bytes,
    )  # fmt: skip
    raw.external_id = raw.headers.get("message-id") or f"demo:{uuid.uuid4().hex}"
    await intake.publish_inbound(rt, [_demo(raw)])


async def _publish(rt: Runtime, outcome: WebhookOutcome) -> None:
    for raw in outcome.messages:
        _demo(raw)
    await publish_outcome(rt, outcome)


async def send_sms(rt: Runtime, accounts: DemoAccounts, number: str, text: str) -> None:
    """An MO message as Kannel's sms-service calls the webhook."""
    query = {"from": number, "to": accounts.sms.sender, "text": text, "id": uuid.uuid4().hex,
             "ts": str(int(time.time())), "secret": accounts.sms.inbound_secret}  # fmt: skip
    outcome = kannel.handle_webhook(accounts.sms, "GET", query, {}, b"", remote_addr="127.0.0.1")
    await _publish(rt, outcome)


async def send_telegram(rt: Runtime, accounts: DemoAccounts, user_id: int, first: str, last: str,
                        text: str) -> None:  # fmt: skip
    """A Bot API Update, with the secret token header Telegram sends."""
    user = {
        "id": user_id,
        "is_bot": False,
        "first_name": first,
        "last_name": last,
        "language_code": "id",
    }
    update = {
        "update_id": random.randint(10_000_000, 99_999_999),
        "message": {"message_id": random.randint(1, 10_000_000), "from": user,
                    "chat": {"id": user_id, "first_name": first, "last_name": last, "type": "private"},
                    "date": int(time.time()), "text": text},
    }  # fmt: skip
    headers = {"x-telegram-bot-api-secret-token": accounts.telegram.secret_token}
    outcome = await telegram.handle_webhook(
        accounts.telegram, "POST", {}, headers, json.dumps(update).encode(), blobs=rt.blobs
    )
    await _publish(rt, outcome)


async def send_facebook(rt: Runtime, accounts: DemoAccounts, psid: str, text: str) -> None:
    """A Messenger page event batch, signed with the app secret like Facebook signs it."""
    now_ms = int(time.time() * 1000)
    batch = {"object": "page", "entry": [{"id": accounts.facebook.page_id, "time": now_ms, "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": accounts.facebook.page_id}, "timestamp": now_ms,
         "message": {"mid": f"mid.demo.{uuid.uuid4().hex}", "text": text}}]}]}  # fmt: skip
    body = json.dumps(batch).encode()
    signature = hmac.new(accounts.facebook.app_secret.encode(), body, hashlib.sha256).hexdigest()
    outcome = await facebook.handle_webhook(
        accounts.facebook,
        "POST",
        {},
        {"x-hub-signature-256": f"sha256={signature}"},
        body,
        blobs=rt.blobs,
    )
    await _publish(rt, outcome)


async def send_twitter(rt: Runtime, accounts: DemoAccounts, user_id: str, name: str, handle: str,
                       text: str) -> None:  # fmt: skip
    """An Account Activity direct message event, signed like X signs it."""
    me = accounts.twitter.user_id
    batch = {
        "for_user_id": me,
        "direct_message_events": [{
            "type": "message_create", "id": str(random.randint(10**17, 10**18)),
            "created_timestamp": str(int(time.time() * 1000)),
            "message_create": {"target": {"recipient_id": me}, "sender_id": user_id,
                               "message_data": {"text": text, "entities": {}}},
        }],
        "users": {user_id: {"id": user_id, "name": name, "screen_name": handle},
                  me: {"id": me, "name": "Loket Demo", "screen_name": "loket_demo"}},
    }  # fmt: skip
    body = json.dumps(batch).encode()
    digest = hmac.new(accounts.twitter.consumer_secret.encode(), body, hashlib.sha256).digest()
    headers = {"x-twitter-webhooks-signature": "sha256=" + base64.b64encode(digest).decode()}
    outcome = await twitter.handle_webhook(
        accounts.twitter, "POST", {}, headers, body, blobs=rt.blobs
    )
    await _publish(rt, outcome)


# The demo account of each channel whose replies the demo sinks take (`workers/tools/demo/sinks.py`).
ACCOUNT_NAMES: dict[str, str] = {
    "email": "demo-email", "sms": "demo-sms", "telegram": "demo-telegram",
    "facebook": "demo-facebook", "twitter": "demo-twitter",
}  # fmt: skip


async def answer(rt: Runtime, accounts: DemoAccounts, reply: OutboundReply, text: str) -> None:
    """The person's answer to `reply`, on its channel, from the address it went to."""
    to = reply.recipient
    if reply.channel == "email":
        subject = reply.subject or ""
        subject = subject if subject.lower().startswith("re:") else f"Re: {subject}"
        await send_email(rt, "", to, subject, text, in_reply_to=reply.headers.get("message-id"))
    elif reply.channel == "sms":
        await send_sms(rt, accounts, to, text)
    elif reply.channel == "telegram":
        await send_telegram(rt, accounts, int(to), "Warga", "Demo", text)
    elif reply.channel == "facebook":
        await send_facebook(rt, accounts, to, text)
    elif reply.channel == "twitter":
        await send_twitter(rt, accounts, to, "Warga Demo", "warga_demo", text)
