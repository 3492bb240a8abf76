"""SMS end to end: Kannel's fake SMSC and a Twilio-style gateway in, tickets in PostgreSQL, replies out."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import statistics
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from channels.sms.twilio import compute_signature
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.kannel import KannelGateway, kannel_available
from tests.support.ports import free_port
from tests.support.stack import LoketStack, wait_until
from workers.pipeline import bus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not kannel_available(), reason="Kannel (bearerbox, smsbox, fakesmsc) not installed"
    ),
]

KANNEL_ACCOUNT = "kannel-main"
TWILIO_ACCOUNT = "twilio-main"
KANNEL_SECRET = "kannel-inbound-" + uuid.uuid4().hex[:12]
TWILIO_SID = "AC" + uuid.uuid4().hex
TWILIO_TOKEN = uuid.uuid4().hex
SHORT_NUMBER = "1500123"  # the help desk's SMS number at the operator
TWILIO_NUMBER = "+6281100001111"
RAW_TOPIC = "loket.inbound.raw"


def mobile() -> str:
    """A fresh Indonesian mobile number in national form (0812 + 8 digits)."""
    return "0812" + "".join(random.choices("0123456789", k=8))


def e164(national: str) -> str:
    return "+62" + national[1:]


# --- a Twilio-style Messages API --------------------------------------------------------------


@dataclass
class TwilioApiCall:
    path: str
    auth: tuple[str, str]
    form: dict[str, str]


class TwilioApi:
    """`POST /2010-04-01/Accounts/{sid}/Messages.json`, answering like Twilio; then it reports
    the message delivered to the StatusCallback, signed as Twilio signs it."""

    def __init__(self, auth_token: str) -> None:
        self.auth_token = auth_token
        self.calls: list[TwilioApiCall] = []
        self.callback_answers: list[int] = []
        self._lock = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                user, _, password = (
                    base64.b64decode(self.headers.get("authorization", "Basic ")[6:])
                    .decode()
                    .partition(":")
                )
                sid = "SM" + uuid.uuid4().hex
                body = json.dumps({"sid": sid, "status": "queued", "to": form.get("To")}).encode()
                self.send_response(201)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with api._lock:
                    api.calls.append(TwilioApiCall(self.path, (user, password), form))
                    api._lock.notify_all()
                if form.get("StatusCallback"):
                    threading.Thread(
                        target=api.report, args=(form["StatusCallback"], sid), daemon=True
                    ).start()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def report(self, callback: str, sid: str) -> None:
        params = {"MessageSid": sid, "MessageStatus": "delivered", "AccountSid": TWILIO_SID}
        signature = compute_signature(
            self.auth_token, callback, {k: [v] for k, v in params.items()}
        )
        answer = httpx.post(
            callback, data=params, headers={"X-Twilio-Signature": signature}, timeout=10
        )
        with self._lock:
            self.callback_answers.append(answer.status_code)

    def wait_call(self, to: str, timeout: float = 20.0) -> TwilioApiCall:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for call in self.calls:
                    if call.form.get("To") == to:
                        return call
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no Messages API call to {to}; got {self.calls!r}")
                self._lock.wait(remaining)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class SmsSetup:
    stack: LoketStack
    kannel: KannelGateway
    twilio: TwilioApi
    pg_url: str
    bootstrap: str


def sms_config(kannel: KannelGateway, twilio_api: str) -> str:
    return f"""
[[channels.sms]]
name = "{KANNEL_ACCOUNT}"
provider = "kannel"
sender = "{SHORT_NUMBER}"
sendsms_url = "{kannel.sendsms_url}"
username = "{kannel.username}"
password = "env:TEST_KANNEL_PASSWORD"
inbound_secret = "env:TEST_KANNEL_SECRET"

