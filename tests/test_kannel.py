"""Kannel adapter: webhook checks as unit tests, and MO/MT/DLR end to end through a real Kannel."""

from __future__ import annotations

import http.server
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from channels.sms import kannel
from channels.sms.kannel import KannelAccount
from channels.types import ChannelError, OutboundReply, RejectedInput, WebhookOutcome
from tests.support.kannel import KannelGateway, kannel_available
from tests.support.ports import free_port

SECRET = "s3cret-token-0123456789"


def make_account(**overrides: object) -> KannelAccount:
    config = {
        "name": "kannel-main",
        "provider": "kannel",
        "sender": "500005",
        "sendsms_url": "http://127.0.0.1:9/cgi-bin/sendsms",
        "username": "loket",
        "password": "pw",
        "inbound_secret": SECRET,
    }
    config.update(overrides)
    return KannelAccount.from_config(config)


# --- webhook decisions -------------------------------------------------------------


def test_mo_becomes_raw_inbound() -> None:
    query = {
        "account": "kannel-main",
        "secret": SECRET,
        "from": "+6281234567890",
        "to": "500005",
        "text": "Internet sekolah mati",
        "ts": "2026-01-05 08:30:00",
        "id": "5d56e782-f431-4a44-88cd-0712a9869844",
    }
    outcome = kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr="127.0.0.1")
    assert outcome.status == 200 and outcome.receipts == []
    (raw,) = outcome.messages
    assert raw.channel == "sms" and raw.account == "kannel-main"
    assert raw.external_id == "5d56e782-f431-4a44-88cd-0712a9869844"
    assert raw.sender == "+6281234567890"
    assert raw.body_text == "Internet sekolah mati"
    assert raw.received_at == 1767601800.0  # 2026-01-05 08:30:00 UTC
    assert raw.meta["to"] == "500005"


def test_mo_without_kannel_id_gets_a_stable_hash_key() -> None:
    query = {"secret": SECRET, "from": "0812", "text": "halo", "ts": "1767601800"}
    first = kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr=None)
    again = kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr=None)
    other = kannel.handle_webhook(
        make_account(), "GET", {**query, "text": "halo!"}, {}, b"", remote_addr=None
    )
    assert first.messages[0].external_id == again.messages[0].external_id
    assert first.messages[0].external_id != other.messages[0].external_id
    assert first.messages[0].received_at == 1767601800.0


def test_mo_fields_in_a_form_post_body_are_read() -> None:
    body = urllib.parse.urlencode({"from": "0812", "text": "lewat POST"}).encode()
    outcome = kannel.handle_webhook(
        make_account(),
        "POST",
        {"secret": SECRET},
        {"Content-Type": "application/x-www-form-urlencoded"},
        body,
        remote_addr=None,
    )
    assert outcome.messages[0].body_text == "lewat POST"


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET + "x", SECRET[:-1]])
def test_forged_or_missing_secret_is_refused(secret: str | None) -> None:
    query = {"from": "0812", "text": "x"}
    if secret is not None:
        query["secret"] = secret
    with pytest.raises(RejectedInput) as refused:
        kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr="127.0.0.1")
    assert refused.value.status == 403


def test_allowed_sources() -> None:
    account = make_account(allowed_sources=["10.1.0.0/16", "127.0.0.1"])
    query = {"secret": SECRET, "from": "0812", "text": "x"}
    for addr in ("127.0.0.1", "10.1.200.3"):
        assert kannel.handle_webhook(account, "GET", query, {}, b"", remote_addr=addr).messages
    for addr in ("10.2.0.1", None, "not-an-ip"):
        with pytest.raises(RejectedInput) as refused:
            kannel.handle_webhook(account, "GET", query, {}, b"", remote_addr=addr)
        assert refused.value.status == 403


def test_secret_that_needs_url_escaping_is_refused_at_config() -> None:
    with pytest.raises(ValueError):
        make_account(inbound_secret="has space and %-signs!")


