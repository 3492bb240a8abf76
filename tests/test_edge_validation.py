"""Values no stage could store are refused at the edge with 400, on every adapter and through the real server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from channels.sms import kannel, twilio
from channels.social import facebook, telegram, twitter
from channels.social.common import json_value
from channels.types import (
    BIGINT_MAX,
    DeliveryReceipt,
    RawInbound,
    RejectedInput,
    bigint_id,
    checked_inbound,
    checked_receipt,
    impossible_epoch,
    message_epoch,
)
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.platforms import GraphServer
from tests.support.ports import free_port
from tests.support.stack import LoketStack, wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
NOW = 1_767_000_000.0  # 2025-12-29
T = TypeVar("T")

DEEP = b'{"a": ' + b"[" * 1000 + b"]" * 1000 + b"}"
HUGE_INT = "9" * 400  # parses as a Python int; float() of it overflows


# --- pure checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (DEEP, "nested deeper than 64 levels"),
        (b"[" * 70 + b"]" * 70, "nested deeper than 64 levels"),
        (b'{"t": 1e400}', "number 1e400 is out of range"),
        (b'{"t": -1e400}', "out of range"),
        (b'{"t": NaN}', "NaN is not a JSON number"),
        (b'{"t": Infinity}', "Infinity is not a JSON number"),
        (
            b'{"t": 10000000000000000000000000}',
            "integer 10000000000000000000000000 is out of range",
        ),
        (b'{"t": 9223372036854775808}', "out of range"),
        (b'{"t": ' + b"9" * 5000 + b"}", "out of range"),
        (b'{"t": "\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"\\udfff": 1}', "lone UTF-16 surrogate"),
        (b'{"t": ', "body is not JSON"),
    ],
)
def test_json_value_refuses_what_cannot_be_carried(body: bytes, reason: str) -> None:
    with pytest.raises(RejectedInput) as refused:
        json_value(body)
    assert refused.value.status == 400 and reason in refused.value.reason


def test_json_value_keeps_ordinary_payloads() -> None:
    body = b'{"id": -9223372036854775808, "n": 9223372036854775807, "f": 1.5e10, "s": "\\ud83d\\ude00"}'
    assert json_value(body) == {"id": -(2**63), "n": 2**63 - 1, "f": 1.5e10, "s": "\U0001f600"}
    nested: Any = "bottom"
    for _ in range(63):
        nested = [nested]
    assert json_value(json.dumps(nested).encode()) == nested


@pytest.mark.parametrize(
    ("seconds", "problem"),
    [
        (NOW, None),
        (946_684_800.0, None),  # 2000-01-01, the earliest taken as given
        (NOW + 23 * 3600, None),  # a provider clock some hours ahead
        (946_684_799.0, "before 2000"),
        (1.0, "before 2000"),
        (-62_135_596_800.0, "before 2000"),  # 0001-01-01: possible, not plausible
        (NOW + 25 * 3600, "more than a day in the future"),
        (253_402_214_400.0, "more than a day in the future"),  # 9999-12-30
    ],
)
def test_an_implausible_message_time_becomes_the_receive_time_with_a_problem(
    seconds: float, problem: str | None
) -> None:
    problems: list[str] = []
    kept = message_epoch(seconds, "t", problems, now=NOW)
    if problem is None:
        assert (kept, problems) == (seconds, [])
    else:
        assert kept == NOW
        [noted] = problems
        assert problem in noted and "receive time" in noted


@pytest.mark.parametrize(
    ("seconds", "problem"),
    [
        (float("inf"), "not a finite number"),
        (float("-inf"), "not a finite number"),
        (float("nan"), "not a finite number"),
        (1e30, "outside the years 1 to 9999"),
        (253_402_214_401.0, "outside the years 1 to 9999"),
        (-62_135_596_801.0, "outside the years 1 to 9999"),
    ],
)
def test_an_impossible_message_time_is_refused(seconds: float, problem: str) -> None:
    assert impossible_epoch(seconds) == problem
    problems: list[str] = []
    with pytest.raises(RejectedInput, match=f"not a possible time: {problem}"):
        message_epoch(seconds, "t", problems, now=NOW)
    assert problems == []


@pytest.mark.parametrize(
    "text", ["", "0", "-5", "+5", " 5", "5_000", "٣", "²", "1e3", "9" * 20, str(2**63)]
)
def test_bigint_id_refuses_what_int_would_stretch(text: str) -> None:
    with pytest.raises(RejectedInput) as refused:
        bigint_id(text, "ref")
    assert refused.value.status == 400


def test_bigint_id_reads_plain_ids() -> None:
    assert bigint_id("77", "ref") == 77 and bigint_id(str(BIGINT_MAX), "ref") == BIGINT_MAX


def raw(**fields: Any) -> RawInbound:
    return RawInbound(**{"channel": "sms", "account": "a", "external_id": "x", "sender": "0812",
                         "received_at": NOW, **fields})  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"external_id": ""}, "message id must be 1 to 512"),
        ({"external_id": "x" * 513}, "message id must be 1 to 512"),
        ({"external_id": "a\x00b"}, "NUL"),
        ({"sender": "0" * 257}, "sender is longer than 256"),
        ({"received_at": 1e20}, "message time"),
    ],
)
def test_checked_inbound_refuses_unstorable_keys(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(RejectedInput, match=reason):
        checked_inbound(raw(**fields), now=NOW)


def test_checked_inbound_strips_nul_from_provider_fields() -> None:
    checked = checked_inbound(raw(meta={"to": "15\x0000"}, headers={"x\x00": "y"}), now=NOW)
    assert checked.meta == {"to": "1500"} and checked.headers == {"x": "y"}
    assert checked.problems == ["NUL characters removed from provider fields"]


def test_checked_receipt_keeps_the_receipt_and_fixes_an_informational_time() -> None:
    receipt = checked_receipt(
        DeliveryReceipt(channel="facebook", account="p", status="read", at=1e15), now=NOW
    )
    assert receipt.at == NOW
    with pytest.raises(RejectedInput):
        checked_receipt(
            DeliveryReceipt(channel="sms", account="k", message_id=2**63, status="delivered")
        )


# --- each adapter, called directly ---------------------------------------------------------------

KANNEL = kannel.KannelAccount(
    name="k", sender="1500123", sendsms_url="http://127.0.0.1:9/cgi-bin/sendsms",
    username="u", password="p", inbound_secret="kannel-secret-0123456789",
)  # fmt: skip


def kannel_call(**params: str) -> Any:
    query = {"secret": KANNEL.inbound_secret, **params}
    return kannel.handle_webhook(KANNEL, "GET", query, {}, b"", remote_addr="127.0.0.1")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"from": "0812", "text": "x", "id": "k1", "ts": "9" * 30}, "Kannel ts"),
        ({"from": "0812", "text": "x", "id": "k1", "ts": "9999-12-31 23:59:59"}, "not a possible"),
        ({"from": "0812", "text": "x", "id": "k" * 600}, "message id"),
        ({"type": "1", "ref": "9" * 20}, "DLR `ref`"),
        ({"type": "1", "ref": "٣"}, "DLR `ref`"),
        ({"type": "1", "ref": "+5"}, "DLR `ref`"),
        ({"type": "1", "ref": "0"}, "DLR `ref`"),
        ({"type": "99999", "ref": "5"}, "numeric `type`"),
        ({"type": "١", "ref": "5"}, "numeric `type`"),
    ],
)
def test_kannel_refuses_unstorable_values(params: dict[str, str], reason: str) -> None:
    with pytest.raises(RejectedInput) as refused:
        kannel_call(**params)
    assert refused.value.status == 400 and reason in refused.value.reason


def test_kannel_still_accepts_an_unreadable_ts_with_a_problem() -> None:
    outcome = kannel_call(**{"from": "0812", "text": "x", "id": "k2", "ts": "kemarin"})
    [message] = outcome.messages
    assert message.problems == ["unreadable Kannel timestamp 'kemarin'"]
    assert abs(message.received_at - time.time()) < 60


@pytest.mark.parametrize("ts", ["5", "9999-12-29 23:59:59", "1999-12-31 23:59:59"])
def test_kannel_keeps_a_message_whose_smsc_clock_is_off(ts: str) -> None:
    outcome = kannel_call(**{"from": "0812", "text": "Pulsa hilang", "id": "k3", "ts": ts})
    [message] = outcome.messages
    assert message.body_text == "Pulsa hilang"
    assert abs(message.received_at - time.time()) < 60
    [problem] = message.problems
    assert problem.startswith("Kannel ts") and "receive time" in problem


TWILIO = twilio.TwilioAccount(
    name="t", sender="+6281100001111", account_sid="AC1", auth_token="tok"
)
TWILIO_URL = "https://loket.example/webhooks/sms/twilio?account=t"


def twilio_call(url: str, fields: dict[str, str]) -> Any:
    signature = twilio.compute_signature(
        TWILIO.auth_token, url, {k: [v] for k, v in fields.items()}
    )
    body = httpx.QueryParams(fields).__str__().encode()
    return twilio.handle_webhook(TWILIO, "POST", url, {"x-twilio-signature": signature}, body)


@pytest.mark.parametrize(
    ("url", "fields", "reason"),
    [
        (
            TWILIO_URL + "&ref=" + "9" * 20,
            {"MessageSid": "SM1", "MessageStatus": "delivered"},
            "`ref`",
        ),
        (TWILIO_URL + "&ref=%C2%B2", {"MessageSid": "SM1", "MessageStatus": "delivered"}, "`ref`"),
        (TWILIO_URL, {"MessageSid": "SM2", "From": "+62812", "NumMedia": "abc"}, "NumMedia"),
        (TWILIO_URL, {"MessageSid": "SM2", "From": "+62812", "NumMedia": "99999999"}, "NumMedia"),
        (TWILIO_URL, {"MessageSid": "S" * 600, "From": "+62812"}, "message id"),
    ],
)
def test_twilio_refuses_unstorable_values(url: str, fields: dict[str, str], reason: str) -> None:
    with pytest.raises(RejectedInput) as refused:
        twilio_call(url, fields)
    assert refused.value.status == 400 and reason in refused.value.reason


FACEBOOK = facebook.FacebookAccount.from_config(
    {"name": "p", "app_secret": "app-secret", "verify_token": "v", "page_token": "t"}
)


def fb_body(timestamp: str, **message: Any) -> bytes:
    event = {"mid": "m_1", "text": "halo", **message}
    return (
        '{"object": "page", "entry": [{"id": "1", "time": 1, "messaging": [{"sender": {"id": "55"},'
        f' "recipient": {{"id": "1"}}, "timestamp": {timestamp}, "message": {json.dumps(event)}}}]}}]}}'
    ).encode()


def fb_headers(account: facebook.FacebookAccount, body: bytes) -> dict[str, str]:
    digest = hmac.new(account.app_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"x-hub-signature-256": f"sha256={digest}"}


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("1e400", "out of range"),
        ("NaN", "NaN is not a JSON number"),
        ("10000000000000000000000000", "out of range"),
        (HUGE_INT, "out of range"),
        ("1000000000000000000", "not a possible time"),  # fits int64: year 31 million
        ('"nan"', "not a possible time"),
    ],
)
async def test_facebook_refuses_an_impossible_timestamp(timestamp: str, reason: str) -> None:
    body = fb_body(timestamp)
    with pytest.raises(RejectedInput) as refused:
        await facebook.handle_webhook(FACEBOOK, "POST", {}, fb_headers(FACEBOOK, body), body)
    assert refused.value.status == 400 and reason in refused.value.reason


async def test_facebook_watermark_out_of_range_becomes_the_receive_time() -> None:
    payload = json.loads((FIXTURES / "messenger_read.json").read_text())
    payload["entry"][0]["messaging"][0]["read"]["watermark"] = 10**17
    body = json.dumps(payload).encode()
    outcome = await facebook.handle_webhook(FACEBOOK, "POST", {}, fb_headers(FACEBOOK, body), body)
    [receipt] = outcome.receipts
    assert abs(receipt.at - time.time()) < 60


TELEGRAM = telegram.TelegramAccount("tg", "1:t", "tg-secret-0123456789", "http://127.0.0.1:9")
TG_HEADERS = {"x-telegram-bot-api-secret-token": TELEGRAM.secret_token}


def tg_body(**message: Any) -> bytes:
    update = json.loads((FIXTURES / "telegram_text.json").read_text())
    update["message"].update(message)
    return json.dumps(update).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (tg_body(date=2**80), "out of range"),
        (tg_body(date=2**62), "not a Telegram Update"),  # fits int64, not time_t
        (tg_body(date=1_767_000_000, edit_date=2**40), "not a Telegram Update"),
        (tg_body(message_id=2**80), "out of range"),
        (b'{"update_id": true}', "update_id missing"),
    ],
)
async def test_telegram_refuses_impossible_values(body: bytes, reason: str) -> None:
    with pytest.raises(RejectedInput) as refused:
        await telegram.handle_webhook(TELEGRAM, "POST", {}, TG_HEADERS, body)
    assert refused.value.status == 400 and reason in refused.value.reason


@pytest.mark.parametrize(("date", "problem"), [(5, "before 2000"), (4_000_000_000, "future")])
async def test_telegram_keeps_a_message_with_an_implausible_date(date: int, problem: str) -> None:
    body = tg_body(date=date)
    outcome = await telegram.handle_webhook(TELEGRAM, "POST", {}, TG_HEADERS, body)
    [message] = outcome.messages
    assert abs(message.received_at - time.time()) < 60
    assert any(problem in p and "receive time" in p for p in message.problems), message.problems


async def test_facebook_keeps_a_message_with_an_implausible_timestamp() -> None:
    body = fb_body("5")
    outcome = await facebook.handle_webhook(FACEBOOK, "POST", {}, fb_headers(FACEBOOK, body), body)
    [message] = outcome.messages
    assert message.body_text == "halo"
    assert abs(message.received_at - time.time()) < 60
    [problem] = message.problems
    assert "before 2000" in problem and "receive time" in problem


TWITTER = twitter.TwitterAccount("x", "ck", "consumer-secret", "at", "ats")


def x_body(created: Any) -> bytes:
    payload = json.loads((FIXTURES / "twitter_dm.json").read_text())
    payload["direct_message_events"][0]["created_timestamp"] = created
    return json.dumps(payload).encode()


def x_headers(body: bytes) -> dict[str, str]:
    digest = hmac.new(TWITTER.consumer_secret.encode(), body, hashlib.sha256).digest()
    return {"x-twitter-webhooks-signature": "sha256=" + base64.b64encode(digest).decode()}


@pytest.mark.parametrize("created", ["1e400", "nan", "abc", 10**18, True])
async def test_twitter_refuses_an_impossible_created_timestamp(created: Any) -> None:
    body = x_body(created)
    with pytest.raises(RejectedInput) as refused:
        await twitter.handle_webhook(TWITTER, "POST", {}, x_headers(body), body)
    assert refused.value.status == 400 and "created_timestamp" in refused.value.reason


async def test_twitter_keeps_a_message_with_an_implausible_created_timestamp() -> None:
    body = x_body("1")
    outcome = await twitter.handle_webhook(TWITTER, "POST", {}, x_headers(body), body)
    [message] = outcome.messages
    assert abs(message.received_at - time.time()) < 60
    assert any("before 2000" in p and "receive time" in p for p in message.problems)


async def test_deep_json_and_huge_numbers_are_400_on_every_json_adapter() -> None:
    fb_deep = b'{"object": "page", "entry": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    x_huge = x_body("1516403560557").replace(b'"1516403560557"', HUGE_INT.encode(), 1)
    calls = [
        facebook.handle_webhook(FACEBOOK, "POST", {}, fb_headers(FACEBOOK, fb_deep), fb_deep),
        facebook.handle_webhook(
            FACEBOOK, "POST", {}, fb_headers(FACEBOOK, fb_body(HUGE_INT)), fb_body(HUGE_INT)
        ),
        telegram.handle_webhook(TELEGRAM, "POST", {}, TG_HEADERS, DEEP),
        telegram.handle_webhook(TELEGRAM, "POST", {}, TG_HEADERS, tg_body(date=int(HUGE_INT))),
        twitter.handle_webhook(TWITTER, "POST", {}, x_headers(DEEP), DEEP),
        twitter.handle_webhook(TWITTER, "POST", {}, x_headers(x_huge), x_huge),
    ]
    for call in calls:
        with pytest.raises(RejectedInput) as refused:
            await call
        assert refused.value.status == 400
        assert "nested deeper" in refused.value.reason or "out of range" in refused.value.reason


# --- through the real server ---------------------------------------------------------------------

FB_SECRET = "fb-edge-secret-" + uuid.uuid4().hex
TG_SECRET = "tg-edge-secret-" + uuid.uuid4().hex
X_SECRET = "x-edge-secret-" + uuid.uuid4().hex
KANNEL_SECRET = "kanneledge" + uuid.uuid4().hex
TWILIO_TOKEN = uuid.uuid4().hex
TWILIO_SID = "AC" + uuid.uuid4().hex
MAX_ATTACHMENT = 4 * 1024 * 1024


class PlatformLoop:
    """The fake Graph server runs on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, action: Callable[[], T]) -> T:
        async def run() -> T:
            return action()

        return self.run(run())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def graph() -> Iterator[tuple[PlatformLoop, GraphServer]]:
    loop = PlatformLoop()
    server = GraphServer(page_token="edge-page-token")
    loop.run(server.start())
    yield loop, server
    loop.run(server.stop())
    loop.close()


