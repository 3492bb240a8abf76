"""Twilio-style SMS: signature checks, webhook mapping, and the Messages API against a local server."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator

import pytest

from channels.sms import twilio
from channels.sms.twilio import TwilioAccount
from channels.types import ChannelError, OutboundReply, RejectedInput

# The example from Twilio's "Webhooks security" documentation and its helper libraries' tests.
DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_TOKEN = "12345"


def doc_params(number: str) -> dict[str, list[str]]:
    return {
        "CallSid": ["CA1234567890ABCDE"],
        "Caller": [number],
        "Digits": ["1234"],
        "From": [number],
        "To": ["+18005551212"],
    }


@pytest.mark.parametrize(
    ("number", "signature"),
    [
        ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("+12349013030", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
    ],
)
def test_signature_matches_twilio_documentation(number: str, signature: str) -> None:
    assert twilio.compute_signature(DOC_TOKEN, DOC_URL, doc_params(number)) == signature
    assert twilio.verify_signature(DOC_TOKEN, DOC_URL, doc_params(number), signature)
    assert not twilio.verify_signature("54321", DOC_URL, doc_params(number), signature)
    assert not twilio.verify_signature(DOC_TOKEN, DOC_URL + "&x=1", doc_params(number), signature)
    assert not twilio.verify_signature(DOC_TOKEN, DOC_URL, doc_params(number), "")


def test_signature_accepts_explicit_default_port() -> None:
    signature = twilio.compute_signature(DOC_TOKEN, DOC_URL, doc_params("+14158675309"))
    with_port = "https://mycompany.com:443/myapp.php?foo=1&bar=2"
    assert twilio.verify_signature(DOC_TOKEN, with_port, doc_params("+14158675309"), signature)


ACCOUNT = TwilioAccount.from_config(
    {
        "name": "twilio-main",
        "provider": "twilio",
        "sender": "+15017122661",
        "account_sid": "AC7f0d1a4f2b9e4e6c8a0b1c2d3e4f5a6b",
        "auth_token": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
    }
)
WEBHOOK_URL = "https://loket.example.org/webhooks/sms/twilio?account=twilio-main"

# Field names and shapes as in Twilio's incoming-message webhook documentation.
INCOMING = {
    "ToCountry": "ID",
    "SmsMessageSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
    "NumMedia": "0",
    "SmsSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
    "SmsStatus": "received",
    "Body": "Sekolah kami tidak bisa mengakses internet sejak Senin",
    "To": "+15017122661",
    "NumSegments": "1",
    "MessageSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f",
    "AccountSid": "AC7f0d1a4f2b9e4e6c8a0b1c2d3e4f5a6b",
    "From": "+6281234567890",
    "ApiVersion": "2010-04-01",
}


def signed_post(fields: dict[str, str], url: str = WEBHOOK_URL, token: str | None = None):
    body = urllib.parse.urlencode(fields).encode()
    params = {name: [value] for name, value in fields.items()}
    signature = twilio.compute_signature(token or ACCOUNT.auth_token, url, params)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": signature,
    }
    return headers, body


def test_incoming_message_becomes_raw_inbound() -> None:
    headers, body = signed_post(INCOMING)
    outcome = twilio.handle_webhook(ACCOUNT, "POST", WEBHOOK_URL, headers, body)
    assert outcome.status == 200 and outcome.content_type == "text/xml"
    assert b"<Response>" in outcome.body
    (raw,) = outcome.messages
    assert raw.channel == "sms" and raw.account == "twilio-main"
    assert raw.external_id == "SM1f0e8ae6ade43cb3c0ce4525424e404f"
    assert raw.sender == "+6281234567890"
    assert raw.body_text == INCOMING["Body"]
    assert raw.meta["to"] == "+15017122661"


def test_mms_media_are_noted() -> None:
    fields = {**INCOMING, "NumMedia": "1", "MediaUrl0": "https://api.twilio.com/media/ME1"}
    headers, body = signed_post(fields)
    (raw,) = twilio.handle_webhook(ACCOUNT, "POST", WEBHOOK_URL, headers, body).messages
    assert raw.meta["media_urls"] == "https://api.twilio.com/media/ME1"
    assert raw.problems


@pytest.mark.parametrize("forgery", ["wrong-token", "tampered-body", "missing", "other-url"])
def test_forged_webhook_is_refused(forgery: str) -> None:
    headers, body = signed_post(
        INCOMING, token="not-the-token" if forgery == "wrong-token" else None
    )
    url = WEBHOOK_URL
    if forgery == "tampered-body":
        body = body.replace(b"Senin", b"Selasa")
    elif forgery == "missing":
        del headers["X-Twilio-Signature"]
    elif forgery == "other-url":
        url = WEBHOOK_URL.replace("twilio-main", "other")
    with pytest.raises(RejectedInput) as refused:
        twilio.handle_webhook(ACCOUNT, "POST", url, headers, body)
    assert refused.value.status == 403


@pytest.mark.parametrize(
    ("message_status", "error_code", "expected"),
    [
        ("delivered", None, "delivered"),
        ("undelivered", "30003", "failed"),
        ("failed", "30008", "failed"),
        ("read", None, "read"),
        ("sent", None, None),
        ("queued", None, None),
    ],
)
def test_status_callback(message_status: str, error_code: str | None, expected: str | None):
    url = WEBHOOK_URL + "&ref=991"
    fields = {
        "MessageSid": "SM5f6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e",
        "MessageStatus": message_status,
        "SmsStatus": message_status,
        "AccountSid": ACCOUNT.account_sid,
        "From": ACCOUNT.sender,
        "To": "+6281234567890",
        "ApiVersion": "2010-04-01",
    }
    if error_code:
        fields["ErrorCode"] = error_code
    headers, body = signed_post(fields, url=url)
    outcome = twilio.handle_webhook(ACCOUNT, "POST", url, headers, body)
    assert outcome.status == 200 and outcome.messages == []
    if expected is None:
        assert outcome.receipts == []
        return
    (receipt,) = outcome.receipts
    assert receipt.status == expected and receipt.message_id == 991
    assert receipt.provider_id == "SM5f6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e"
    if error_code:
        assert error_code in (receipt.reason or "")


# --- Messages API against a local server ---------------------------------------------------


class FakeMessagesApi:
    """Speaks the documented `POST /2010-04-01/Accounts/{sid}/Messages.json` contract."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                api.requests.append(form)
                expected_auth = (
                    "Basic "
                    + base64.b64encode(
                        f"{ACCOUNT.account_sid}:{ACCOUNT.auth_token}".encode()
                    ).decode()
                )
                path_ok = self.path == f"/2010-04-01/Accounts/{ACCOUNT.account_sid}/Messages.json"
                to = form.get("To", "")
                headers: dict[str, str] = {}
                if not path_ok:
                    status, answer = 404, {"code": 20404, "message": "Not found", "status": 404}
                elif self.headers.get("Authorization") != expected_auth:
                    status, answer = 401, {"code": 20003, "message": "Authenticate", "status": 401}
                elif to == "+429":
                    status, answer = 429, {"code": 20429, "message": "Too Many Requests"}
                    headers["Retry-After"] = "3"
                elif to == "+503":
                    status, answer = 503, {"code": 20500, "message": "Service Unavailable"}
                elif to == "+15005550001":
                    status = 400
                    answer = {
                        "code": 21211,
                        "message": f"The 'To' number {to} is not a valid phone number.",
                        "more_info": "https://www.twilio.com/docs/errors/21211",
                        "status": 400,
                    }
                else:
                    status = 201
                    answer = {
                        "sid": f"SM{len(api.requests):032x}",
                        "status": "queued",
                        "to": to,
                        "from": form.get("From"),
                        "body": form.get("Body"),
                    }
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api() -> Iterator[FakeMessagesApi]:
    server = FakeMessagesApi()
    yield server
    server.close()


