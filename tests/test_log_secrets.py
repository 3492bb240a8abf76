"""No secret in any log line: the redactor on its own, and a whole DEBUG run of every channel grepped."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import random
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import httpx
import pytest

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.dovecot import DovecotServer
from tests.support.kannel import KannelGateway, kannel_available
from tests.support.platforms import GraphServer, Recorded, TelegramServer
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until
from tests.test_social_e2e import PlatformLoop, fixture_json, telegram_update
from workers.cli import JsonFormatter
from workers.runtime import logsafety
from workers.runtime.settings import resolve_env

# --- the redactor -------------------------------------------------------------------------------


def capture(formatter: logging.Formatter | None = None) -> tuple[logging.Logger, io.StringIO]:
    """A logger of its own whose handler redacts, as the installed record factory does."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logsafety.RedactSecrets())
    handler.setFormatter(formatter or logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.logsafety.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, out


def test_a_registered_secret_is_masked_in_arguments_tracebacks_stacks_and_extras() -> None:
    secret = f"s3cr3t/{uuid.uuid4().hex}+x"
    logsafety.register_secret(secret)
    logger, out = capture()
    logger.debug("connecting with %s", secret)
    logger.info("encoded: %s and %s", urllib.parse.quote(secret, safe=""), json.dumps(secret))
    try:
        raise RuntimeError(f"login refused for {secret!r}")
    except RuntimeError:
        logger.exception("send failed", stack_info=True, extra={"detail": f"token {secret}"})
    text = out.getvalue()
    assert "connecting with ***" in text
    assert "RuntimeError: login refused for '***'" in text and "Traceback" in text
    assert secret not in text
    assert urllib.parse.quote(secret, safe="") not in text


def test_credentials_are_masked_by_their_shape_without_being_configured() -> None:
    logger, out = capture()
    logger.info(
        "GET http://kannel:13013/cgi-bin/sendsms?username=loket&password=hunter2hunter&to=1"
    )
    logger.info("POST https://api.telegram.org/bot123456:AAE-unconfigured_token/sendMessage")
    logger.info("database postgresql://loket:pg-pass-word@db.internal:5432/loket")
    logger.info("GET /v19.0/me?access_token=EAAGunconfigured&fields=id")
    logger.info("header Authorization: Bearer eyJhbGciOi.unconfigured.sig")
    text = out.getvalue()
    for leaked in ("hunter2hunter", "AAE-unconfigured_token", "pg-pass-word",
                   "EAAGunconfigured", "eyJhbGciOi"):  # fmt: skip
        assert leaked not in text, text
    assert "password=***&to=1" in text
    assert "/bot***/sendMessage" in text
    assert "postgresql://loket:***@db.internal" in text


def test_env_references_and_secret_keys_of_the_config_are_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from_env = f"from-env-{uuid.uuid4().hex}"
    written = f"written-{uuid.uuid4().hex}"
    monkeypatch.setenv("TEST_LOGSAFETY_SECRET", from_env)
    resolve_env({"name": "sms", "username": "env:TEST_LOGSAFETY_SECRET", "password": written}, "t")
    logger, out = capture()
    logger.warning("user %s password %s", from_env, written)
    assert out.getvalue() == "WARNING user *** password ***\n"


def test_json_logs_carry_the_redacted_exception() -> None:
    secret = f"json-{uuid.uuid4().hex}"
    logsafety.register_secret(secret)
    logger, out = capture(JsonFormatter())
    try:
        raise ValueError(secret)
    except ValueError:
        logger.exception("failed")
    entry = json.loads(out.getvalue())
    assert entry["exc"].endswith("ValueError: ***") and secret not in out.getvalue()


# --- a whole run at DEBUG ---------------------------------------------------------------------

SHORT_NUMBER = "1500123"
FB_PAGE = "1234567890"


def token(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(18)}"


@dataclass
class Run:
    """The stack, its platform fakes, and every secret it was configured with."""

    stack: LoketStack
    pg_url: str
    kannel: KannelGateway
    graph: GraphServer
    telegram: TelegramServer
    telegram_poll: TelegramServer
    loop: PlatformLoop
    smtp: SmtpServer
    dovecot: DovecotServer
    imap_user: str
    secrets: dict[str, str]


def run_config(run_secrets: dict[str, str], kannel: KannelGateway, graph: GraphServer,
               tg: TelegramServer, tg_poll: TelegramServer, dovecot: DovecotServer,
               smtp: SmtpServer, imap_user: str) -> str:  # fmt: skip
    return f"""
[[channels.sms]]
name = "kannel-main"
provider = "kannel"
sender = "{SHORT_NUMBER}"
sendsms_url = "{kannel.sendsms_url}"
username = "{kannel.username}"
password = "env:TEST_SECRET_KANNEL_PASSWORD"
inbound_secret = "env:TEST_SECRET_KANNEL_INBOUND"

[[channels.telegram]]
name = "tg-hook"
token = "env:TEST_SECRET_TG_TOKEN"
secret_token = "env:TEST_SECRET_TG_WEBHOOK"
api_url = "{tg.url}"

[[channels.telegram]]
name = "tg-poll"
token = "env:TEST_SECRET_TG_POLL_TOKEN"
api_url = "{tg_poll.url}"
polling = true
poll_seconds = 0.3

[[channels.facebook]]
name = "fb-page"
page_id = "{FB_PAGE}"
app_secret = "env:TEST_SECRET_FB_APP"
verify_token = "env:TEST_SECRET_FB_VERIFY"
page_token = "env:TEST_SECRET_FB_PAGE_TOKEN"
graph_url = "{graph.url}/v19.0"

[[channels.email]]
name = "helpdesk"
address = "{imap_user}@helpdesk.example.org"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_user = "{imap_user}"
imap_password = "env:TEST_SECRET_IMAP_PASSWORD"
imap_tls = "none"
imap_folder = "INBOX"
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
smtp_user = "{imap_user}"
smtp_password = "env:TEST_SECRET_SMTP_PASSWORD"
smtp_tls = "none"
"""


@pytest.fixture(scope="module")
def run(dovecot: DovecotServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    if not kannel_available():
        pytest.skip("Kannel (bearerbox, smsbox, fakesmsc) not installed")
    workdir = tmp_path_factory.mktemp("secrets")
    imap_user = f"desk{uuid.uuid4().hex[:8]}"
    tg_bot, tg_poll_bot = random.randint(10**8, 10**9), random.randint(10**8, 10**9)
    run_secrets = {
        "TEST_SECRET_KANNEL_INBOUND": token("kannel-inbound"),
        "TEST_SECRET_TG_TOKEN": f"{tg_bot}:{token('AAH')}",
        "TEST_SECRET_TG_POLL_TOKEN": f"{tg_poll_bot}:{token('AAP')}",
        "TEST_SECRET_TG_WEBHOOK": token("tg-webhook"),
        "TEST_SECRET_FB_APP": token("fb-app"),
        "TEST_SECRET_FB_VERIFY": token("fb-verify"),
        "TEST_SECRET_FB_PAGE_TOKEN": token("EAAG"),
        "TEST_SECRET_IMAP_PASSWORD": token("imap"),
        "TEST_SECRET_SMTP_PASSWORD": token("smtp"),
    }
    kannel = KannelGateway("")
    run_secrets["TEST_SECRET_KANNEL_PASSWORD"] = kannel.password
    dovecot.add_user(imap_user, run_secrets["TEST_SECRET_IMAP_PASSWORD"])
    smtp = SmtpServer.start(auth=(imap_user, run_secrets["TEST_SECRET_SMTP_PASSWORD"]))
    loop = PlatformLoop()
    graph = GraphServer(page_token=run_secrets["TEST_SECRET_FB_PAGE_TOKEN"])
    tg = TelegramServer(token=run_secrets["TEST_SECRET_TG_TOKEN"], bot_id=tg_bot)
    tg_poll = TelegramServer(token=run_secrets["TEST_SECRET_TG_POLL_TOKEN"], bot_id=tg_poll_bot)
    for server in (graph, tg, tg_poll):
        loop.run(server.start())
    broker = TansuBroker.start(log_dir=workdir)
    pg_password = token("pg")
    plain_url = db.create_database("loket_secrets")
    # The test server trusts loopback, so the password is not needed; it is configured all the same.
    pg_url = plain_url.replace("postgres@", f"postgres:{pg_password}@", 1)
    config = run_config(run_secrets, kannel, graph, tg, tg_poll, dovecot, smtp, imap_user)
    stack = LoketStack(database_url=pg_url, bootstrap=broker.bootstrap, config_text=config,
                       workdir=workdir / "loket",
                       extra_env={**run_secrets, "LOKET_LOG_LEVEL": "DEBUG"})  # fmt: skip
    kannel.get_url = (
        f"{stack.url}/webhooks/sms/kannel?account=kannel-main"
        f"&secret={run_secrets['TEST_SECRET_KANNEL_INBOUND']}&from=%p&to=%P&text=%a&ts=%T&id=%I"
    )
    all_secrets = {**run_secrets, "LOKET_DATABASE_URL password": pg_password}
    try:
        kannel.start()
        stack.up()
        yield Run(
            stack,
            plain_url,
            kannel,
            graph,
            tg,
            tg_poll,
            loop,
            smtp,
            dovecot,
            imap_user,
            all_secrets,
        )
    finally:
        stack.stop()
        kannel.stop()
        for server in (graph, tg, tg_poll):
            loop.run(server.stop())
        loop.close()
        smtp.stop()
        broker.stop()
        db.drop_database(plain_url)


def inbound(pg_url: str, sender: str) -> dict:
    rows = db.fetch(pg_url, "SELECT * FROM messages WHERE direction = 'in' AND sender = $1", sender)
    return rows[0] if rows else {}


def reply(agent: httpx.Client, ticket_id: int, body: str) -> None:
    response = agent.post(f"/api/tickets/{ticket_id}/replies", json={"body": body})
    assert response.status_code == 201, response.text


def kannel_round_trip(run: Run, agent: httpx.Client) -> None:
    national = "0812" + "".join(random.choices("0123456789", k=8))
    run.kannel.inject_mo(national, SHORT_NUMBER, "Kartu KIP belum aktif")
    message = wait_until(lambda: inbound(run.pg_url, national), what="SMS stored")
    reply(agent, message["ticket_id"], "Mohon kirim NISN.")
    run.kannel.wait_mt(lambda m: m.receiver == "+62" + national[1:], timeout=20)
    forged = httpx.get(f"{run.stack.url}/webhooks/sms/kannel", timeout=10, params={
        "account": "kannel-main", "secret": "guessed-secret-0123456789", "from": national,
        "to": SHORT_NUMBER, "text": "palsu", "id": str(uuid.uuid4())})  # fmt: skip
    assert forged.status_code == 403


def telegram_round_trip(run: Run, agent: httpx.Client) -> None:
    user = random.randint(10**8, 10**9)
    update = json.dumps(telegram_update(user, text="Ijazah hilang")).encode()
    url = f"{run.stack.url}/webhooks/telegram?account=tg-hook"
    secret = run.secrets["TEST_SECRET_TG_WEBHOOK"]
    answer = httpx.post(url, content=update, timeout=10, headers={
        "x-telegram-bot-api-secret-token": secret, "content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    message = wait_until(lambda: inbound(run.pg_url, str(user)), what="Telegram message stored")
    # The first send and three polls fail with a 500: the error paths log too.
    run.loop.call(lambda: run.telegram.fail_next(1, "server_error", path_contains="sendMessage"))
    run.loop.call(
        lambda: run.telegram_poll.fail_next(3, "server_error", path_contains="getUpdates")
    )
    reply(agent, message["ticket_id"], "Silakan ke dinas.")

    def sent() -> list[Recorded]:
        return [
            c for c in run.telegram.calls("/sendMessage") if c.form().get("chat_id") == str(user)
        ]

    wait_until(lambda: len(sent()) >= 2, timeout=90, what="Telegram reply sent after a retry")
    polled = telegram_update(user + 1, text="Lewat polling")
    run.loop.call(lambda: run.telegram_poll.updates.append(polled))
    wait_until(lambda: inbound(run.pg_url, str(user + 1)), timeout=30, what="polled message stored")


def facebook_round_trip(run: Run, agent: httpx.Client) -> None:
    verify = httpx.get(f"{run.stack.url}/webhooks/facebook", timeout=10, params={
        "hub.mode": "subscribe", "hub.verify_token": run.secrets["TEST_SECRET_FB_VERIFY"],
        "hub.challenge": "4242"})  # fmt: skip
    assert verify.status_code == 200 and verify.text == "4242", verify.text
    sender = str(random.randint(10**15, 10**16))
    payload = fixture_json("messenger_text.json")
    messaging = payload["entry"][0]["messaging"][0]
    messaging["sender"]["id"] = sender
    messaging["timestamp"] = int(time.time() * 1000)
    messaging["message"]["mid"] = f"m_{uuid.uuid4().hex}"
    messaging["message"]["text"] = "Dana BOS belum cair"
    body = json.dumps(payload).encode()
    digest = hmac.new(run.secrets["TEST_SECRET_FB_APP"].encode(), body, hashlib.sha256).hexdigest()
    answer = httpx.post(f"{run.stack.url}/webhooks/facebook", content=body, timeout=10, headers={
        "x-hub-signature-256": f"sha256={digest}", "content-type": "application/json"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    message = wait_until(lambda: inbound(run.pg_url, sender), what="Messenger message stored")
    reply(agent, message["ticket_id"], "Kami cek dulu.")
    wait_until(lambda: [c for c in run.graph.calls(f"/{FB_PAGE}/messages")
                        if c.json()["recipient"]["id"] == sender],
               timeout=30, what="Messenger reply sent")  # fmt: skip


def email_round_trip(run: Run, agent: httpx.Client) -> None:
    sender = f"warga-{uuid.uuid4().hex[:8]}@example.net"
    mail = EmailMessage()
    mail["From"], mail["To"] = sender, f"{run.imap_user}@helpdesk.example.org"
    mail["Subject"], mail["Message-ID"] = "Nilai rapor", make_msgid(domain="example.net")
    mail.set_content("Nilai rapor anak saya tidak muncul.")
    run.dovecot.append(run.imap_user, mail.as_bytes())
    message = wait_until(lambda: inbound(run.pg_url, sender), timeout=60, what="mail stored")
    reply(agent, message["ticket_id"], "Sudah kami teruskan ke sekolah.")
    run.smtp.wait_for(lambda m: sender in m.rcpt_tos, timeout=30)


@pytest.mark.slow
def test_a_debug_run_of_every_channel_logs_no_secret(run: Run) -> None:
    agent_name = f"agent-{uuid.uuid4().hex[:8]}"
    agent_password = token("agent-password")
    run.stack.add_agent(agent_name, password=agent_password)
    wrong = httpx.post(f"{run.stack.url}/api/login", timeout=30,
                       json={"username": agent_name, "password": token("wrong")})  # fmt: skip
    assert wrong.status_code == 401
    agent = httpx.Client(base_url=run.stack.url, timeout=30)
    login = agent.post("/api/login", json={"username": agent_name, "password": agent_password})
    session = login.json()["token"]
    agent.headers["Authorization"] = f"Bearer {session}"
    try:
        kannel_round_trip(run, agent)
        telegram_round_trip(run, agent)
        facebook_round_trip(run, agent)
        email_round_trip(run, agent)
    finally:
        agent.close()
    run.stack.stop()  # everything the processes had to say is in the log now

    log = run.stack.log_path("up").read_text(errors="replace")
    assert " DEBUG " in log and "loket is running" in log  # a DEBUG run, and a whole one
    watched = {**run.secrets, "agent password": agent_password, "agent session": session}
    for part in ("TEST_SECRET_TG_TOKEN", "TEST_SECRET_TG_POLL_TOKEN"):
        watched[f"{part} (after the bot id)"] = run.secrets[part].split(":", 1)[1]
    leaks = {}
    for name, secret in watched.items():
        for form in {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}:
            hits = [line for line in log.splitlines() if form in line]
            if hits:
                leaks[name] = hits[:3]
    assert not leaks, json.dumps(leaks, indent=2)[:4000]
