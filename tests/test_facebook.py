"""Messenger adapter against documented webhook payloads and a local Graph API server."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.blobs import DiskBlobStore
from channels.social import facebook
from channels.types import ChannelError, OutboundReply, RejectedInput
from tests.support.platforms import GraphServer
from tests.support.ports import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
PSID = "6543210987654321"


@pytest.fixture
async def graph() -> AsyncIterator[GraphServer]:
    server = GraphServer(page_token="page-token-xyz")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def account(graph: GraphServer) -> facebook.FacebookAccount:
    return facebook.FacebookAccount.from_config(
        {
            "name": "kemlu-page",
            "page_id": "1234567890",
            "app_secret": "app-secret-1",
            "verify_token": "verify-me",
            "page_token": "page-token-xyz",
            "graph_url": f"{graph.url}/v19.0",
            # The local Graph server doubles as the CDN; loopback hosts must be listed exactly.
            "media_hosts": [f"127.0.0.1:{graph.port}"],
        }
    )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def signed(account: facebook.FacebookAccount, body: bytes) -> dict[str, str]:
    digest = hmac.new(account.app_secret.encode(), body, hashlib.sha256).hexdigest()
    return {"x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"}


def reply(**meta: str) -> OutboundReply:
    return OutboundReply(
        message_id=41,
        ticket_id=7,
        channel="facebook",
        account="kemlu-page",
        recipient=PSID,
        body_text="Paspor Anda sudah bisa diambil.",
        meta=meta,
    )


def test_from_config_defaults_and_hides_secrets() -> None:
    account = facebook.FacebookAccount.from_config(
        {"name": "p", "app_secret": "s3cr3t", "verify_token": "v", "page_token": "tok"}
    )
    assert account.graph_url == "https://graph.facebook.com/v19.0"
    assert "s3cr3t" not in repr(account) and "tok" not in repr(account)


async def test_verification_get_echoes_challenge(account: facebook.FacebookAccount) -> None:
    query = {
        "hub.mode": "subscribe",
        "hub.verify_token": "verify-me",
        "hub.challenge": "1158201444",
    }
    outcome = await facebook.handle_webhook(account, "GET", query, {}, b"")
    assert outcome.status == 200 and outcome.body == b"1158201444"
    with pytest.raises(RejectedInput) as refused:
        await facebook.handle_webhook(
            account, "GET", {**query, "hub.verify_token": "guess"}, {}, b""
        )
    assert refused.value.status == 403


async def test_text_message(account: facebook.FacebookAccount) -> None:
    body = fixture("messenger_text.json")
    outcome = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    assert outcome.receipts == []
    [raw] = outcome.messages
    assert raw.channel == "facebook" and raw.account == "kemlu-page"
    assert raw.external_id == "mid.1457764197618:41d102a3e1ae206a38"
    assert raw.sender == PSID
    assert raw.body_text == "Halo, paspor saya belum jadi"
    assert raw.received_at == pytest.approx(1458692752.478)
    assert raw.meta["last_inbound_at"] == "1458692752.478"
    assert raw.meta["page_id"] == "1234567890"
    again = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    assert again.messages[0].external_id == raw.external_id


async def test_image_attachment_is_downloaded_into_blob_store(
    account: facebook.FacebookAccount, graph: GraphServer, tmp_path: Path
) -> None:
    image = b"\xff\xd8\xff\xe0fake-jpeg-bytes"
    graph.files["ktp.jpg"] = (image, "image/jpeg")
    payload = json.loads(fixture("messenger_image.json"))
    event = payload["entry"][0]["messaging"][0]
    event["message"]["attachments"][0]["payload"]["url"] = f"{graph.url}/cdn/ktp.jpg"
    body = json.dumps(payload).encode()
    blobs = DiskBlobStore(tmp_path)
    outcome = await facebook.handle_webhook(
        account, "POST", {}, signed(account, body), body, blobs=blobs
    )
    [raw] = outcome.messages
    [ref] = raw.attachments
    assert ref.filename == "ktp.jpg" and ref.content_type == "image/jpeg"
    assert ref.size == len(image) and ref.dropped is None
    assert blobs.get(ref.sha256) == image
    assert raw.problems == []


async def test_attachment_without_blob_store_is_marked_dropped(
    account: facebook.FacebookAccount,
) -> None:
    body = fixture("messenger_image.json")
    outcome = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    [ref] = outcome.messages[0].attachments
    assert ref.sha256 == "" and ref.dropped and "no blob store" in ref.dropped


async def test_echo_produces_nothing(account: facebook.FacebookAccount) -> None:
    body = fixture("messenger_echo.json")
    outcome = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    assert outcome.messages == [] and outcome.receipts == []


async def test_delivery_and_read_become_receipts(account: facebook.FacebookAccount) -> None:
    body = fixture("messenger_delivery.json")
    outcome = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    [delivered] = outcome.receipts
    assert delivered.status == "delivered"
    assert delivered.provider_id == "mid.1458668856218:ed81099e15d3f4f233"
    assert delivered.at == pytest.approx(1458668856.253)
    body = fixture("messenger_read.json")
    outcome = await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
    [read] = outcome.receipts
    assert read.status == "read" and read.at == pytest.approx(1458668856.253)
    assert outcome.messages == []


async def test_forged_or_missing_signature_is_refused(account: facebook.FacebookAccount) -> None:
    body = fixture("messenger_text.json")
    with pytest.raises(RejectedInput) as missing:
        await facebook.handle_webhook(account, "POST", {}, {}, body)
    assert missing.value.status == 401
    forged = facebook.FacebookAccount.from_config(
        {"name": "x", "app_secret": "other", "verify_token": "v", "page_token": "t"}
    )
    with pytest.raises(RejectedInput) as wrong:
        await facebook.handle_webhook(account, "POST", {}, signed(forged, body), body)
    assert wrong.value.status == 403
    tampered = body.replace(b"paspor", b"visa")
    with pytest.raises(RejectedInput):
        await facebook.handle_webhook(account, "POST", {}, signed(account, body), tampered)


async def test_bad_json_and_wrong_shape_are_400(account: facebook.FacebookAccount) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"object": "instagram", "entry": []}'):
        with pytest.raises(RejectedInput) as refused:
            await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
        assert refused.value.status == 400


def test_window_rules() -> None:
    now = 1_700_000_000.0
    assert facebook.messaging_type(now - 3600, now) == ("RESPONSE", None)
    assert facebook.messaging_type(now - 25 * 3600, now) == ("MESSAGE_TAG", "HUMAN_AGENT")
    assert facebook.messaging_type(None, now) == ("RESPONSE", None)
    with pytest.raises(ChannelError) as late:
        facebook.messaging_type(now - 8 * 86400, now)
    assert late.value.permanent and "7-day window has passed" in late.value.reason


async def test_send_within_24h_is_a_response(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    result = await facebook.send(account, reply(last_inbound_at=str(time.time() - 600)))
    assert result.status == "sent" and result.provider_id == "m_000001"
    [call] = graph.calls("/messages")
    assert call.path == "/v19.0/1234567890/messages"
    assert call.headers["authorization"] == "Bearer page-token-xyz"
    assert "access_token" not in call.query
    assert call.json() == {
        "recipient": {"id": PSID},
        "messaging_type": "RESPONSE",
        "message": {"text": "Paspor Anda sudah bisa diambil."},
    }


async def test_send_after_24h_uses_human_agent_tag(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    await facebook.send(account, reply(last_inbound_at=str(time.time() - 3 * 86400)))
    sent = graph.calls("/messages")[0].json()
    assert sent["messaging_type"] == "MESSAGE_TAG" and sent["tag"] == "HUMAN_AGENT"


async def test_send_after_7_days_is_refused_without_a_call(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    with pytest.raises(ChannelError) as late:
        await facebook.send(account, reply(last_inbound_at=str(time.time() - 8 * 86400)))
    assert late.value.permanent and "7-day window" in late.value.reason
    assert graph.requests == []


async def test_rate_limit_is_retryable_with_graph_estimate(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    graph.fail_next(1, "rate_limit", retry_after=5)
    with pytest.raises(ChannelError) as throttled:
        await facebook.send(account, reply(last_inbound_at=str(time.time())))
    assert not throttled.value.permanent
    assert throttled.value.retry_after == pytest.approx(300)
    assert "613" in throttled.value.reason
    # The fault was for one call only: the retry goes through.
    assert (await facebook.send(account, reply(last_inbound_at=str(time.time())))).status == "sent"


async def test_server_error_is_transient(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    graph.fail_next(1, "server_error")
    with pytest.raises(ChannelError) as failed:
        await facebook.send(account, reply())
    assert not failed.value.permanent


async def test_unknown_recipient_is_permanent(
    account: facebook.FacebookAccount, graph: GraphServer
) -> None:
    graph.fail_next(1, "permanent")
    with pytest.raises(ChannelError) as failed:
        await facebook.send(account, reply())
    assert failed.value.permanent and "No matching user found" in failed.value.reason


async def test_bad_token_is_permanent(graph: GraphServer) -> None:
    account = facebook.FacebookAccount.from_config(
        {
            "name": "p",
            "page_id": "1234567890",
            "app_secret": "s",
            "verify_token": "v",
            "page_token": "expired",
            "graph_url": f"{graph.url}/v19.0",
        }
    )
    with pytest.raises(ChannelError) as failed:
        await facebook.send(account, reply())
    assert failed.value.permanent and "190" in failed.value.reason


async def test_unreachable_graph_is_transient(account: facebook.FacebookAccount) -> None:
    down = facebook.FacebookAccount.from_config(
        {
            "name": "p",
            "app_secret": "s",
            "verify_token": "v",
            "page_token": "t",
            "graph_url": f"http://127.0.0.1:{free_port()}/v19.0",
        }
    )
    with pytest.raises(ChannelError) as failed:
        await facebook.send(down, reply())
    assert not failed.value.permanent


async def test_transient_attachment_failure_fails_the_batch(
    account: facebook.FacebookAccount, graph: GraphServer, tmp_path: Path
) -> None:
    graph.files["ktp.jpg"] = (b"jpeg", "image/jpeg")
    graph.fail_next(1, "server_error", path_contains="/cdn/")
    payload = json.loads(fixture("messenger_image.json"))
    event = payload["entry"][0]["messaging"][0]
    event["message"]["attachments"][0]["payload"]["url"] = f"{graph.url}/cdn/ktp.jpg"
    body = json.dumps(payload).encode()
    with pytest.raises(ChannelError) as failed:
        await facebook.handle_webhook(
            account, "POST", {}, signed(account, body), body, blobs=DiskBlobStore(tmp_path)
        )
    assert not failed.value.permanent


async def test_malformed_event_is_400(account: facebook.FacebookAccount) -> None:
    for event in (
        {"sender": "x", "message": {"mid": "m"}},
        {"sender": {"id": "1"}, "message": "hi"},
    ):
        body = json.dumps({"object": "page", "entry": [{"id": "1", "messaging": [event]}]}).encode()
        with pytest.raises(RejectedInput) as refused:
            await facebook.handle_webhook(account, "POST", {}, signed(account, body), body)
        assert refused.value.status == 400