def edge_config(graph: GraphServer, closed: str) -> str:
    return f"""
[[channels.sms]]
name = "kannel-main"
provider = "kannel"
sender = "1500123"
sendsms_url = "{closed}/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "env:TEST_KANNEL_SECRET"

[[channels.sms]]
name = "twilio-main"
provider = "twilio"
sender = "+6281100001111"
account_sid = "{TWILIO_SID}"
auth_token = "env:TEST_TWILIO_TOKEN"
api_url = "{closed}"

[[channels.telegram]]
name = "tg-hook"
token = "123:edge-token"
secret_token = "env:TEST_TG_SECRET"
api_url = "{closed}"

[[channels.twitter]]
name = "x-help"
consumer_key = "ck"
consumer_secret = "env:TEST_X_SECRET"
access_token = "at"
access_token_secret = "ats"
api_url = "{closed}"
user_id = "4337869213"

[[channels.facebook]]
name = "fb-page"
page_id = "1234567890"
app_secret = "env:TEST_FB_SECRET"
verify_token = "fb-verify-token"
page_token = "edge-page-token"
graph_url = "{graph.url}/v19.0"
media_hosts = ["127.0.0.1:{graph.port}"]
"""


@pytest.fixture(scope="module")
def edge(
    graph: tuple[PlatformLoop, GraphServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoketStack]:
    """A stack of its own (broker, database) with every webhook channel configured."""
    workdir = tmp_path_factory.mktemp("edge")
    broker = TansuBroker.start(log_dir=workdir)
    pg_url = db.create_database("loket_edge")
    stack = LoketStack(
        database_url=pg_url, bootstrap=broker.bootstrap,
        config_text=edge_config(graph[1], f"http://127.0.0.1:{free_port()}"),
        workdir=workdir / "loket",
        extra_env={"TEST_KANNEL_SECRET": KANNEL_SECRET, "TEST_TWILIO_TOKEN": TWILIO_TOKEN,
                   "TEST_TG_SECRET": TG_SECRET, "TEST_X_SECRET": X_SECRET, "TEST_FB_SECRET": FB_SECRET,
                   "LOKET_MAX_ATTACHMENT_BYTES": str(MAX_ATTACHMENT)},
    )  # fmt: skip
    stack.pg_url = pg_url  # type: ignore[attr-defined]
    try:
        stack.up()
        yield stack
    finally:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)


