"""Telegram adapter: python-telegram-bot against a local Bot API server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.blobs import DiskBlobStore
from channels.social import telegram
from channels.types import ChannelError, OutboundReply, RejectedInput
from tests.support.platforms import TelegramServer

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
SECRET = "webhook-secret-42"
CHAT = 1111111


@pytest.fixture
async def api() -> AsyncIterator[TelegramServer]:
    server = TelegramServer(token="123456:ABC-token")
    await server.start()
    yield server
    await telegram.close_bots()
    await server.stop()


@pytest.fixture
def account(api: TelegramServer) -> telegram.TelegramAccount:
    return telegram.TelegramAccount.from_config(
        {"name": "bot", "token": api.token, "secret_token": SECRET, "api_url": api.url}
    )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


HEADERS = {"x-telegram-bot-api-secret-token": SECRET, "content-type": "application/json"}


def reply(text: str = "Pengaduan Anda sedang diproses.") -> OutboundReply:
    return OutboundReply(
        message_id=9,
        ticket_id=3,
        channel="telegram",
        account="bot",
        recipient=str(CHAT),
        body_text=text,
        meta={"chat_id": str(CHAT)},
    )


def test_from_config_defaults_and_hides_secrets() -> None:
    account = telegram.TelegramAccount.from_config({"name": "b", "token": "12:sekret"})
    assert account.api_url == "https://api.telegram.org"
    assert "sekret" not in repr(account)


async def test_text_update(account: telegram.TelegramAccount) -> None:
    body = fixture("telegram_text.json")
    outcome = await telegram.handle_webhook(account, "POST", {}, HEADERS, body)
    [raw] = outcome.messages
    assert raw.channel == "telegram" and raw.account == "bot"
    assert raw.external_id == "1111111:1365"
    assert raw.sender == "1111111" and raw.sender_name == "Siti Rahma"
    assert raw.body_text == "Selamat pagi, saya mau tanya status pengaduan saya"
    assert raw.received_at == 1441645532
    assert raw.meta["chat_id"] == "1111111" and raw.meta["update_id"] == "10000"
    assert raw.meta["username"] == "sitirahma"
    again = await telegram.handle_webhook(account, "POST", {}, HEADERS, body)
    assert again.messages[0].external_id == raw.external_id


async def test_photo_document_voice_are_downloaded(
    account: telegram.TelegramAccount, api: TelegramServer, tmp_path: Path
) -> None:
    api.files["AgADBAADr6cxG-large"] = ("photos/file_1.jpg", b"JPEG-large")
    api.files["AgADBAADr6cxG-thumb"] = ("photos/file_0.jpg", b"JPEG-thumb")
    api.files["BQADBAADkwADYd-doc"] = ("documents/file_2.pdf", b"%PDF-1.4 kuasa")
    api.files["AwADBAADbXXXXXXXXXXGBdhD2l6_XX"] = ("voice/file_3.oga", b"OggS voice")
    blobs = DiskBlobStore(tmp_path)

    photo = (
        await telegram.handle_webhook(
            account, "POST", {}, HEADERS, fixture("telegram_photo.json"), blobs=blobs
        )
    ).messages[0]
    [ref] = photo.attachments
    assert photo.body_text == "Foto KTP saya"
    assert ref.content_type == "image/jpeg" and blobs.get(ref.sha256) == b"JPEG-large"

    document = (
        await telegram.handle_webhook(
            account, "POST", {}, HEADERS, fixture("telegram_document.json"), blobs=blobs
        )
    ).messages[0]
    [ref] = document.attachments
    assert ref.filename == "surat_kuasa.pdf" and ref.content_type == "application/pdf"
    assert blobs.get(ref.sha256) == b"%PDF-1.4 kuasa" and ref.size == 14

    voice = (
        await telegram.handle_webhook(
            account, "POST", {}, HEADERS, fixture("telegram_voice.json"), blobs=blobs
        )
    ).messages[0]
    [ref] = voice.attachments
    assert ref.content_type == "audio/ogg" and blobs.get(ref.sha256) == b"OggS voice"
    assert [c.form()["file_id"] for c in api.calls("/getFile")] == [
        "AgADBAADr6cxG-large",
        "BQADBAADkwADYd-doc",
        "AwADBAADbXXXXXXXXXXGBdhD2l6_XX",
    ]


async def test_missing_file_is_kept_as_dropped_attachment(
    account: telegram.TelegramAccount, tmp_path: Path
) -> None:
    outcome = await telegram.handle_webhook(
        account,
        "POST",
        {},
        HEADERS,
        fixture("telegram_document.json"),
        blobs=DiskBlobStore(tmp_path),
    )
    [raw] = outcome.messages
    [ref] = raw.attachments
    assert ref.sha256 == "" and "invalid file_id" in (ref.dropped or "").lower()
    assert raw.problems


async def test_own_contact_sets_shared_phone(account: telegram.TelegramAccount) -> None:
    outcome = await telegram.handle_webhook(
        account, "POST", {}, HEADERS, fixture("telegram_contact.json")
    )
    [raw] = outcome.messages
    assert raw.meta["shared_phone"] == "6281234567890"
    assert "6281234567890" in raw.body_text


async def test_someone_elses_contact_is_not_an_identity(account: telegram.TelegramAccount) -> None:
    update = json.loads(fixture("telegram_contact.json"))
    update["message"]["contact"]["user_id"] = 2222222
    outcome = await telegram.handle_webhook(
        account, "POST", {}, HEADERS, json.dumps(update).encode()
    )
    [raw] = outcome.messages
    assert "shared_phone" not in raw.meta and raw.meta["contact_phone"] == "6281234567890"


async def test_wrong_or_missing_secret_is_refused(account: telegram.TelegramAccount) -> None:
    body = fixture("telegram_text.json")
    with pytest.raises(RejectedInput) as missing:
        await telegram.handle_webhook(account, "POST", {}, {}, body)
    assert missing.value.status == 401
    with pytest.raises(RejectedInput) as wrong:
        await telegram.handle_webhook(
            account, "POST", {}, {"x-telegram-bot-api-secret-token": "guess"}, body
        )
    assert wrong.value.status == 403


async def test_unconfigured_secret_refuses_everything(api: TelegramServer) -> None:
    open_bot = telegram.TelegramAccount.from_config(
        {"name": "b", "token": api.token, "api_url": api.url}
    )
    with pytest.raises(RejectedInput):
        await telegram.handle_webhook(
            open_bot,
            "POST",
            {},
            {"x-telegram-bot-api-secret-token": ""},
            fixture("telegram_text.json"),
        )


async def test_bad_body_is_400(account: telegram.TelegramAccount) -> None:
    for body in (
        b"not json",
        b"[]",
        b'{"message": {}}',
        b'{"update_id": 1, "message": "text"}',
        b'{"update_id": 1, "message": {"text": "no date or chat"}}',
    ):
        with pytest.raises(RejectedInput) as refused:
            await telegram.handle_webhook(account, "POST", {}, HEADERS, body)
        assert refused.value.status == 400


async def test_send_message(account: telegram.TelegramAccount, api: TelegramServer) -> None:
    result = await telegram.send(account, reply())
    assert result.status == "sent" and result.provider_id == f"{CHAT}:1001"
    [call] = api.calls("/sendMessage")
    assert call.path == f"/bot{api.token}/sendMessage"
    sent = call.form()
    assert sent["chat_id"] == str(CHAT) and sent["text"] == "Pengaduan Anda sedang diproses."


async def test_flood_wait_surfaces_retry_after(
    account: telegram.TelegramAccount, api: TelegramServer
) -> None:
    api.fail_next(1, "rate_limit", path_contains="sendMessage", retry_after=11)
    with pytest.raises(ChannelError) as throttled:
        await telegram.send(account, reply())
    assert not throttled.value.permanent and throttled.value.retry_after == 11
    assert len(api.calls("/sendMessage")) == 1  # handed back, not retried in place


async def test_server_error_is_transient(
    account: telegram.TelegramAccount, api: TelegramServer
) -> None:
    api.fail_next(1, "server_error", path_contains="sendMessage")
    with pytest.raises(ChannelError) as failed:
        await telegram.send(account, reply())
    assert not failed.value.permanent


async def test_blocked_bot_is_permanent(
    account: telegram.TelegramAccount, api: TelegramServer
) -> None:
    api.fail_next(1, "permanent", path_contains="sendMessage")
    with pytest.raises(ChannelError) as failed:
        await telegram.send(account, reply())
    assert failed.value.permanent and "bot was blocked by the user" in failed.value.reason


async def test_wrong_token_is_permanent(api: TelegramServer) -> None:
    wrong = telegram.TelegramAccount.from_config(
        {"name": "b", "token": "999:wrong", "secret_token": SECRET, "api_url": api.url}
    )
    with pytest.raises(ChannelError) as failed:
        await telegram.send(wrong, reply())
    assert failed.value.permanent


async def test_poll_advances_cursor(account: telegram.TelegramAccount, api: TelegramServer) -> None:
    api.updates = [
        json.loads(fixture("telegram_text.json")),
        json.loads(fixture("telegram_contact.json")),
    ]
    messages, cursor = await telegram.poll(account, None)
    assert [m.external_id for m in messages] == ["1111111:1365", "1111111:1369"]
    assert cursor == "10004"
    assert messages[1].meta["shared_phone"] == "6281234567890"
    # Same key as the webhook gives for the same message.
    hooked = await telegram.handle_webhook(
        account, "POST", {}, HEADERS, fixture("telegram_text.json")
    )
    assert hooked.messages[0].external_id == messages[0].external_id

    again, same_cursor = await telegram.poll(account, cursor)
    assert again == [] and same_cursor == "10004"
    assert api.calls("/getUpdates")[-1].form()["offset"] == "10005"


async def test_poll_without_ack_refetches(
    account: telegram.TelegramAccount, api: TelegramServer
) -> None:
    api.updates = [json.loads(fixture("telegram_text.json"))]
    first, _ = await telegram.poll(account, "9999")
    second, _ = await telegram.poll(account, "9999")  # cursor not advanced: an outage replay
    assert [m.external_id for m in first] == [m.external_id for m in second] == ["1111111:1365"]


async def test_poll_rate_limited(account: telegram.TelegramAccount, api: TelegramServer) -> None:
    api.fail_next(1, "rate_limit", path_contains="getUpdates", retry_after=3)
    with pytest.raises(ChannelError) as throttled:
        await telegram.poll(account, None)
    assert throttled.value.retry_after == 3


async def test_transient_download_failure_fails_the_update(
    account: telegram.TelegramAccount, api: TelegramServer, tmp_path: Path
) -> None:
    api.files["BQADBAADkwADYd-doc"] = ("documents/file_2.pdf", b"%PDF-1.4 kuasa")
    api.fail_next(1, "server_error", path_contains="getFile")
    with pytest.raises(ChannelError) as failed:
        await telegram.handle_webhook(
            account,
            "POST",
            {},
            HEADERS,
            fixture("telegram_document.json"),
            blobs=DiskBlobStore(tmp_path),
        )
    assert not failed.value.permanent