@pytest.mark.parametrize(
    ("dlr_type", "status"),
    [("1", "delivered"), ("2", "failed"), ("16", "failed"), ("4", None), ("8", None)],
)
def test_dlr_types(dlr_type: str, status: str | None) -> None:
    query = {"secret": SECRET, "ref": "77", "type": dlr_type, "reason": "NACK/0x0b"}
    outcome = kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr=None)
    assert outcome.status == 200 and outcome.messages == []
    if status is None:
        assert outcome.receipts == []
    else:
        (receipt,) = outcome.receipts
        assert (receipt.message_id, receipt.status, receipt.channel) == (77, status, "sms")
        if status == "failed":
            assert "NACK/0x0b" in (receipt.reason or "")


def test_dlr_without_ref_is_bad_input() -> None:
    query = {"secret": SECRET, "type": "1"}
    with pytest.raises(RejectedInput) as refused:
        kannel.handle_webhook(make_account(), "GET", query, {}, b"", remote_addr=None)
    assert refused.value.status == 400


def test_sendsms_query_encodes_plus_and_picks_coding() -> None:
    reply = OutboundReply(
        message_id=9, ticket_id=1, channel="sms", account="k", recipient="+62812", body_text="a+b"
    )
    query = kannel.sendsms_query(make_account(), reply, dlr_url="http://h/webhooks/sms/kannel")
    assert "to=%2B62812" in query and "text=a%2Bb" in query and "coding=0" in query
    params = dict(urllib.parse.parse_qsl(query))
    assert params["dlr-url"] == (
        f"http://h/webhooks/sms/kannel?secret={SECRET}&ref=9&type=%d&reason=%A"
    )
    unicode_reply = OutboundReply(
        message_id=9, ticket_id=1, channel="sms", account="k", recipient="1", body_text="✓"
    )
    assert "coding=2" in kannel.sendsms_query(make_account(), unicode_reply, dlr_url="http://h/")


# --- against a real Kannel ---------------------------------------------------------------


@dataclass
class Call:
    at: float
    path: str
    outcome: WebhookOutcome | None
    status: int


class WebhookServer:
    """A small HTTP server standing in for loket's /webhooks/sms/kannel route."""

    def __init__(self, account: KannelAccount):
        self.account = account
        self.calls: queue.Queue[Call] = queue.Queue()
        self.port = free_port()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                split = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
                try:
                    outcome = kannel.handle_webhook(
                        server.account,
                        "GET",
                        query,
                        dict(self.headers),
                        b"",
                        remote_addr=self.client_address[0],
                    )
                    status: int = outcome.status
                except RejectedInput as refused:
                    outcome, status = None, refused.status
                server.calls.put(Call(time.monotonic(), split.path, outcome, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_call(self, timeout: float = 10.0) -> Call:
        return self.calls.get(timeout=timeout)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[KannelGateway, WebhookServer, KannelAccount]]:
    if not kannel_available():
        pytest.skip("Kannel (kannel, kannel-extras) is not installed")
    # The account's sendsms credentials are only known once the gateway exists.
    server = WebhookServer(make_account())
    get_url = (
        f"{server.base}/webhooks/sms/kannel?account=kannel-main&secret={SECRET}"
        "&from=%p&to=%P&text=%a&ts=%T&id=%I"
    )
    with KannelGateway(get_url) as gw:
        account = make_account(
            sendsms_url=gw.sendsms_url, username=gw.username, password=gw.password
        )
        server.account = account
        yield gw, server, account
    server.close()


def drain(server: WebhookServer) -> None:
    while not server.calls.empty():
        server.calls.get_nowait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "text",
    [
        "Internet di sekolah kami mati sejak Senin",
        "Tolong dibantu: biaya Rp 50.000 — kenapa? 😀 ñ €",
    ],
)
def test_mo_through_kannel_arrives_as_raw_inbound(gateway, text: str) -> None:
    gw, server, _ = gateway
    drain(server)
    started = time.monotonic()
    gw.inject_mo("+6281234567890", "500005", text)
    call = server.next_call()
    assert call.status == 200 and call.outcome is not None
    (raw,) = call.outcome.messages
    assert raw.sender == "+6281234567890"
    assert raw.body_text == text
    assert raw.meta["to"] == "500005"
    assert len(raw.external_id) == 36  # Kannel's UUID (%I)
    assert abs(raw.received_at - time.time()) < 60
    print(f"\nSMS MO injected -> webhook received: {(call.at - started) * 1000:.1f} ms")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "kind"),
    [("Tiket #12 sudah selesai. Terima kasih.", "text"), ("Tiket #13 selesai ✓", "ucs-2")],
)
async def test_send_reaches_fake_smsc_and_dlr_maps_to_delivered(gateway, text: str, kind: str):
    gw, server, account = gateway
    drain(server)
    reply = OutboundReply(
        message_id=4242, ticket_id=12, channel="sms", account=account.name,
        recipient="+6281234567890", body_text=text,
    )  # fmt: skip
    started = time.monotonic()
    result = await kannel.send(
        account, reply, dlr_url=f"{server.base}/webhooks/sms/kannel?account=kannel-main"
    )
    assert result.status == "sent"
    mt = gw.wait_mt(lambda m: m.text == text, timeout=10)
    assert (mt.sender, mt.receiver, mt.kind) == ("500005", "+6281234567890", kind)
    receipts = []
    while not receipts:
        call = server.next_call()
        assert call.status == 200 and call.outcome is not None
        receipts = call.outcome.receipts
    (receipt,) = receipts
    assert (receipt.message_id, receipt.status) == (4242, "delivered")
    print(
        f"\nSMS send -> MT at SMSC: {(mt.received_at - started) * 1000:.1f} ms, "
        f"send -> delivered DLR: {(call.at - started) * 1000:.1f} ms"
    )