def pg(stack: LoketStack) -> str:
    return stack.pg_url  # type: ignore[attr-defined, no-any-return]


def inbound_count(stack: LoketStack) -> int:
    return int(db.fetchval(pg(stack), "SELECT count(*) FROM messages WHERE direction = 'in'"))


def shunted(stack: LoketStack) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "dlq", "list", "--json"],
        env=stack.env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def signed_fb(body: bytes) -> dict[str, str]:
    digest = hmac.new(FB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


def signed_x(body: bytes) -> dict[str, str]:
    digest = hmac.new(X_SECRET.encode(), body, hashlib.sha256).digest()
    return {
        "Content-Type": "application/json",
        "X-Twitter-Webhooks-Signature": "sha256=" + base64.b64encode(digest).decode(),
    }


TG_OK = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}


def twilio_post(
    client: httpx.Client, stack: LoketStack, query: str, form: dict[str, str]
) -> httpx.Response:
    url = f"{stack.url}/webhooks/sms/twilio?account=twilio-main{query}"
    signature = twilio.compute_signature(TWILIO_TOKEN, url, {k: [v] for k, v in form.items()})
    return client.post(url, data=form, headers={"X-Twilio-Signature": signature})


def fresh_fb_event(mid: str, sender: str, timestamp: str = "", attachment_url: str = "") -> bytes:
    message: dict[str, Any] = {"mid": mid, "text": "lampiran"}
    if attachment_url:
        message["attachments"] = [{"type": "image", "payload": {"url": attachment_url}}]
    stamp = timestamp or str(int(time.time() * 1000))
    return (
        '{"object": "page", "entry": [{"id": "1234567890", "time": 1, "messaging": [{"sender": {"id":'
        f' "{sender}"}}, "recipient": {{"id": "1234567890"}}, "timestamp": {stamp},'
        f' "message": {json.dumps(message)}}}]}}]}}'
    ).encode()


