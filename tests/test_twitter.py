"""X adapter: Account Activity payloads and tweepy's AsyncClient against a local API v2 server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.social import twitter
from channels.types import ChannelError, OutboundReply, RejectedInput
from tests.support.platforms import XServer
from tests.support.ports import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
ME = "4337869213"
CUSTOMER = "3001969357"


@pytest.fixture
async def api() -> AsyncIterator[XServer]:
    server = XServer(user_id=ME)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def account(api: XServer) -> twitter.TwitterAccount:
    return twitter.TwitterAccount.from_config(
        {
            "name": "loket_help",
            "consumer_key": "ck",
            "consumer_secret": "consumer-secret",
            "access_token": "at",
            "access_token_secret": "ats",
            "bearer_token": "bt",
            "api_url": api.url,
        }
    )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def signed(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return {"x-twitter-webhooks-signature": "sha256=" + base64.b64encode(digest).decode()}


def reply(**meta: str) -> OutboundReply:
    return OutboundReply(
        message_id=5,
        ticket_id=2,
        channel="twitter",
        account="loket_help",
        recipient=CUSTOMER,
        body_text="Mohon maaf, kami sedang memperbaiki situs pendaftaran.",
        meta=meta,
    )


def dm_event(event_id: int, sender: str, text: str) -> dict[str, object]:
    return {
        "id": str(event_id),
        "event_type": "MessageCreate",
        "text": text,
        "sender_id": sender,
        "dm_conversation_id": f"{CUSTOMER}-{ME}",
        "created_at": "2024-03-01T08:00:00.000Z",
    }


def mention(tweet_id: int, author: str, text: str) -> dict[str, object]:
    return {
        "id": str(tweet_id),
        "text": text,
        "author_id": author,
        "created_at": "2024-03-01T09:00:00.000Z",
    }


def test_from_config_defaults_and_hides_secrets() -> None:
    account = twitter.TwitterAccount.from_config(
        {
            "name": "x",
            "consumer_key": "k",
            "consumer_secret": "topsecret",
            "access_token": "a",
            "access_token_secret": "b",
        }
    )
    assert account.api_url == "https://api.twitter.com"
    assert "topsecret" not in repr(account)


async def test_crc_challenge(account: twitter.TwitterAccount) -> None:
    outcome = await twitter.handle_webhook(account, "GET", {"crc_token": "abc123"}, {}, b"")
    expected = base64.b64encode(
        hmac.new(b"consumer-secret", b"abc123", hashlib.sha256).digest()
    ).decode()
    assert outcome.content_type == "application/json"
    assert json.loads(outcome.body) == {"response_token": f"sha256={expected}"}
    with pytest.raises(RejectedInput):
        await twitter.handle_webhook(account, "GET", {}, {}, b"")


async def test_direct_message_event(account: twitter.TwitterAccount) -> None:
    body = fixture("twitter_dm.json")
    outcome = await twitter.handle_webhook(
        account, "POST", {}, signed("consumer-secret", body), body
    )
    # The second event is our own reply echoed back: nothing for it.
    [raw] = outcome.messages
    assert raw.channel == "twitter" and raw.account == "loket_help"
    assert raw.external_id == "954491830116155396"
    assert raw.sender == CUSTOMER and raw.sender_name == "Jordan Brinks"
    assert raw.body_text == "Halo admin, nomor antrian saya hilang"
    assert raw.received_at == pytest.approx(1516403560.557)
    assert raw.meta["kind"] == "dm" and raw.meta["username"] == "furiouscamper"
    again = await twitter.handle_webhook(account, "POST", {}, signed("consumer-secret", body), body)
    assert again.messages[0].external_id == raw.external_id


async def test_mention_event(account: twitter.TwitterAccount) -> None:
    body = fixture("twitter_mention.json")
    outcome = await twitter.handle_webhook(
        account, "POST", {}, signed("consumer-secret", body), body
    )
    [raw] = outcome.messages
    assert raw.external_id == "954491830116155400"
    assert raw.sender == CUSTOMER
    assert raw.meta == {
        "kind": "mention",
        "tweet_id": "954491830116155400",
        "username": "furiouscamper",
    }
    assert raw.body_text.startswith("@loket_help website pendaftaran")


async def test_forged_or_missing_signature_is_refused(account: twitter.TwitterAccount) -> None:
    body = fixture("twitter_dm.json")
    with pytest.raises(RejectedInput) as missing:
        await twitter.handle_webhook(account, "POST", {}, {}, body)
    assert missing.value.status == 401
    with pytest.raises(RejectedInput) as forged:
        await twitter.handle_webhook(account, "POST", {}, signed("guess", body), body)
    assert forged.value.status == 403


async def test_bad_body_is_400(account: twitter.TwitterAccount) -> None:
    for body in (
        b"{oops",
        b"[]",
        b'{"direct_message_events": []}',
        b'{"for_user_id": "1", "direct_message_events": [{"type": "message_create", "id": "5", "message_create": "x"}]}',
    ):
        with pytest.raises(RejectedInput) as refused:
            await twitter.handle_webhook(account, "POST", {}, signed("consumer-secret", body), body)
        assert refused.value.status == 400


async def test_send_dm(account: twitter.TwitterAccount, api: XServer) -> None:
    result = await twitter.send(account, reply(kind="dm"))
    assert result.status == "sent" and result.provider_id
    [call] = api.calls("/2/dm_conversations/")
    assert call.method == "POST"
    assert call.path == f"/2/dm_conversations/with/{CUSTOMER}/messages"
    assert call.json() == {"text": "Mohon maaf, kami sedang memperbaiki situs pendaftaran."}
    assert call.headers["authorization"].startswith("OAuth ")  # user context, as DMs need


async def test_send_reply_tweet_to_mention(account: twitter.TwitterAccount, api: XServer) -> None:
    result = await twitter.send(account, reply(kind="mention", tweet_id="954491830116155400"))
    assert result.status == "sent"
    [call] = api.calls("/2/tweets")
    assert call.json() == {
        "text": "Mohon maaf, kami sedang memperbaiki situs pendaftaran.",
        "reply": {"in_reply_to_tweet_id": "954491830116155400"},
    }
    assert result.provider_id == str(api._next_id)


async def test_rate_limit_gives_reset_time(account: twitter.TwitterAccount, api: XServer) -> None:
    api.fail_next(1, "rate_limit", retry_after=90)
    with pytest.raises(ChannelError) as throttled:
        await twitter.send(account, reply(kind="dm"))
    assert not throttled.value.permanent
    assert throttled.value.retry_after == pytest.approx(90, abs=2)


async def test_server_error_is_transient(account: twitter.TwitterAccount, api: XServer) -> None:
    api.fail_next(1, "server_error")
    with pytest.raises(ChannelError) as failed:
        await twitter.send(account, reply(kind="dm"))
    assert not failed.value.permanent


async def test_forbidden_is_permanent(account: twitter.TwitterAccount, api: XServer) -> None:
    api.fail_next(1, "permanent")
    with pytest.raises(ChannelError) as failed:
        await twitter.send(account, reply(kind="dm"))
    assert failed.value.permanent
    assert "You cannot send messages to this user." in failed.value.reason


async def test_poll_dms_and_mentions_advances_cursor(
    account: twitter.TwitterAccount, api: XServer
) -> None:
    base = 1_760_000_000_000_000_000
    api.dm_events = [  # newest first, three pages of two
        dm_event(base + 6, CUSTOMER, "ketiga"),
        dm_event(base + 5, ME, "balasan kami"),
        dm_event(base + 4, CUSTOMER, "kedua"),
        dm_event(base + 2, CUSTOMER, "pertama"),
    ]
    api.mentions = [
        mention(base + 9, CUSTOMER, "@loket_help tolong"),
        mention(base + 1, "77", "hi"),
    ]
    messages, cursor = await twitter.poll(account, None)
    texts = sorted(m.body_text for m in messages)
    assert texts == sorted(["ketiga", "kedua", "pertama", "@loket_help tolong", "hi"])
    dms = [m for m in messages if m.meta["kind"] == "dm"]
    assert {m.external_id for m in dms} == {str(base + 6), str(base + 4), str(base + 2)}
    assert all(m.sender == CUSTOMER for m in dms)
    assert json.loads(cursor or "{}") == {"dm": str(base + 6), "mention": str(base + 9)}
    assert len(api.calls("/2/dm_events")) >= 2  # it paged

    again, same = await twitter.poll(account, cursor)
    assert again == [] and same == cursor
    assert api.calls("/mentions")[-1].query["since_id"] == str(base + 9)

    api.dm_events.insert(0, dm_event(base + 10, CUSTOMER, "keempat"))
    newer, advanced = await twitter.poll(account, cursor)
    assert [m.body_text for m in newer] == ["keempat"]
    assert json.loads(advanced or "{}")["dm"] == str(base + 10)


async def test_poll_rate_limited(account: twitter.TwitterAccount, api: XServer) -> None:
    api.fail_next(1, "rate_limit", path_contains="/2/dm_events", retry_after=30)
    with pytest.raises(ChannelError) as throttled:
        await twitter.poll(account, None)
    assert not throttled.value.permanent and 25 <= (throttled.value.retry_after or 0) <= 32


async def test_unreachable_api_is_transient() -> None:
    down = twitter.TwitterAccount.from_config(
        {
            "name": "x",
            "consumer_key": "k",
            "consumer_secret": "s",
            "access_token": "a",
            "access_token_secret": "b",
            "api_url": f"http://127.0.0.1:{free_port()}",
        }
    )
    started = time.monotonic()
    with pytest.raises(ChannelError) as failed:
        await twitter.send(down, reply(kind="dm"))
    assert not failed.value.permanent and time.monotonic() - started < 10
