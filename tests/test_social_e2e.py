"""Messenger, X and Telegram end to end: webhooks and polling in, replies out to local platform servers."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.platforms import GraphServer, PlatformServer, Recorded, TelegramServer, XServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
T = TypeVar("T")

FB_APP_SECRET = "fb-app-secret-0123456789"
FB_PAGE = "1234567890"
X_CONSUMER_SECRET = "x-consumer-secret-0123456789"
X_ME = "4337869213"
TG_SECRET = "tg-webhook-secret-42"
KANNEL_SECRET = "kannel-inbound-secret-0123"
_ids = itertools.count(int(time.time() * 1000))


def next_id() -> int:
    return next(_ids)


class PlatformLoop:
    """The local platform servers run on their own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="platforms", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, action: Callable[[], T]) -> T:
        """Run `action` on the servers' loop, so it never races a request handler."""

        async def run() -> T:
            return action()

        return self.run(run())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class Platforms:
    loop: PlatformLoop
    graph: GraphServer
    x: XServer
    x_poll: XServer
    tg: TelegramServer
    tg_poll: TelegramServer


@pytest.fixture(scope="module")
def platforms() -> Iterator[Platforms]:
    loop = PlatformLoop()
    servers = Platforms(
        loop=loop,
        graph=GraphServer(page_token="page-token-e2e"),
        x=XServer(user_id=X_ME),
        x_poll=XServer(user_id="9001"),
        tg=TelegramServer(token="111111:hook-token"),
        tg_poll=TelegramServer(token="222222:poll-token", bot_id=222222),
    )
    for server in (servers.graph, servers.x, servers.x_poll, servers.tg, servers.tg_poll):
        loop.run(server.start())
    yield servers
    for server in (servers.graph, servers.x, servers.x_poll, servers.tg, servers.tg_poll):
        loop.run(server.stop())
    loop.close()


def social_config(p: Platforms) -> str:
    return f"""
[[channels.facebook]]
name = "fb-page"
page_id = "{FB_PAGE}"
app_secret = "env:TEST_FB_APP_SECRET"
verify_token = "fb-verify-token"
page_token = "env:TEST_FB_PAGE_TOKEN"
graph_url = "{p.graph.url}/v19.0"

[[channels.twitter]]
name = "x-help"
consumer_key = "x-consumer-key"
consumer_secret = "env:TEST_X_CONSUMER_SECRET"
access_token = "x-access-token"
access_token_secret = "x-access-token-secret"
api_url = "{p.x.url}"
user_id = "{X_ME}"

[[channels.twitter]]
name = "x-poll"
consumer_key = "x-consumer-key"
consumer_secret = "x-consumer-secret-poll"
access_token = "x-access-token"
access_token_secret = "x-access-token-secret"
api_url = "{p.x_poll.url}"
user_id = "{p.x_poll.user_id}"
polling = true
poll_seconds = 0.3

[[channels.telegram]]
name = "tg-hook"
token = "{p.tg.token}"
secret_token = "env:TEST_TG_SECRET"
api_url = "{p.tg.url}"

[[channels.telegram]]
name = "tg-poll"
token = "{p.tg_poll.token}"
api_url = "{p.tg_poll.url}"
polling = true
poll_seconds = 0.3

[[channels.sms]]
name = "kannel-main"
provider = "kannel"
sender = "1500123"
sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "env:TEST_KANNEL_SECRET"
"""


@pytest.fixture(scope="module")
def social_db() -> Iterator[str]:
    url = db.create_database("loket_social")
    yield url
    db.drop_database(url)