[[channels.sms]]
name = "{TWILIO_ACCOUNT}"
provider = "twilio"
sender = "{TWILIO_NUMBER}"
account_sid = "{TWILIO_SID}"
auth_token = "env:TEST_TWILIO_TOKEN"
api_url = "{twilio_api}"
"""


@pytest.fixture(scope="module")
def sms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmsSetup]:
    """A stack of its own (database, broker) with both SMS providers, and their gateways."""
    pg_url = db.create_database("loket_sms")
    broker = TansuBroker.start(log_dir=tmp_path_factory.mktemp("sms-tansu"))
    twilio = TwilioApi(TWILIO_TOKEN)
    kannel = KannelGateway("")
    stack = LoketStack(
        database_url=pg_url, bootstrap=broker.bootstrap, config_text=sms_config(kannel, twilio.url),
        workdir=tmp_path_factory.mktemp("loket-sms"),
        extra_env={"TEST_KANNEL_PASSWORD": kannel.password, "TEST_KANNEL_SECRET": KANNEL_SECRET,
                   "TEST_TWILIO_TOKEN": TWILIO_TOKEN},
    )  # fmt: skip
    # The gateway calls the stack's webhook for every MO, with Kannel's escapes filled in.
    kannel.get_url = (
        f"{stack.url}/webhooks/sms/kannel?account={KANNEL_ACCOUNT}&secret={KANNEL_SECRET}"
        "&from=%p&to=%P&text=%a&ts=%T&id=%I"
    )
    try:
        kannel.start()
        stack.up()
        yield SmsSetup(stack, kannel, twilio, pg_url, broker.bootstrap)
    finally:
        stack.stop()
        kannel.stop()
        twilio.stop()
        broker.stop()
        db.drop_database(pg_url)


@pytest.fixture(scope="module")
def agent(sms: SmsSetup) -> Iterator[httpx.Client]:
    client = sms.stack.client()
    yield client
    client.close()


# --- helpers ----------------------------------------------------------------------------------


def messages_from(pg_url: str, sender: str) -> list[dict[str, Any]]:
    return db.fetch(
        pg_url, "SELECT * FROM messages WHERE direction = 'in' AND sender = $1 ORDER BY id", sender
    )


def identities_of(pg_url: str, caller_id: int) -> list[tuple[str, str]]:
    rows = db.fetch(
        pg_url, "SELECT kind, value FROM identities WHERE caller_id = $1 ORDER BY id", caller_id
    )
    return [(r["kind"], r["value"]) for r in rows]


def status_of(pg_url: str, message_id: int) -> str:
    return str(db.fetchval(pg_url, "SELECT status FROM messages WHERE id = $1", message_id))


def status_is(pg_url: str, message_id: int, status: str) -> bool:
    return status_of(pg_url, message_id) == status


def raw_topic_texts(bootstrap: str) -> list[str]:
    """Every record on the raw topic, read from the start (no consumer group)."""

    async def read() -> list[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()  # loads the cluster metadata
            partitions = [
                TopicPartition(RAW_TOPIC, p) for p in consumer.partitions_for_topic(RAW_TOPIC) or ()
            ]
            assert partitions, "the raw topic has no partitions"
            consumer.assign(partitions)
            bus.seek_to_start(consumer, partitions)
            ends = await consumer.end_offsets(partitions)
            values: list[str] = []
            for tp in partitions:
                while await consumer.position(tp) < ends[tp]:
                    batches = await consumer.getmany(tp, timeout_ms=1000)
                    values.extend(r.value.decode("utf-8", "replace") for r in batches.get(tp, []))
            return values
        finally:
            await consumer.stop()

    return asyncio.run(read())


def kannel_mo_url(sms: SmsSetup, *, secret: str, sender: str, text: str, kannel_id: str) -> str:
    query = urllib.parse.urlencode({"account": KANNEL_ACCOUNT, "secret": secret, "from": sender,
                                    "to": SHORT_NUMBER, "text": text, "ts": str(int(time.time())),
                                    "id": kannel_id})  # fmt: skip
    return f"{sms.stack.url}/webhooks/sms/kannel?{query}"


def twilio_post(
    sms: SmsSetup, params: dict[str, str], *, token: str = TWILIO_TOKEN
) -> httpx.Response:
    url = f"{sms.stack.url}/webhooks/sms/twilio?account={TWILIO_ACCOUNT}"
    signature = compute_signature(token, url, {k: [v] for k, v in params.items()})
    return httpx.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)


def twilio_message(sender: str, body: str) -> dict[str, str]:
    return {"MessageSid": "SM" + uuid.uuid4().hex, "AccountSid": TWILIO_SID, "From": sender,
            "To": TWILIO_NUMBER, "Body": body, "NumMedia": "0"}  # fmt: skip


# --- Kannel -----------------------------------------------------------------------------------


def test_kannel_sms_becomes_ticket_and_reply_is_delivered(
    sms: SmsSetup, agent: httpx.Client
) -> None:
    national = mobile()
    sms.kannel.inject_mo(national, SHORT_NUMBER, "Kartu KIP anak saya belum aktif")
    [inbound] = wait_until(lambda: messages_from(sms.pg_url, national), what="MO stored")
    assert inbound["channel"] == "sms" and inbound["account"] == KANNEL_ACCOUNT
    assert inbound["body_text"] == "Kartu KIP anak saya belum aktif"
    assert identities_of(sms.pg_url, inbound["caller_id"]) == [("phone", e164(national))]
    ticket = agent.get(f"/api/tickets/{inbound['ticket_id']}").json()
    assert ticket["status"] == "open" and ticket["channel"] == "sms"

    response = agent.post(f"/api/tickets/{inbound['ticket_id']}/replies",
                          json={"body": "Mohon kirim NISN anak Bapak/Ibu."})  # fmt: skip
    assert response.status_code == 201, response.text
    reply = response.json()
    assert reply["channel"] == "sms" and reply["account"] == KANNEL_ACCOUNT
    mt = sms.kannel.wait_mt(lambda m: m.receiver == e164(national), timeout=20)
    assert mt.text == "Mohon kirim NISN anak Bapak/Ibu."
    assert mt.sender == SHORT_NUMBER
    # The fake SMSC acknowledges at once: the DLR moves the reply to delivered.
    wait_until(
        lambda: status_of(sms.pg_url, reply["id"]) == "delivered", timeout=20, what="DLR applied"
    )
    kinds = [e["data"].get("status") for e in agent.get(f"/api/tickets/{inbound['ticket_id']}").json()["events"]
             if e["kind"] == "delivery"]  # fmt: skip
    assert kinds == ["sent", "delivered"]


def test_kannel_round_trip_times(sms: SmsSetup, agent: httpx.Client, artifacts: Path) -> None:
    ingest: list[float] = []
    delivered: list[float] = []
    for n in range(7):
        national = mobile()
        started = time.monotonic()
        sms.kannel.inject_mo(national, SHORT_NUMBER, f"Uji waktu tempuh {n}")
        stored = partial(messages_from, sms.pg_url, national)
        [inbound] = wait_until(stored, interval=0.01, what="MO stored")
        ingest.append(time.monotonic() - started)

        started = time.monotonic()
        reply = agent.post(
            f"/api/tickets/{inbound['ticket_id']}/replies", json={"body": f"Balasan {n}"}
        ).json()
        done = partial(status_is, sms.pg_url, reply["id"], "delivered")
        wait_until(done, interval=0.01, timeout=20, what="reply delivered")
        delivered.append(time.monotonic() - started)
    figures = {
        "inject_to_ticket_median_s": statistics.median(ingest),
        "reply_to_delivered_median_s": statistics.median(delivered),
        "inject_to_ticket_s": ingest,
        "reply_to_delivered_s": delivered,
    }
    (artifacts / "sms_round_trip.json").write_text(json.dumps(figures, indent=2))
    print(f"\nSMS round trip: {json.dumps(figures)}")
    # Every hop is local and push-driven (no polling interval on the path).
    assert figures["inject_to_ticket_median_s"] < 5
    assert figures["reply_to_delivered_median_s"] < 5


def test_forged_kannel_call_is_refused_and_nothing_is_published(sms: SmsSetup) -> None:
    national = mobile()
    marker = f"palsu-{uuid.uuid4().hex}"
    forged = kannel_mo_url(sms, secret="wrong-secret-0123456789", sender=national, text=marker,
                           kannel_id=str(uuid.uuid4()))  # fmt: skip
    response = httpx.get(forged, timeout=10)
    assert response.status_code == 403
    # A genuine MO from the same number follows the same partition; once it is stored, a
    # published forgery would have been stored before it.
    sms.kannel.inject_mo(national, SHORT_NUMBER, "Pesan asli")
    wait_until(lambda: messages_from(sms.pg_url, national), what="genuine MO stored")
    assert [m["body_text"] for m in messages_from(sms.pg_url, national)] == ["Pesan asli"]
    assert not any(marker in value for value in raw_topic_texts(sms.bootstrap))
    assert (
        db.fetchval(sms.pg_url, "SELECT count(*) FROM messages WHERE body_text = $1", marker) == 0
    )


def test_same_mo_delivered_twice_is_one_message(sms: SmsSetup) -> None:
    national = mobile()
    sms.kannel.inject_mo(national, SHORT_NUMBER, "Dana BOS belum cair")
    [first] = wait_until(lambda: messages_from(sms.pg_url, national), what="MO stored")
    kannel_id = first["external_id"]
    assert kannel_id  # Kannel's own message id (%I)
    # smsbox retries a get-url call it saw fail: the same MO, the same Kannel id.
    again = kannel_mo_url(sms, secret=KANNEL_SECRET, sender=national, text="Dana BOS belum cair",
                          kannel_id=kannel_id)  # fmt: skip
    assert httpx.get(again, timeout=10).status_code == 200
    sms.kannel.inject_mo(national, SHORT_NUMBER, "Tambahan: sekolah negeri")
    wait_until(lambda: len(messages_from(sms.pg_url, national)) >= 2, what="follow-up stored")
    rows = messages_from(sms.pg_url, national)
    assert [r["body_text"] for r in rows] == ["Dana BOS belum cair", "Tambahan: sekolah negeri"]
    assert len({r["ticket_id"] for r in rows}) == 1


# --- Twilio-style -----------------------------------------------------------------------------


def test_twilio_sms_becomes_ticket_and_reply_goes_to_messages_api(
    sms: SmsSetup, agent: httpx.Client
) -> None:
    national = mobile()
    sender = e164(national)
    response = twilio_post(sms, twilio_message(sender, "Ijazah hilang, bagaimana mengurusnya?"))
    assert response.status_code == 200, response.text
    assert b"<Response>" in response.content
    [inbound] = wait_until(lambda: messages_from(sms.pg_url, sender), what="Twilio message stored")
    assert inbound["account"] == TWILIO_ACCOUNT
    assert identities_of(sms.pg_url, inbound["caller_id"]) == [("phone", sender)]

    reply = agent.post(f"/api/tickets/{inbound['ticket_id']}/replies",
                       json={"body": "Silakan datang ke dinas pendidikan setempat."}).json()  # fmt: skip
    call = sms.twilio.wait_call(sender)
    assert call.path == f"/2010-04-01/Accounts/{TWILIO_SID}/Messages.json"
    assert call.auth == (TWILIO_SID, TWILIO_TOKEN)
    assert call.form["From"] == TWILIO_NUMBER
    assert call.form["Body"] == "Silakan datang ke dinas pendidikan setempat."
    assert call.form["StatusCallback"].startswith(
        f"{sms.stack.url}/webhooks/sms/twilio?account={TWILIO_ACCOUNT}"
    )
    # The API's status callback (signed) reports it delivered.
    wait_until(
        lambda: status_of(sms.pg_url, reply["id"]) == "delivered",
        timeout=20,
        what="status callback",
    )
    sid = db.fetchval(sms.pg_url, "SELECT provider_id FROM messages WHERE id = $1", reply["id"])
    assert sid and sid.startswith("SM")


def test_forged_twilio_webhook_is_refused_and_nothing_is_stored(sms: SmsSetup) -> None:
    sender = e164(mobile())
    marker = f"palsu-{uuid.uuid4().hex}"
    response = twilio_post(sms, twilio_message(sender, marker), token="not-the-auth-token")
    assert response.status_code == 403
    unsigned = httpx.post(f"{sms.stack.url}/webhooks/sms/twilio?account={TWILIO_ACCOUNT}",
                          data=twilio_message(sender, marker), timeout=10)  # fmt: skip
    assert unsigned.status_code == 403
    assert twilio_post(sms, twilio_message(sender, "Pesan asli")).status_code == 200
    wait_until(lambda: messages_from(sms.pg_url, sender), what="genuine message stored")
    assert [m["body_text"] for m in messages_from(sms.pg_url, sender)] == ["Pesan asli"]
    assert not any(marker in value for value in raw_topic_texts(sms.bootstrap))


# --- one caller, several ways of writing the number --------------------------------------------


def test_one_caller_whatever_form_the_number_arrives_in(sms: SmsSetup) -> None:
    national = mobile()
    number = e164(national)
    sms.kannel.inject_mo(national, SHORT_NUMBER, "Laptop bantuan rusak")
    [first] = wait_until(lambda: messages_from(sms.pg_url, national), what="first SMS")
    # The same phone later through the other gateway, and once more without the plus.
    assert twilio_post(sms, twilio_message(number, "Nomor seri sudah saya foto")).status_code == 200
    without_plus = number[1:]
    sms.kannel.inject_mo(without_plus, SHORT_NUMBER, "Kapan teknisi datang?")
    [second] = wait_until(lambda: messages_from(sms.pg_url, number), what="second SMS")
    [third] = wait_until(lambda: messages_from(sms.pg_url, without_plus), what="third SMS")
    assert first["caller_id"] == second["caller_id"] == third["caller_id"]
    assert first["ticket_id"] == second["ticket_id"] == third["ticket_id"]
    assert identities_of(sms.pg_url, first["caller_id"]) == [("phone", number)]


def test_caller_who_phoned_is_the_same_caller_by_sms(sms: SmsSetup, agent: httpx.Client) -> None:
    national = mobile()
    number = e164(national)
    # The agent takes the call: registers the caller with the number as typed, logs the problem.
    typed = f"{national[:4]}-{national[4:8]}-{national[8:]}"
    caller = agent.post("/api/callers", json={"name": "Bapak Sutrisno", "phone": typed})
    assert caller.status_code == 201, caller.text
    caller_id = caller.json()["id"]
    call = agent.post("/api/tickets", json={"caller_id": caller_id, "channel": "phone",
                                            "subject": "Tunjangan guru belum masuk",
                                            "body": "Penelepon menanyakan tunjangan bulan lalu."})  # fmt: skip
    assert call.status_code == 201, call.text
    ticket_id = call.json()["id"]

    # Later the same person texts, the number written the gateway's way.
    sms.kannel.inject_mo(number[1:], SHORT_NUMBER, "Ini nomor SK saya: 421/123")
    [text] = wait_until(lambda: messages_from(sms.pg_url, number[1:]), what="SMS stored")
    assert text["caller_id"] == caller_id
    assert text["ticket_id"] == ticket_id  # the open ticket from the call
    assert identities_of(sms.pg_url, caller_id) == [("phone", number)]
    # The answer goes out by SMS, the channel the person last used.
    reply = agent.post(
        f"/api/tickets/{ticket_id}/replies", json={"body": "Terima kasih, kami cek."}
    ).json()
    assert reply["channel"] == "sms"
    mt = sms.kannel.wait_mt(
        lambda m: m.receiver == number and m.text == "Terima kasih, kami cek.", timeout=20
    )
    assert mt.sender == SHORT_NUMBER