@pytest.mark.slow
def test_forged_call_to_webhook_is_refused(gateway) -> None:
    _, server, _ = gateway
    drain(server)
    forged = f"{server.base}/webhooks/sms/kannel?account=kannel-main&secret=guess&from=0812&text=x"
    assert httpx.get(forged).status_code == 403
    assert server.next_call().outcome is None


@pytest.mark.slow
async def test_send_with_wrong_password_is_permanent(gateway) -> None:
    _, _, account = gateway
    bad = make_account(sendsms_url=account.sendsms_url, username=account.username, password="no")
    reply = OutboundReply(
        message_id=1, ticket_id=1, channel="sms", account=bad.name, recipient="0812",
        body_text="x",
    )  # fmt: skip
    with pytest.raises(ChannelError) as failed:
        await kannel.send(bad, reply, dlr_url="http://127.0.0.1:9/")
    assert failed.value.permanent
    assert "no" not in failed.value.reason.split()  # the password is not echoed


async def test_send_to_a_closed_port_is_retryable() -> None:
    account = make_account(sendsms_url=f"http://127.0.0.1:{free_port()}/cgi-bin/sendsms")
    reply = OutboundReply(
        message_id=1, ticket_id=1, channel="sms", account="k", recipient="0812", body_text="x"
    )
    with pytest.raises(ChannelError) as failed:
        await kannel.send(account, reply, dlr_url="http://127.0.0.1:9/")
    assert not failed.value.permanent
    assert "pw" not in failed.value.reason


async def test_send_on_5xx_is_retryable() -> None:
    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"Internal error"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        account = make_account(
            sendsms_url=f"http://127.0.0.1:{httpd.server_address[1]}/cgi-bin/sendsms"
        )
        reply = OutboundReply(
            message_id=1, ticket_id=1, channel="sms", account="k", recipient="0812", body_text="x"
        )
        with pytest.raises(ChannelError) as failed:
            await kannel.send(account, reply, dlr_url="http://127.0.0.1:9/")
        assert not failed.value.permanent and "503" in failed.value.reason
    finally:
        httpd.shutdown()
        httpd.server_close()
