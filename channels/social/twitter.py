"""Twitter/X: Account Activity webhook and API v2 polling (DMs, mentions); replies by DM or tweet."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tweepy.asynchronous import AsyncClient

from channels.base import Adapter, Context, WebhookRequest, poll_with_media, send_without_context
from channels.social.common import hmac_sha256, json_object, same_secret
from channels.social.twitter_api import call, client_for
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
    epoch_problem,
    possible_epoch,
)

CHANNEL = "twitter"
MAX_PAGES = 50  # bound on one poll's backfill (100 events a page)
DM_FIELDS = [
    "id",
    "text",
    "event_type",
    "created_at",
    "sender_id",
    "dm_conversation_id",
    "attachments",
]
TWEET_FIELDS = ["id", "text", "created_at", "author_id", "conversation_id", "referenced_tweets"]
USER_FIELDS = ["id", "name", "username"]


@dataclass(frozen=True)
class TwitterAccount:
    """One X account (OAuth 1.0a user context for DMs and tweets)."""

    name: str
    consumer_key: str = field(repr=False)
    consumer_secret: str = field(repr=False)
    access_token: str = field(repr=False)
    access_token_secret: str = field(repr=False)
    bearer_token: str = field(default="", repr=False)
    api_url: str = "https://api.twitter.com"
    user_id: str = ""  # our own account id; looked up with users/me when empty

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> TwitterAccount:
        """Build from a config table whose secrets are already resolved."""
        return cls(
            name=str(d["name"]),
            consumer_key=str(d["consumer_key"]),
            consumer_secret=str(d["consumer_secret"]),
            access_token=str(d["access_token"]),
            access_token_secret=str(d["access_token_secret"]),
            bearer_token=str(d.get("bearer_token") or ""),
            api_url=str(d.get("api_url") or cls.api_url).rstrip("/"),
            user_id=str(d.get("user_id") or ""),
        )


def crc_response(account: TwitterAccount, crc_token: str) -> str:
    """The Account Activity CRC answer: `sha256=` + base64 HMAC of the token."""
    digest = hmac_sha256(account.consumer_secret, crc_token.encode())
    return "sha256=" + base64.b64encode(digest).decode()


def signature_valid(account: TwitterAccount, headers: dict[str, str], body: bytes) -> bool:
    """Whether `X-Twitter-Webhooks-Signature` is the consumer secret's HMAC of the raw body."""
    expected = "sha256=" + base64.b64encode(hmac_sha256(account.consumer_secret, body)).decode()
    return same_secret(expected, headers.get("x-twitter-webhooks-signature"))


async def handle_webhook(
    account: TwitterAccount,
    method: str,
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes,
    blobs: BlobStore | None = None,
) -> WebhookOutcome:
    """Answer the CRC check, or verify and parse an Account Activity event batch."""
    if method.upper() == "GET":
        token = query.get("crc_token")
        if not token:
            raise RejectedInput("crc_token missing", status=400)
        answer = json.dumps({"response_token": crc_response(account, token)}).encode()
        return WebhookOutcome(body=answer, content_type="application/json")
    if "x-twitter-webhooks-signature" not in headers:
        raise RejectedInput("missing X-Twitter-Webhooks-Signature", status=401)
    if not signature_valid(account, headers, body):
        raise RejectedInput("X-Twitter-Webhooks-Signature does not match the body", status=403)
    payload = json_object(body)
    me = payload.get("for_user_id")
    if not isinstance(me, str | int):
        raise RejectedInput("not an Account Activity event: for_user_id missing", status=400)
    me = str(me)
    users: dict[str, Any] = payload["users"] if isinstance(payload.get("users"), dict) else {}
    outcome = WebhookOutcome()
    try:
        for event in _list(payload, "direct_message_events"):
            raw = _raw_from_activity_dm(account, me, event, users)
            if raw is not None:
                outcome.messages.append(raw)
        for tweet in _list(payload, "tweet_create_events"):
            raw = _raw_from_activity_tweet(account, me, tweet)
            if raw is not None:
                outcome.messages.append(raw)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A field of the wrong type deep in an event: the batch is malformed.
        raise RejectedInput(f"malformed Account Activity event: {exc!r}", status=400) from exc
    outcome.messages = [checked_inbound(raw) for raw in outcome.messages]
    return outcome