@pytest.mark.slow
def test_unstorable_values_get_400_and_nothing_is_published(edge: LoketStack) -> None:
    client = httpx.Client(base_url=edge.url, timeout=30)
    tag = uuid.uuid4().hex[:10]
    kannel_mo = {"account": "kannel-main", "secret": KANNEL_SECRET, "from": "081234567890",
                 "to": "1500123", "text": "halo", "id": f"k-{tag}"}  # fmt: skip
    dlr = {"account": "kannel-main", "secret": KANNEL_SECRET, "type": "1"}
    update = json.loads((FIXTURES / "telegram_text.json").read_text())
    update["update_id"] = int(time.time())
    tg_future = json.dumps(update).replace('"date": 1441645532', f'"date": {2**80}').encode()
    x_dm = x_body("1e400")
    cases = [
        ("kannel ts of 30 nines", client.get("/webhooks/sms/kannel", params={**kannel_mo, "ts": "9" * 30})),
        ("kannel DLR ref of 20 digits", client.get("/webhooks/sms/kannel", params={**dlr, "ref": "9" * 20})),
        ("kannel DLR ref in Arabic digits", client.get("/webhooks/sms/kannel", params={**dlr, "ref": "٣"})),
        ("twilio status ref of 20 digits", twilio_post(client, edge, "&ref=" + "9" * 20,
                                                       {"MessageSid": "SM1", "MessageStatus": "delivered"})),
        ("twilio NumMedia not a number", twilio_post(client, edge, "", {"MessageSid": f"SM{tag}",
                                                     "From": "+6281234567890", "NumMedia": "x"})),
        *[(f"facebook timestamp {stamp}", client.post("/webhooks/facebook", content=body, headers=signed_fb(body)))
          for stamp in ("1e400", "NaN", "10000000000000000000000000")
          for body in [fresh_fb_event(f"m_{tag}_{stamp}", f"55{tag[:4]}", stamp)]],
        ("telegram date 2^80", client.post("/webhooks/telegram", content=tg_future, headers=TG_OK)),
        ("x created_timestamp 1e400", client.post("/webhooks/twitter", content=x_dm, headers=signed_x(x_dm))),
    ]  # fmt: skip
    wrong = [(name, r.status_code, r.text[:200]) for name, r in cases if r.status_code != 400]
    assert not wrong, wrong
    for name, response in cases:
        assert len(response.text.strip()) > 10, f"{name}: a refusal says why"
    time.sleep(3)  # anything published would have been stored or shunted by now
    assert inbound_count(edge) == 0
    assert shunted(edge) == []
    print("\n" + "\n".join(f"{name}: {r.status_code} {r.text}" for name, r in cases))