def api_account(api: FakeMessagesApi, **overrides: str) -> TwilioAccount:
    config = {
        "name": "twilio-main",
        "sender": ACCOUNT.sender,
        "account_sid": ACCOUNT.account_sid,
        "auth_token": ACCOUNT.auth_token,
        "api_url": api.url,
    }
    config.update(overrides)
    return TwilioAccount.from_config(config)


def reply_to(recipient: str) -> OutboundReply:
    return OutboundReply(
        message_id=321, ticket_id=5, channel="sms", account="twilio-main", recipient=recipient,
        body_text="Tiket #5: koneksi sudah pulih. Terima kasih.",
    )  # fmt: skip


async def test_send_returns_message_sid(api: FakeMessagesApi) -> None:
    result = await twilio.send(
        api_account(api),
        reply_to("+6281234567890"),
        status_callback="https://loket.example.org/webhooks/sms/twilio?account=twilio-main",
    )
    assert result.status == "sent" and result.provider_id == "SM" + "1".rjust(32, "0")
    (form,) = api.requests
    assert form["To"] == "+6281234567890" and form["From"] == ACCOUNT.sender
    assert form["Body"] == "Tiket #5: koneksi sudah pulih. Terima kasih."
    assert form["StatusCallback"].endswith("?account=twilio-main&ref=321")


@pytest.mark.parametrize(
    ("recipient", "permanent", "needle"),
    [
        ("+429", False, "Too Many Requests"),
        ("+503", False, "503"),
        ("+15005550001", True, "not a valid phone number"),
    ],
)
async def test_send_errors(api: FakeMessagesApi, recipient: str, permanent: bool, needle: str):
    with pytest.raises(ChannelError) as failed:
        await twilio.send(api_account(api), reply_to(recipient))
    assert failed.value.permanent is permanent
    assert needle in failed.value.reason
    if recipient == "+429":
        assert failed.value.retry_after == 3.0


async def test_send_with_wrong_token_is_permanent(api: FakeMessagesApi) -> None:
    with pytest.raises(ChannelError) as failed:
        await twilio.send(api_account(api, auth_token="wrong"), reply_to("+6281234567890"))
    assert failed.value.permanent and "Authenticate" in failed.value.reason
    assert "wrong" not in failed.value.reason


async def test_send_without_server_is_retryable(api: FakeMessagesApi) -> None:
    account = api_account(api)
    api.close()
    with pytest.raises(ChannelError) as failed:
        await twilio.send(account, reply_to("+6281234567890"))
    assert not failed.value.permanent