def _list(payload: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = payload.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RejectedInput(f"{key} is not a list of objects", status=400)
    return value


def _raw_from_activity_dm(
    account: TwitterAccount, me: str, event: dict[str, Any], users: dict[str, Any]
) -> RawInbound | None:
    if event.get("type") != "message_create":
        return None
    create = event.get("message_create") or {}
    sender = str(create.get("sender_id") or "")
    if not sender or not event.get("id"):
        raise RejectedInput("direct message event without id or sender", status=400)
    if sender == me:
        return None  # our own reply, echoed back
    data = create.get("message_data") or {}
    user = users.get(sender) or {}
    raw = RawInbound(
        channel=CHANNEL,
        account=account.name,
        external_id=str(event["id"]),
        sender=sender,
        sender_name=user.get("name"),
        received_at=_millis(event.get("created_timestamp"), "created_timestamp"),
        body_text=str(data.get("text") or ""),
        meta={"kind": "dm", "dm_event_id": str(event["id"])},
    )
    if user.get("screen_name"):
        raw.meta["username"] = str(user["screen_name"])
    media = (data.get("attachment") or {}).get("media") or {}
    if media:
        url = str(media.get("media_url_https") or "")
        raw.attachments.append(_media_not_fetched(url, str(media.get("id_str") or "media")))
        raw.problems.append("attachment not fetched: X DM media needs a signed download")
    return raw


def _raw_from_activity_tweet(
    account: TwitterAccount, me: str, tweet: dict[str, Any]
) -> RawInbound | None:
    user = tweet.get("user") or {}
    author = str(user.get("id_str") or user.get("id") or "")
    tweet_id = str(tweet.get("id_str") or tweet.get("id") or "")
    if not author or not tweet_id:
        raise RejectedInput("tweet event without id or author", status=400)
    if author == me or "retweeted_status" in tweet:
        return None  # our own tweets and retweets are not requests for help
    extended = tweet.get("extended_tweet") or {}
    raw = RawInbound(
        channel=CHANNEL,
        account=account.name,
        external_id=tweet_id,
        sender=author,
        sender_name=user.get("name"),
        received_at=_millis(tweet.get("timestamp_ms"), "timestamp_ms"),
        body_text=str(extended.get("full_text") or tweet.get("text") or ""),
        meta={"kind": "mention", "tweet_id": tweet_id},
    )
    if user.get("screen_name"):
        raw.meta["username"] = str(user["screen_name"])
    if tweet.get("in_reply_to_status_id_str"):
        raw.meta["in_reply_to_external_id"] = str(tweet["in_reply_to_status_id_str"])
    return raw


def _media_not_fetched(url: str, fallback: str) -> AttachmentRef:
    name = url.rsplit("/", 1)[-1] or fallback
    return AttachmentRef(
        filename=name,
        content_type="application/octet-stream",
        size=0,
        dropped=f"not fetched: {url}",
    )


def _millis(value: Any, what: str) -> float:
    """An Account Activity time in milliseconds (number or digit string) as seconds.

    Absent, it is the receive time; present, it must be a possible time, else RejectedInput
    (an implausible one becomes the receive time in `checked_inbound`).
    """
    if value is None or value == "":
        return time.time()
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RejectedInput(f"{what} is not a number", status=400)
    try:
        seconds = float(value) / 1000.0
    except ValueError:
        raise RejectedInput(f"{what} {str(value)[:30]!r} is not a number", status=400) from None
    return possible_epoch(seconds, what, given=value)


def _iso(value: Any, problems: list[str]) -> float:
    """A polled `created_at` as seconds; when missing or implausible, the receive time, noted.

    A poll has nobody to refuse a bad value to, and must not stall on one event.
    """
    now = time.time()
    if not isinstance(value, str):
        return now
    try:
        seconds = dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        problems.append(f"unreadable created_at {value[:40]!r}: receive time used")
        return now
    problem = epoch_problem(seconds, now=now)
    if problem is not None:
        problems.append(f"created_at {value[:40]!r} {problem}: receive time used")
        return now
    return seconds


async def send(account: TwitterAccount, reply: OutboundReply) -> DeliveryResult:
    """Reply by DM, or by a reply tweet when the person reached us with a mention."""
    async with client_for(account) as client:
        if reply.meta.get("kind") == "mention":
            tweet_id = reply.meta.get("tweet_id")
            if not tweet_id:
                raise ChannelError("reply to a mention without meta tweet_id", permanent=True)
            answer = await call(
                client.create_tweet(
                    text=reply.body_text, in_reply_to_tweet_id=tweet_id, user_auth=True
                )
            )
            provider_id = (answer.get("data") or {}).get("id")
        else:
            answer = await call(
                client.create_direct_message(participant_id=reply.recipient, text=reply.body_text)
            )
            provider_id = (answer.get("data") or {}).get("dm_event_id")
    if not provider_id:
        raise ChannelError("X accepted the reply without an id", permanent=False)
    return DeliveryResult(status="sent", provider_id=str(provider_id))


def _cursor(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        decoded = json.loads(cursor)
    except ValueError as exc:
        raise ValueError(f"not an X poll cursor: {cursor!r}") from exc
    return {k: str(v) for k, v in decoded.items() if v}


async def poll(
    account: TwitterAccount,
    cursor: str | None,
    blobs: BlobStore | None = None,
    *,
    max_attachment_bytes: int | None = None,
) -> tuple[list[RawInbound], str | None]:
    """Fetch DMs and mentions newer than `cursor`; return them (oldest first) and the new cursor.

    The cursor holds the newest DM event id and the newest mention id seen.
    `max_attachment_bytes` is taken as every poll takes it; X DM media need a signed
    download and are noted, never fetched, so no cap applies yet.
    """
    seen = _cursor(cursor)
    async with client_for(account) as client:
        me = account.user_id
        if not me:
            me = str((await call(client.get_me(user_auth=True))).get("data", {}).get("id", ""))
            if not me:
                raise ChannelError("X users/me answered without an id", permanent=False)
        dms, newest_dm = await _poll_dms(account, client, me, seen.get("dm"))
        mentions, newest_mention = await _poll_mentions(account, client, me, seen.get("mention"))
    next_cursor = dict(seen)
    if newest_dm:
        next_cursor["dm"] = newest_dm
    if newest_mention:
        next_cursor["mention"] = newest_mention
    messages = sorted(dms + mentions, key=lambda raw: raw.received_at)
    return messages, json.dumps(next_cursor, sort_keys=True) if next_cursor else None


async def _poll_dms(
    account: TwitterAccount, client: AsyncClient, me: str, after: str | None
) -> tuple[list[RawInbound], str | None]:
    # /2/dm_events has no since_id: walk pages newest-first until the last seen id.
    messages: list[RawInbound] = []
    newest: str | None = None
    token: str | None = None
    for _ in range(MAX_PAGES):
        params: dict[str, Any] = {
            "dm_event_fields": DM_FIELDS,
            "event_types": "MessageCreate",
            "expansions": ["sender_id"],
            "user_fields": USER_FIELDS,
            "max_results": 100,
        }
        if token:
            params["pagination_token"] = token
        page = await call(client.get_direct_message_events(**params))
        names = _users(page)
        reached_seen = False
        for event in page.get("data") or []:
            event_id = str(event.get("id", ""))
            if after and int(event_id) <= int(after):
                reached_seen = True
                break
            if newest is None or int(event_id) > int(newest):
                newest = event_id
            sender = str(event.get("sender_id") or "")
            if event.get("event_type", "MessageCreate") != "MessageCreate" or sender in ("", me):
                continue
            user = names.get(sender, {})
            problems: list[str] = []
            raw = RawInbound(
                channel=CHANNEL,
                account=account.name,
                external_id=event_id,
                sender=sender,
                sender_name=user.get("name"),
                received_at=_iso(event.get("created_at"), problems),
                body_text=str(event.get("text") or ""),
                meta={"kind": "dm", "dm_event_id": event_id},
                problems=problems,
            )
            if event.get("dm_conversation_id"):
                raw.meta["dm_conversation_id"] = str(event["dm_conversation_id"])
            if user.get("username"):
                raw.meta["username"] = str(user["username"])
            for media_key in (event.get("attachments") or {}).get("media_keys") or []:
                raw.attachments.append(_media_not_fetched("", str(media_key)))
                raw.problems.append("attachment not fetched: X DM media needs a signed download")
            messages.append(raw)
        token = (page.get("meta") or {}).get("next_token")
        if reached_seen or not token:
            break
    return messages, newest


async def _poll_mentions(
    account: TwitterAccount, client: AsyncClient, me: str, since_id: str | None
) -> tuple[list[RawInbound], str | None]:
    messages: list[RawInbound] = []
    newest: str | None = None
    token: str | None = None
    for _ in range(MAX_PAGES):
        params: dict[str, Any] = {
            "tweet_fields": TWEET_FIELDS,
            "expansions": ["author_id"],
            "user_fields": USER_FIELDS,
            "max_results": 100,
            "user_auth": True,
        }
        if since_id:
            params["since_id"] = since_id
        if token:
            params["pagination_token"] = token
        page = await call(client.get_users_mentions(me, **params))
        names = _users(page)
        for tweet in page.get("data") or []:
            tweet_id = str(tweet.get("id", ""))
            if newest is None or int(tweet_id) > int(newest):
                newest = tweet_id
            author = str(tweet.get("author_id") or "")
            if author in ("", me):
                continue
            user = names.get(author, {})
            problems: list[str] = []
            raw = RawInbound(
                channel=CHANNEL,
                account=account.name,
                external_id=tweet_id,
                sender=author,
                sender_name=user.get("name"),
                received_at=_iso(tweet.get("created_at"), problems),
                body_text=str(tweet.get("text") or ""),
                meta={"kind": "mention", "tweet_id": tweet_id},
                problems=problems,
            )
            if user.get("username"):
                raw.meta["username"] = str(user["username"])
            for ref in tweet.get("referenced_tweets") or []:
                if ref.get("type") == "replied_to":
                    raw.meta["in_reply_to_external_id"] = str(ref.get("id"))
            messages.append(raw)
        token = (page.get("meta") or {}).get("next_token")
        if not token:
            break
    return messages, newest


def _users(page: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(u.get("id")): u for u in (page.get("includes") or {}).get("users") or []}


# --- the adapter ------------------------------------------------------------------------------


async def _webhook(
    account: TwitterAccount, request: WebhookRequest, ctx: Context
) -> WebhookOutcome:
    return await handle_webhook(
        account, request.method, request.query, request.headers, request.body, blobs=ctx.blobs
    )


ADAPTER: Adapter[TwitterAccount] = Adapter(
    name="twitter", channel="twitter", path="twitter", account=TwitterAccount.from_config,
    webhook=_webhook, webhook_methods=("GET", "POST"), send=send_without_context(send),
    poll=poll_with_media(poll),
    # X's read endpoints allow a few hundred calls per 15 minutes; once a minute stays inside.
    poll_seconds=60.0,
)  # fmt: skip