@pytest.mark.slow
def test_deep_json_and_huge_numbers_get_400_on_every_json_webhook(edge: LoketStack) -> None:
    client = httpx.Client(base_url=edge.url, timeout=30)
    fb_deep = b'{"object": "page", "entry": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    fb_huge = fresh_fb_event("m_huge", "5151", HUGE_INT)
    tg_huge = tg_body(date=1_767_000_000).replace(
        b'"update_id": 10000', b'"update_id": ' + HUGE_INT.encode()
    )
    x_huge = x_body("1516403560557").replace(b'"1516403560557"', HUGE_INT.encode(), 1)
    cases = [
        ("facebook deep", client.post("/webhooks/facebook", content=fb_deep, headers=signed_fb(fb_deep))),
        ("facebook huge", client.post("/webhooks/facebook", content=fb_huge, headers=signed_fb(fb_huge))),
        ("telegram deep", client.post("/webhooks/telegram", content=DEEP, headers=TG_OK)),
        ("telegram huge", client.post("/webhooks/telegram", content=tg_huge, headers=TG_OK)),
        ("twitter deep", client.post("/webhooks/twitter", content=DEEP, headers=signed_x(DEEP))),
        ("twitter huge", client.post("/webhooks/twitter", content=x_huge, headers=signed_x(x_huge))),
    ]  # fmt: skip
    wrong = [(name, r.status_code, r.text[:200]) for name, r in cases if r.status_code != 400]
    assert not wrong, wrong
    for name, response in cases:
        assert "nested deeper" in response.text or "out of range" in response.text, (
            name,
            response.text,
        )
    assert edge.processes["up"].poll() is None