@pytest.fixture(scope="module")
def social_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    # Its own broker: another running stack in this session would share the topics.
    server = TansuBroker.start(log_dir=tmp_path_factory.mktemp("social-tansu"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def social(
    platforms: Platforms,
    social_db: str,
    social_broker: TansuBroker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LoketStack]:
    running = LoketStack(
        database_url=social_db,
        bootstrap=social_broker.bootstrap,
        config_text=social_config(platforms),
        workdir=tmp_path_factory.mktemp("social-loket"),
        extra_env={
            "TEST_FB_APP_SECRET": FB_APP_SECRET,
            "TEST_FB_PAGE_TOKEN": platforms.graph.page_token,
            "TEST_X_CONSUMER_SECRET": X_CONSUMER_SECRET,
            "TEST_TG_SECRET": TG_SECRET,
            "TEST_KANNEL_SECRET": KANNEL_SECRET,
            "LOKET_MAX_ATTEMPTS": "3",
        },
    )
    running.up()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def agent(social: LoketStack) -> Iterator[httpx.Client]:
    client = social.client()
    yield client
    client.close()


def fixture_json(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


# --- one inbound event per channel, built from the documented fixture payloads ---------------


@dataclass
class Event:
    """A webhook request as the platform would send it, and what it should become."""

    body: bytes
    headers: dict[str, str]
    external_id: str
    sender: str


class Channel:
    """What the tests need to know about one channel."""

    name: str
    path: str
    send_path: str
    permanent_message: str

    def __init__(self, p: Platforms):
        self.p = p

    @property
    def server(self) -> PlatformServer:
        raise NotImplementedError

    def event(self, sender: str, text: str) -> Event:
        raise NotImplementedError

    def new_sender(self) -> str:
        return str(next_id())

    def forged(self, event: Event) -> dict[str, str]:
        raise NotImplementedError

    def unsigned(self, event: Event) -> dict[str, str]:
        raise NotImplementedError

    def check_sent(self, request: Recorded, sender: str, text: str) -> None:
        raise NotImplementedError

    def sends_to(self, sender: str) -> list[Recorded]:
        raise NotImplementedError


class Messenger(Channel):
    name = "facebook"
    path = "/webhooks/facebook"
    send_path = f"/v19.0/{FB_PAGE}/messages"
    permanent_message = "No matching user found"

    @property
    def server(self) -> PlatformServer:
        return self.p.graph

    def event(self, sender: str, text: str) -> Event:
        payload = fixture_json("messenger_text.json")
        messaging = payload["entry"][0]["messaging"][0]
        mid = f"m_{next_id()}"
        messaging["sender"]["id"] = sender
        messaging["timestamp"] = int(time.time() * 1000)  # inside the 24-hour window
        messaging["message"]["mid"] = mid
        messaging["message"]["text"] = text
        body = json.dumps(payload).encode()
        digest = hmac.new(FB_APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}
        return Event(body, headers, mid, sender)

    def forged(self, event: Event) -> dict[str, str]:
        digest = hmac.new(b"not-the-app-secret", event.body, hashlib.sha256).hexdigest()
        return {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}

    def unsigned(self, event: Event) -> dict[str, str]:
        return {"content-type": "application/json"}

    def sends_to(self, sender: str) -> list[Recorded]:
        return [
            r for r in self.p.graph.calls(self.send_path) if r.json()["recipient"]["id"] == sender
        ]

    def check_sent(self, request: Recorded, sender: str, text: str) -> None:
        assert request.method == "POST"
        assert request.headers["authorization"] == f"Bearer {self.p.graph.page_token}"
        assert "access_token" not in request.query
        assert request.json() == {
            "recipient": {"id": sender},
            "messaging_type": "RESPONSE",
            "message": {"text": text},
        }


def x_signature(secret: str, body: bytes) -> str:
    return (
        "sha256="
        + base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    )


class X(Channel):
    name = "twitter"
    path = "/webhooks/twitter?account=x-help"
    send_path = "/2/dm_conversations/with/"
    permanent_message = "You cannot send messages to this user."

    @property
    def server(self) -> PlatformServer:
        return self.p.x

    def event(self, sender: str, text: str) -> Event:
        payload = fixture_json("twitter_dm.json")
        theirs, ours = payload["direct_message_events"]
        theirs["id"], ours["id"] = str(next_id()), str(next_id())
        theirs["created_timestamp"] = str(int(time.time() * 1000))
        theirs["message_create"]["sender_id"] = sender
        theirs["message_create"]["message_data"]["text"] = text
        ours["message_create"]["target"]["recipient_id"] = sender  # our own echo: ignored
        payload["users"][sender] = payload["users"].pop("3001969357") | {"id": sender}
        body = json.dumps(payload).encode()
        headers = {
            "x-twitter-webhooks-signature": x_signature(X_CONSUMER_SECRET, body),
            "content-type": "application/json",
        }
        return Event(body, headers, theirs["id"], sender)

    def forged(self, event: Event) -> dict[str, str]:
        return {
            "x-twitter-webhooks-signature": x_signature("guessed", event.body),
            "content-type": "application/json",
        }

    def unsigned(self, event: Event) -> dict[str, str]:
        return {"content-type": "application/json"}

    def sends_to(self, sender: str) -> list[Recorded]:
        return self.p.x.calls(f"{self.send_path}{sender}/messages")

    def check_sent(self, request: Recorded, sender: str, text: str) -> None:
        assert request.method == "POST"
        assert request.path == f"/2/dm_conversations/with/{sender}/messages"
        assert request.json() == {"text": text}
        assert request.headers["authorization"].startswith("OAuth ")  # user context


class Telegram(Channel):
    name = "telegram"
    path = "/webhooks/telegram?account=tg-hook"
    send_path = "/sendMessage"
    permanent_message = "Forbidden: bot was blocked by the user"

    @property
    def server(self) -> PlatformServer:
        return self.p.tg

    def event(self, sender: str, text: str) -> Event:
        update = telegram_update(int(sender), text=text)
        body = json.dumps(update).encode()
        headers = {"x-telegram-bot-api-secret-token": TG_SECRET, "content-type": "application/json"}
        return Event(body, headers, f"{sender}:{update['message']['message_id']}", sender)

    def forged(self, event: Event) -> dict[str, str]:
        return {
            "x-telegram-bot-api-secret-token": "guessed-secret",
            "content-type": "application/json",
        }

    def unsigned(self, event: Event) -> dict[str, str]:
        return {"content-type": "application/json"}

    def sends_to(self, sender: str) -> list[Recorded]:
        return [r for r in self.p.tg.calls(self.send_path) if r.form().get("chat_id") == sender]

    def check_sent(self, request: Recorded, sender: str, text: str) -> None:
        assert request.method == "POST"
        assert request.path == f"/bot{self.p.tg.token}/sendMessage"
        form = request.form()
        assert form["chat_id"] == sender and form["text"] == text


def telegram_update(
    user: int, *, text: str | None = None, shared_phone: str | None = None
) -> dict[str, Any]:
    """The text or own-contact fixture Update, re-addressed to a fresh user and ids."""
    update = fixture_json("telegram_contact.json" if shared_phone else "telegram_text.json")
    update = copy.deepcopy(update)
    update["update_id"] = next_id()
    message = update["message"]
    message["message_id"] = next_id()
    message["from"]["id"] = user
    message["chat"]["id"] = user
    message["date"] = int(time.time())
    if shared_phone:
        message["contact"]["phone_number"] = shared_phone
        message["contact"]["user_id"] = user
    else:
        message["text"] = text
    return update


CHANNELS = [Messenger, X, Telegram]


@pytest.fixture(params=CHANNELS, ids=[c.name for c in CHANNELS])
def channel(request: pytest.FixtureRequest, platforms: Platforms) -> Channel:
    made: Channel = request.param(platforms)
    return made


# --- helpers ------------------------------------------------------------------------------------


def post(stack: LoketStack, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", content=body, headers=headers, timeout=30)


def inbound(url: str, channel: str, external_id: str) -> list[dict[str, Any]]:
    return db.fetch(
        url,
        "SELECT * FROM messages WHERE channel = $1 AND external_id = $2 AND direction = 'in'",
        channel,
        external_id,
    )


def messages_from(url: str, channel: str, sender: str) -> list[dict[str, Any]]:
    return db.fetch(
        url,
        "SELECT * FROM messages WHERE channel = $1 AND sender = $2 AND direction = 'in' ORDER BY id",
        channel,
        sender,
    )


def stored_once(url: str, channel: Channel, event: Event) -> dict[str, Any]:
    rows = wait_until(
        lambda: inbound(url, channel.name, event.external_id), what=f"{channel.name} ingested"
    )
    assert len(rows) == 1
    return rows[0]


def reply_status(url: str, message_id: int) -> dict[str, Any]:
    return db.fetch(
        url,
        "SELECT status, status_reason, provider_id, attempts FROM messages WHERE id = $1",
        message_id,
    )[0]


def send_reply(agent: httpx.Client, ticket_id: int, text: str) -> int:
    response = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": text})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def phone_number() -> tuple[str, str]:
    """A fresh Indonesian mobile number as typed locally (`0812…`) and in E.164."""
    rest = f"{random.randrange(10**7, 10**8)}"
    return f"0812{rest}", f"+62812{rest}"


def sms(
    stack: LoketStack, sender: str, text: str, *, secret: str = KANNEL_SECRET
) -> tuple[httpx.Response, str]:
    kannel_id = f"kannel-{next_id()}"
    params = {
        "account": "kannel-main",
        "secret": secret,
        "from": sender,
        "to": "1500123",
        "text": text,
        "id": kannel_id,
    }
    return httpx.get(f"{stack.url}/webhooks/sms/kannel", params=params, timeout=30), kannel_id


# --- per channel --------------------------------------------------------------------------------


def test_event_becomes_ticket_and_reply_reaches_platform(
    social: LoketStack, social_db: str, agent: httpx.Client, channel: Channel
) -> None:
    sender = channel.new_sender()
    event = channel.event(sender, "Halo, paspor saya belum jadi")
    response = post(social, channel.path, event.body, event.headers)
    assert response.status_code == 200, response.text
    row = stored_once(social_db, channel, event)
    assert row["sender"] == sender and row["body_text"] == "Halo, paspor saya belum jadi"
    ticket = agent.get(f"/api/tickets/{row['ticket_id']}").json()
    assert ticket["status"] == "open" and ticket["channel"] == channel.name
    assert [m["external_id"] for m in ticket["messages"]] == [event.external_id]

    text = f"Paspor Anda sedang dicetak ({channel.name})."
    reply_id = send_reply(agent, row["ticket_id"], text)
    wait_until(lambda: reply_status(social_db, reply_id)["status"] == "sent", what="reply sent")
    [request] = channel.sends_to(sender)
    channel.check_sent(request, sender, text)
    status = reply_status(social_db, reply_id)
    assert status["provider_id"] and status["status_reason"] is None


def test_same_event_twice_is_one_message(
    social: LoketStack, social_db: str, channel: Channel
) -> None:
    sender = channel.new_sender()
    event = channel.event(sender, "Pesan pertama")
    for _ in range(2):
        assert post(social, channel.path, event.body, event.headers).status_code == 200
    # A later message from the same person shares the partition: once it is stored, the
    # second delivery of the first one has been handled too.
    later = channel.event(sender, "Pesan kedua")
    assert post(social, channel.path, later.body, later.headers).status_code == 200
    stored_once(social_db, channel, later)
    rows = messages_from(social_db, channel.name, sender)
    assert [r["external_id"] for r in rows] == [event.external_id, later.external_id]
    assert len({r["ticket_id"] for r in rows}) == 1


def test_forged_or_missing_signature_stores_nothing(
    social: LoketStack, social_db: str, channel: Channel
) -> None:
    sender = channel.new_sender()
    event = channel.event(sender, "Kirim uang ke rekening ini")
    forged = post(social, channel.path, event.body, channel.forged(event))
    assert forged.status_code == 403, forged.text
    missing = post(social, channel.path, event.body, channel.unsigned(event))
    assert missing.status_code == 401, missing.text
    genuine = channel.event(sender, "Pesan asli")
    assert post(social, channel.path, genuine.body, genuine.headers).status_code == 200
    stored_once(social_db, channel, genuine)
    assert [r["external_id"] for r in messages_from(social_db, channel.name, sender)] == [
        genuine.external_id
    ]


def ticket_with_message(stack: LoketStack, url: str, channel: Channel) -> tuple[str, int]:
    sender = channel.new_sender()
    event = channel.event(sender, "Mohon dibantu")
    assert post(stack, channel.path, event.body, event.headers).status_code == 200
    return sender, int(stored_once(url, channel, event)["ticket_id"])


# Rate-limit hints kept small so the rescheduled attempt comes soon: Graph estimates the
# wait in minutes (0.02 min = 1.2 s), Telegram and X in seconds.
RATE_LIMIT_HINT: dict[str, Any] = {"facebook": 0.02, "twitter": 1, "telegram": 1}


def test_rate_limited_reply_is_retried_then_sent(
    social: LoketStack, social_db: str, agent: httpx.Client, channel: Channel
) -> None:
    sender, ticket_id = ticket_with_message(social, social_db, channel)
    platforms_loop = channel.p.loop
    platforms_loop.call(
        lambda: channel.server.fail_next(
            1,
            "rate_limit",
            path_contains=channel.send_path,
            retry_after=RATE_LIMIT_HINT[channel.name],
        )
    )
    started = time.monotonic()
    reply_id = send_reply(agent, ticket_id, "Sebentar, kami periksa.")
    wait_until(
        lambda: reply_status(social_db, reply_id)["status"] == "sent",
        timeout=40,
        what="sent after retry",
    )
    elapsed = time.monotonic() - started
    attempts = channel.sends_to(sender)
    assert len(attempts) == 2, [a.path for a in attempts]
    channel.check_sent(attempts[-1], sender, "Sebentar, kami periksa.")
    status = reply_status(social_db, reply_id)
    assert status["attempts"] == 2 and status["status_reason"] is None
    assert elapsed >= 1.0  # the platform's hint was honoured, not an immediate retry


def test_permanent_error_fails_reply_with_platform_message(
    social: LoketStack, social_db: str, agent: httpx.Client, channel: Channel
) -> None:
    sender, ticket_id = ticket_with_message(social, social_db, channel)
    channel.p.loop.call(
        lambda: channel.server.fail_next(1, "permanent", path_contains=channel.send_path)
    )
    reply_id = send_reply(agent, ticket_id, "Balasan yang tidak akan sampai.")
    wait_until(lambda: reply_status(social_db, reply_id)["status"] == "failed", what="reply failed")
    status = reply_status(social_db, reply_id)
    assert channel.permanent_message in status["status_reason"]
    assert len(channel.sends_to(sender)) == 1  # not retried
    ticket = agent.get(f"/api/tickets/{ticket_id}").json()
    [out] = [m for m in ticket["messages"] if m["id"] == reply_id]
    assert out["status"] == "failed" and channel.permanent_message in out["status_reason"]


def test_x_mention_is_answered_with_a_reply_tweet(
    social: LoketStack, social_db: str, agent: httpx.Client, platforms: Platforms
) -> None:
    payload = fixture_json("twitter_mention.json")
    tweet = payload["tweet_create_events"][0]
    author = str(next_id())
    tweet_id = str(next_id())
    tweet["id"], tweet["id_str"] = int(tweet_id), tweet_id
    tweet["user"]["id"], tweet["user"]["id_str"] = int(author), author
    body = json.dumps(payload).encode()
    headers = {"x-twitter-webhooks-signature": x_signature(X_CONSUMER_SECRET, body)}
    assert post(social, "/webhooks/twitter?account=x-help", body, headers).status_code == 200
    [row] = wait_until(lambda: inbound(social_db, "twitter", tweet_id), what="mention ingested")
    reply_id = send_reply(agent, row["ticket_id"], "@furiouscamper Sudah kami teruskan ke tim web.")
    wait_until(
        lambda: reply_status(social_db, reply_id)["status"] == "sent", what="reply tweet sent"
    )
    [request] = [
        r
        for r in platforms.x.calls("/2/tweets")
        if r.json().get("reply", {}).get("in_reply_to_tweet_id") == tweet_id
    ]
    assert request.json() == {
        "text": "@furiouscamper Sudah kami teruskan ke tim web.",
        "reply": {"in_reply_to_tweet_id": tweet_id},
    }


def test_messenger_reply_after_a_day_carries_the_human_agent_tag(
    social: LoketStack, social_db: str, agent: httpx.Client, platforms: Platforms
) -> None:
    messenger = Messenger(platforms)
    sender = messenger.new_sender()
    payload = json.loads(messenger.event(sender, "Pesan kemarin lusa").body)
    # The person wrote two days ago: outside the 24-hour window, inside the 7-day one.
    payload["entry"][0]["messaging"][0]["timestamp"] = int((time.time() - 2 * 86400) * 1000)
    body = json.dumps(payload).encode()
    digest = hmac.new(FB_APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}
    assert post(social, messenger.path, body, headers).status_code == 200
    mid = payload["entry"][0]["messaging"][0]["message"]["mid"]
    [row] = wait_until(lambda: inbound(social_db, "facebook", mid), what="old message ingested")
    reply_id = send_reply(agent, row["ticket_id"], "Maaf baru kami balas.")
    wait_until(lambda: reply_status(social_db, reply_id)["status"] == "sent", what="tagged reply")
    [request] = messenger.sends_to(sender)
    assert request.json() == {
        "recipient": {"id": sender},
        "messaging_type": "MESSAGE_TAG",
        "tag": "HUMAN_AGENT",
        "message": {"text": "Maaf baru kami balas."},
    }


def test_telegram_group_message_is_answered_in_the_group(
    social: LoketStack, social_db: str, agent: httpx.Client, platforms: Platforms
) -> None:
    user = next_id() % 10**9
    group = -(10**12) - next_id() % 10**9
    update = telegram_update(user, text="Admin, formulir di grup ini error")
    update["message"]["chat"] = {"id": group, "title": "Operator Sekolah", "type": "supergroup"}
    external_id = telegram_webhook(social, update)
    [row] = wait_until(lambda: inbound(social_db, "telegram", external_id), what="group message")
    assert row["sender"] == str(user)
    reply_id = send_reply(agent, row["ticket_id"], "Kami cek formulirnya.")
    wait_until(lambda: reply_status(social_db, reply_id)["status"] == "sent", what="group reply")
    [request] = [r for r in platforms.tg.calls("/sendMessage") if r.form()["chat_id"] == str(group)]
    assert request.form()["text"] == "Kami cek formulirnya."


# --- polling ------------------------------------------------------------------------------------


def cursor_of(url: str, channel: str, account: str) -> Any:
    rows = db.fetch(
        url,
        "SELECT cursor FROM channel_cursors WHERE channel = $1 AND account = $2 AND scope = ''",
        channel,
        account,
    )
    return json.loads(rows[0]["cursor"]) if rows else None


def test_x_polling_ingests_dms(social: LoketStack, social_db: str, platforms: Platforms) -> None:
    sender = str(next_id())
    events = [
        {
            "id": str(next_id()),
            "event_type": "MessageCreate",
            "text": text,
            "sender_id": sender,
            "created_at": "2025-06-02T03:04:05.000Z",
            "dm_conversation_id": f"{sender}-9001",
        }
        for text in ("DM pertama", "DM kedua", "DM ketiga")
    ]

    def publish() -> None:
        platforms.x_poll.dm_events[0:0] = list(reversed(events))  # the API lists newest first

    platforms.loop.call(publish)

    def x_cursor() -> dict[str, str]:
        stored = cursor_of(social_db, "twitter", "x-poll")
        return json.loads(stored["cursor"]) if stored else {}

    wait_until(lambda: len(messages_from(social_db, "twitter", sender)) == 3, what="polled DMs")
    rows = messages_from(social_db, "twitter", sender)
    assert sorted(r["body_text"] for r in rows) == ["DM kedua", "DM ketiga", "DM pertama"]
    assert {r["account"] for r in rows} == {"x-poll"}
    wait_until(lambda: x_cursor().get("dm") == events[-1]["id"], what="X cursor stored")


def test_telegram_polling_backfills_after_restart_without_duplicates(
    social: LoketStack, social_db: str, platforms: Platforms
) -> None:
    server = platforms.tg_poll
    user = next_id() % 10**9
    first = [telegram_update(user, text=f"Lewat polling {i}") for i in range(3)]
    platforms.loop.call(lambda: server.updates.extend(first))
    wait_until(
        lambda: len(messages_from(social_db, "telegram", str(user))) == 3, what="polled updates"
    )
    last = first[-1]["update_id"]
    wait_until(
        lambda: cursor_of(social_db, "telegram", "tg-poll") == {"cursor": str(last)},
        what="cursor stored",
    )
    # The next getUpdates confirms them to Telegram (offset = last + 1).
    wait_until(
        lambda: any(r.form().get("offset") == str(last + 1) for r in server.calls("/getUpdates")),
        what="updates confirmed",
    )

    social.stop()
    # Written while loket is down: the Bot API keeps them until they are fetched.
    later = [telegram_update(user, text=f"Saat mati {i}") for i in range(2)]
    platforms.loop.call(lambda: server.updates.extend(later))
    calls_before = len(server.calls("/getUpdates"))
    social.up()
    # Tansu lets the new consumers into their groups only after the old members' session
    # timeout has run out (about 35 s here), so the backfill takes that long.
    wait_until(
        lambda: len(messages_from(social_db, "telegram", str(user))) >= 5,
        timeout=120,
        what="backfill",
    )
    first_after = server.calls("/getUpdates")[calls_before]
    assert first_after.form().get("offset") == str(last + 1)  # resumed from the stored cursor
    time.sleep(1.5)  # several more polls
    rows = messages_from(social_db, "telegram", str(user))
    assert [r["body_text"] for r in rows] == [f"Lewat polling {i}" for i in range(3)] + [
        f"Saat mati {i}" for i in range(2)
    ]
    assert len({r["ticket_id"] for r in rows}) == 1
    wait_until(
        lambda: (
            cursor_of(social_db, "telegram", "tg-poll") == {"cursor": str(later[-1]["update_id"])}
        ),
        what="cursor advanced after restart",
    )


def channel_up(stack: LoketStack, channel: str, account: str) -> float | None:
    """The `loket_channel_up` gauge of one account, as /metrics shows it."""
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loket_channel_up" and sample.labels == {
                "channel": channel,
                "account": account,
            }:
                return float(sample.value)
    return None


def health_of(url: str, channel: str, account: str, state: str) -> dict[str, Any] | None:
    """The channel_health row of one account when it is in `state`."""
    rows = db.fetch(url, "SELECT state, last_ok_at, last_error FROM channel_health"
                         " WHERE channel = $1 AND account = $2 AND state = $3", channel, account, state)  # fmt: skip
    return rows[0] if rows else None


def test_telegram_polling_outage_backs_off_and_recovers(
    social: LoketStack, social_db: str, platforms: Platforms
) -> None:
    server = platforms.tg_poll
    wait_until(lambda: channel_up(social, "telegram", "tg-poll") == 1.0, what="poller healthy")
    started = time.monotonic()
    platforms.loop.call(lambda: server.fail_next(3, "server_error", path_contains="/getUpdates"))
    user = next_id() % 10**9
    update = telegram_update(user, text="Dikirim saat Telegram gangguan")
    platforms.loop.call(lambda: server.updates.append(update))
    wait_until(lambda: channel_up(social, "telegram", "tg-poll") == 0.0, what="channel down")
    # `loket status` and the ops view read the same state, with the reason, from the database.
    down = wait_until(
        lambda: health_of(social_db, "telegram", "tg-poll", "down"), what="health down"
    )
    assert down["last_error"], down
    wait_until(
        lambda: messages_from(social_db, "telegram", str(user)), what="ingested after outage"
    )
    elapsed = time.monotonic() - started
    wait_until(lambda: channel_up(social, "telegram", "tg-poll") == 1.0, what="channel up again")
    up = wait_until(lambda: health_of(social_db, "telegram", "tg-poll", "up"), what="health up")
    assert up["last_error"] is None and up["last_ok_at"] is not None
    # Three failed polls, then pauses of 1 s, 2 s and 4 s: the poller backs off, it does not hammer.
    assert elapsed >= 6.5, elapsed


# --- shared contact -----------------------------------------------------------------------------


def telegram_webhook(stack: LoketStack, update: dict[str, Any]) -> str:
    headers = {"x-telegram-bot-api-secret-token": TG_SECRET, "content-type": "application/json"}
    response = post(
        stack, "/webhooks/telegram?account=tg-hook", json.dumps(update).encode(), headers
    )
    assert response.status_code == 200, response.text
    return f"{update['message']['chat']['id']}:{update['message']['message_id']}"


def caller_of(url: str, channel: str, external_id: str) -> int:
    [row] = wait_until(
        lambda: inbound(url, channel, external_id), what=f"{channel} {external_id} stored"
    )
    return int(row["caller_id"])


def test_shared_contact_merges_into_the_caller_holding_the_number(
    social: LoketStack, social_db: str, agent: httpx.Client
) -> None:
    typed, e164 = phone_number()
    response, sms_id = sms(social, typed, "Saya sudah lapor lewat SMS")
    assert response.status_code == 200, response.text
    holder = caller_of(social_db, "sms", sms_id)

    user = next_id() % 10**9
    hello = telegram_webhook(social, telegram_update(user, text="Halo dari Telegram"))
    newcomer = caller_of(social_db, "telegram", hello)
    assert newcomer != holder
    contact = telegram_webhook(social, telegram_update(user, shared_phone=e164.removeprefix("+")))
    assert caller_of(social_db, "telegram", contact) == holder
    # The holder survives; the Telegram caller redirects to it with everything it had.
    assert (
        db.fetchval(social_db, "SELECT merged_into FROM callers WHERE id = $1", newcomer) == holder
    )
    assert db.fetchval(social_db, "SELECT merged_into FROM callers WHERE id = $1", holder) is None
    identities = db.fetch(
        social_db, "SELECT kind, value FROM identities WHERE caller_id = $1 ORDER BY kind", holder
    )
    assert {(i["kind"], i["value"]) for i in identities} == {
        ("phone", e164),
        ("telegram", str(user)),
    }
    assert {caller_of(social_db, "telegram", hello), caller_of(social_db, "sms", sms_id)} == {
        holder
    }
    tickets = agent.get("/api/tickets", params={"caller_id": newcomer}).json()
    assert tickets["total"] == 0


def test_telegram_then_shared_phone_then_sms_is_one_caller(
    social: LoketStack, social_db: str, agent: httpx.Client
) -> None:
    typed, e164 = phone_number()
    user = next_id() % 10**9
    hello = telegram_webhook(
        social, telegram_update(user, text="Selamat pagi, ijazah saya belum terbit")
    )
    caller = caller_of(social_db, "telegram", hello)
    contact = telegram_webhook(social, telegram_update(user, shared_phone=e164.removeprefix("+")))
    assert caller_of(social_db, "telegram", contact) == caller

    response, sms_id = sms(social, typed, "Ini nomor saya, sudah kirim di Telegram juga")
    assert response.status_code == 200, response.text
    assert caller_of(social_db, "sms", sms_id) == caller

    tickets = agent.get("/api/tickets", params={"caller_id": caller}).json()
    assert tickets["total"] == 1
    ticket = agent.get(f"/api/tickets/{tickets['tickets'][0]['id']}").json()
    assert [(m["channel"], m["direction"]) for m in ticket["messages"]] == [
        ("telegram", "in"),
        ("telegram", "in"),
        ("sms", "in"),
    ]
    assert (
        db.fetchval(
            social_db,
            "SELECT count(*) FROM callers WHERE merged_into IS NULL AND id IN"
            " (SELECT caller_id FROM identities WHERE value = ANY($1::text[]))",
            [e164, str(user)],
        )
        == 1
    )


def test_forged_sms_secret_stores_nothing(social: LoketStack, social_db: str) -> None:
    typed, _ = phone_number()
    response, kannel_id = sms(social, typed, "Palsu", secret="not-the-kannel-secret")
    assert response.status_code == 403
    genuine, genuine_id = sms(social, typed, "Asli")
    assert genuine.status_code == 200
    caller_of(social_db, "sms", genuine_id)
    assert inbound(social_db, "sms", kannel_id) == []