def stored_attachment(stack: LoketStack, mid: str) -> dict[str, Any]:
    def found() -> list[dict[str, Any]]:
        return db.fetch(
            pg(stack),
            "SELECT a.filename, a.size, a.sha256, a.dropped, m.problems FROM attachments a"
            " JOIN messages m ON m.id = a.message_id WHERE m.external_id = $1",
            mid,
        )

    [row] = wait_until(found, what=f"message {mid} stored")
    return row


@pytest.mark.slow
def test_attachment_at_loket_own_readyz_is_not_fetched(
    edge: LoketStack, graph: tuple[PlatformLoop, GraphServer]
) -> None:
    mid = f"m_readyz_{uuid.uuid4().hex}"
    body = fresh_fb_event(mid, "6161", attachment_url=f"{edge.url}/readyz")
    response = httpx.post(f"{edge.url}/webhooks/facebook", content=body, headers=signed_fb(body))
    assert response.status_code == 200, response.text
    row = stored_attachment(edge, mid)
    assert not row["sha256"] and row["size"] == 0, row
    assert f"host 127.0.0.1:{edge.port} is not one of the platform's media hosts" in row["dropped"]
    assert any("readyz" in problem and "not downloaded" in problem for problem in row["problems"])


@pytest.mark.slow
def test_redirect_from_the_cdn_to_a_disallowed_host_is_not_followed(
    edge: LoketStack, graph: tuple[PlatformLoop, GraphServer]
) -> None:
    loop, server = graph
    loop.call(lambda: server.redirects.update({"ktp.jpg": f"{edge.url}/readyz"}))
    mid = f"m_redirect_{uuid.uuid4().hex}"
    body = fresh_fb_event(mid, "6262", attachment_url=f"{server.url}/cdn-redirect/ktp.jpg")
    response = httpx.post(f"{edge.url}/webhooks/facebook", content=body, headers=signed_fb(body))
    assert response.status_code == 200, response.text
    row = stored_attachment(edge, mid)
    assert not row["sha256"] and row["dropped"].startswith("not downloaded: redirected: host"), row
    assert loop.call(lambda: len(server.calls("/cdn-redirect/ktp.jpg"))) == 1


@pytest.mark.slow
def test_30_mib_attachment_is_refused_at_the_cap_without_being_read_whole(
    edge: LoketStack, graph: tuple[PlatformLoop, GraphServer]
) -> None:
    loop, server = graph
    size = 30 * 1024 * 1024
    small = b"\x89PNG" + b"p" * 100_000
    loop.call(lambda: server.streams.update({"rekaman.mp4": size}))
    loop.call(lambda: server.files.update({"foto.png": (small, "image/png")}))
    for name, path in (("rekaman.mp4", "cdn-stream"), ("foto.png", "cdn")):
        mid = f"m_{name}_{uuid.uuid4().hex}"
        body = fresh_fb_event(mid, "6363", attachment_url=f"{server.url}/{path}/{name}")
        response = httpx.post(
            f"{edge.url}/webhooks/facebook", content=body, headers=signed_fb(body)
        )
        assert response.status_code == 200, response.text
        row = stored_attachment(edge, mid)
        if name == "foto.png":
            # The exactly listed local CDN is reachable: the refusal above is the cap's doing.
            assert row["sha256"] == hashlib.sha256(small).hexdigest() and row["dropped"] is None
            continue
        assert not row["sha256"], row
        assert (
            row["dropped"]
            == f"not downloaded: too large: over the limit of {MAX_ATTACHMENT} bytes, stopped reading"
        )
    time.sleep(0.5)
    sent = loop.call(lambda: server.streamed["rekaman.mp4"])
    assert sent < size / 2, f"the CDN sent {sent} of {size} bytes"
    blobs = Path(edge.env["LOKET_DATA_DIR"]) / "blobs"
    assert max(p.stat().st_size for p in blobs.rglob("*") if p.is_file()) < MAX_ATTACHMENT
    print(f"\n30 MiB attachment: the CDN sent {sent / 2**20:.1f} MiB before loket stopped reading")
