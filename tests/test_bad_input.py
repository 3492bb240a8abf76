"""Bad input refused or stored as far as it parses: hostile mail, forged and malformed webhooks, secrets kept out of logs."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import time
import uuid
import zipfile
from collections.abc import Iterator
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import httpx
import pytest

from channels.sms.twilio import compute_signature
from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.checker import check_inbound
from tests.support.dovecot import DovecotServer
from tests.support.ports import free_port
from tests.support.smtp import SmtpServer
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow

# --- hostile mail through the real pipeline ------------------------------------------------------

HELPDESK = "helpdesk@helpdesk.example.org"


def _envelope(message: EmailMessage | MIMEMultipart, kind: str, tag: str, i: int) -> str:
    message_id = f"<{tag}.{kind}.{i}@hostile.example>"
    message["From"] = f"{kind}.{tag}@hostile.example"
    message["To"] = HELPDESK
    message["Subject"] = f"hostile {tag} {kind} {i}"
    message["Message-ID"] = message_id
    return message_id


def huge_header(tag: str, i: int) -> tuple[bytes, str]:
    message = EmailMessage()
    mid = _envelope(message, "header", tag, i)
    message["X-Huge"] = " ".join(["a" * 70] * 3000)  # ~210 KB, folded
    message.replace_header("Subject", f"hostile {tag} header {i} " + "S" * 20000)
    message.set_content("huge header\n")
    return message.as_bytes(), mid


def deep_nesting(tag: str, i: int, depth: int = 120) -> tuple[bytes, str]:
    inner: MIMEMultipart | MIMEText = MIMEText("the bottom\n")
    for _ in range(depth):
        outer = MIMEMultipart("mixed")
        outer.attach(inner)
        inner = outer
    assert isinstance(inner, MIMEMultipart)
    mid = _envelope(inner, "deep", tag, i)
    return inner.as_bytes(), mid


def many_parts(tag: str, i: int, parts: int = 3000) -> tuple[bytes, str]:
    message = MIMEMultipart("mixed")
    mid = _envelope(message, "parts", tag, i)
    message.attach(MIMEText("many parts\n"))
    for n in range(parts):
        part = MIMEApplication(b"x", Name=f"p{n}.bin")
        part["Content-Disposition"] = f'attachment; filename="p{n}.bin"'
        message.attach(part)
    return message.as_bytes(), mid


def nul_bytes(tag: str, i: int) -> tuple[bytes, str]:
    mid = f"<{tag}.nul.{i}@hostile.example>"
    data = (
        f"From: nul.{tag}@hostile.example\r\nTo: {HELPDESK}\r\nSubject: hostile {tag} nul {i} \x00 x\r\n"
        f"Message-ID: {mid}\r\nX-Nul: a\x00b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "before\x00after\r\n\x00\x00\x00\r\n"
    ).encode()
    return data, mid


def zip_bomb() -> bytes:
    """~100 KB of zip that would unpack to 100 MB of zeros."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as member:
            chunk = b"\0" * (1024 * 1024)
            for _ in range(100):
                member.write(chunk)
    return buffer.getvalue()


BOMB = zip_bomb()


def bomb_mail(tag: str, i: int) -> tuple[bytes, str]:
    message = MIMEMultipart("mixed")
    mid = _envelope(message, "bomb", tag, i)
    message.attach(MIMEText("laporan terlampir\n"))
    part = MIMEApplication(BOMB, "zip", Name="laporan.zip")
    part["Content-Disposition"] = 'attachment; filename="laporan.zip"'
    message.attach(part)
    return message.as_bytes(), mid


HOSTILE_NAMES = ["../../etc/passwd", "..\\..\\Windows\\system32\\evil.bat", "a\x00b\r\nX-Injected: 1.exe",
                 "/absolute/path.txt", "\u202egnp.exe", "con.txt" + "x" * 400]  # fmt: skip


def hostile_filenames(tag: str, i: int) -> tuple[bytes, str]:
    """Written by hand: the email package refuses to produce these headers itself."""
    mid = f"<{tag}.names.{i}@hostile.example>"
    lines = [f"From: names.{tag}@hostile.example", f"To: {HELPDESK}", f"Subject: hostile {tag} names {i}",
             f"Message-ID: {mid}", "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b"', "",
             "--b", "Content-Type: text/plain", "", "lampiran"]  # fmt: skip
    for name in HOSTILE_NAMES:
        quoted = name.replace("\r\n", " ").replace('"', "")
        lines += ["--b", "Content-Type: application/octet-stream",
                  f'Content-Disposition: attachment; filename="{quoted}"', "", "payload"]  # fmt: skip
    lines += ["--b--", ""]
    return "\r\n".join(lines).encode("utf-8"), mid


def over_limit(tag: str, i: int) -> tuple[bytes, str]:
    message = MIMEMultipart("mixed")
    mid = _envelope(message, "big", tag, i)
    message.attach(MIMEText("terlalu besar\n"))
    part = MIMEApplication(os.urandom(11 * 1024 * 1024), Name="rekaman.bin")
    part["Content-Disposition"] = 'attachment; filename="rekaman.bin"'
    message.attach(part)
    return message.as_bytes(), mid


KINDS = [huge_header, deep_nesting, many_parts, nul_bytes, bomb_mail, hostile_filenames]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def stored_mail(pg_url: str, ids: list[str]) -> int:
    return int(db.fetchval(pg_url, "SELECT count(*) FROM messages WHERE direction = 'in' AND channel = 'email'"
                                   " AND external_id = ANY($1::text[])", ids))  # fmt: skip


def normal_mail(tag: str) -> tuple[bytes, str]:
    message = EmailMessage()
    mid = _envelope(message, "normal", tag, 0)
    message.set_content("Pesan biasa sesudah pesan jahat.\n")
    return message.as_bytes(), mid


def test_hostile_mail_is_stored_or_shunted_and_the_next_flows(
    stack: LoketStack, dovecot: DovecotServer, pg_url: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    pid = stack.processes["up"].pid
    # One of each first (and two over the attachment limit), then the memory batch.
    first = [kind(tag, 0) for kind in KINDS] + [over_limit(tag, 0), over_limit(tag, 1)]
    dovecot.append_many("helpdesk", [data for data, _ in first])
    after, after_id = normal_mail(tag)
    dovecot.append("helpdesk", after)
    wait_until(
        lambda: stored_mail(pg_url, [after_id]) == 1,
        timeout=120,
        what="normal mail after hostile ones",
    )
    ids = [mid for _, mid in first]
    wait_until(
        lambda: stored_mail(pg_url, ids) == len(ids), timeout=60, what="hostile mails stored"
    )
    tally = check_inbound(pg_url, "email", "helpdesk", ids + [after_id])
    assert tally.ok, tally.summary()
    assert stack.processes["up"].poll() is None

    rows = {r["external_id"]: r for r in db.fetch(
        pg_url, "SELECT m.id, m.external_id, m.subject, m.body_text, m.problems, length(m.headers::text) AS hlen,"
        " (SELECT count(*) FROM attachments a WHERE a.message_id = m.id) AS files FROM messages m"
        " WHERE m.external_id = ANY($1::text[])", ids)}  # fmt: skip
    by_kind = {
        mid.split(".")[1] + ("" if "big" not in mid else mid[-15:]): rows[mid] for mid in ids
    }
    assert "\x00" not in by_kind["nul"]["body_text"] and "after" in by_kind["nul"]["body_text"]
    assert by_kind["header"]["hlen"] < 200_000  # bounded, not the whole 210 KB header
    assert by_kind["parts"]["files"] <= 500 and by_kind["parts"]["problems"]  # capped, and said so
    assert by_kind["deep"]["problems"]  # nesting cut off, and said so
    bomb = db.fetch(pg_url, "SELECT filename, size, sha256, dropped FROM attachments WHERE message_id = $1",
                    by_kind["bomb"]["id"])  # fmt: skip
    assert bomb == [{"filename": "laporan.zip", "size": len(BOMB), "sha256": hashlib.sha256(BOMB).hexdigest(),
                     "dropped": None}]  # stored as the zip it is, never unpacked  # fmt: skip
    blob = Path(stack.env["LOKET_DATA_DIR"]) / "blobs"
    stored_sizes = [p.stat().st_size for p in blob.rglob("*") if p.is_file()]
    assert len(BOMB) in stored_sizes and max(stored_sizes) < 20 * 1024 * 1024
    big = db.fetch(pg_url, "SELECT a.filename, a.dropped, a.sha256 FROM attachments a JOIN messages m"
                   " ON m.id = a.message_id WHERE m.external_id LIKE $1", f"<{tag}.big.%")  # fmt: skip
    assert len(big) == 2 and all(b["dropped"] and not b["sha256"] for b in big), big

    names = [r["filename"] for r in db.fetch(pg_url, "SELECT filename FROM attachments WHERE message_id = $1"
                                             " ORDER BY id", by_kind["names"]["id"])]  # fmt: skip
    assert len(names) == len(HOSTILE_NAMES)
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert not any(ord(c) < 32 or c == "\x7f" for c in name), name
        assert len(name) <= 150
    print(f"\nhostile file names stored as: {names}")

    # Memory: 200 hostile mails (no over-limit ones: they would mostly measure Dovecot).
    before = rss_kb(pid)
    batch = [KINDS[i % len(KINDS)](f"{tag}m", i) for i in range(200)]
    dovecot.append_many("helpdesk", [data for data, _ in batch])
    batch_ids = [mid for _, mid in batch]
    wait_until(lambda: stored_mail(pg_url, batch_ids) == len(batch_ids), timeout=300, interval=1,
               what="200 hostile mails")  # fmt: skip
    after_rss = rss_kb(pid)
    growth_mb = (after_rss - before) / 1024
    tally = check_inbound(pg_url, "email", "helpdesk", batch_ids)
    assert tally.ok, tally.summary()
    assert growth_mb < 100, f"RSS grew {growth_mb:.0f} MB"
    last, last_id = normal_mail(f"{tag}z")
    dovecot.append("helpdesk", last)
    wait_until(
        lambda: stored_mail(pg_url, [last_id]) == 1, timeout=60, what="normal mail after the batch"
    )
    print(
        f"\nloket up RSS {before / 1024:.0f} MB -> {after_rss / 1024:.0f} MB after 200 hostile mails"
        f" ({growth_mb:+.1f} MB); {tally.summary()}"
    )


# --- webhooks: forged, replayed, oversize, malformed -------------------------------------------------

FB_SECRET = "fb-app-secret-" + uuid.uuid4().hex
TG_SECRET = "tg-secret-" + uuid.uuid4().hex
KANNEL_SECRET = "kannelsecret" + uuid.uuid4().hex
TWILIO_TOKEN = uuid.uuid4().hex
TWILIO_SID = "AC" + uuid.uuid4().hex
# Distinctive secrets, to be searched for in the logs afterwards.
SECRETS = {
    "TEST_FB_APP_SECRET": FB_SECRET,
    "TEST_FB_PAGE_TOKEN": "fb-page-token-" + uuid.uuid4().hex,
    "TEST_TG_SECRET": TG_SECRET,
    "TEST_TG_TOKEN": f"7{uuid.uuid4().int % 10**9}:tg-bot-token-{uuid.uuid4().hex}",
    "TEST_KANNEL_SECRET": KANNEL_SECRET,
    "TEST_KANNEL_PASSWORD": "kannel-pass-" + uuid.uuid4().hex,
    "TEST_TWILIO_TOKEN": TWILIO_TOKEN,
    "TEST_IMAP_PASSWORD": "imap-wrong-" + uuid.uuid4().hex,
}


def webhook_config(closed: str, dovecot: DovecotServer, smtp: SmtpServer) -> str:
    return f"""
[[channels.sms]]
name = "kannel-main"
provider = "kannel"
sender = "1500123"
sendsms_url = "{closed}/cgi-bin/sendsms"
username = "loket"
password = "env:TEST_KANNEL_PASSWORD"
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
token = "env:TEST_TG_TOKEN"
secret_token = "env:TEST_TG_SECRET"
api_url = "{closed}"

[[channels.facebook]]
name = "fb-page"
page_id = "1234567890"
app_secret = "env:TEST_FB_APP_SECRET"
verify_token = "fb-verify-token"
page_token = "env:TEST_FB_PAGE_TOKEN"
graph_url = "{closed}/v19.0"

[[channels.email]]
name = "wrong-password"
address = "secrets@helpdesk.example.org"
imap_host = "127.0.0.1"
imap_port = {dovecot.port}
imap_user = "helpdesk"
imap_password = "env:TEST_IMAP_PASSWORD"
imap_tls = "none"
smtp_host = "127.0.0.1"
smtp_port = {smtp.port}
smtp_tls = "none"
"""


@pytest.fixture(scope="module")
def hooks(
    dovecot: DovecotServer, smtp: SmtpServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoketStack]:
    """A stack with SMS, Telegram and Messenger accounts whose providers sit on a closed port."""
    workdir = tmp_path_factory.mktemp("hooks")
    broker = TansuBroker.start(log_dir=workdir)
    pg_url = db.create_database("loket_hooks")
    closed = f"http://127.0.0.1:{free_port()}"
    stack = LoketStack(database_url=pg_url, bootstrap=broker.bootstrap,
                       config_text=webhook_config(closed, dovecot, smtp), workdir=workdir / "loket",
                       extra_env={**SECRETS, "LOKET_IMAP_POLL_SECONDS": "1"})  # fmt: skip
    stack.pg_url = pg_url  # type: ignore[attr-defined]
    try:
        stack.up()
        yield stack
    finally:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)


def inbound_count(pg_url: str) -> int:
    return int(db.fetchval(pg_url, "SELECT count(*) FROM messages WHERE direction = 'in'"))


def fb_signature(body: bytes, secret: str = FB_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def fb_event(mid: str, sender: str, text: str) -> bytes:
    return json.dumps({"object": "page", "entry": [{"id": "1234567890", "time": 1, "messaging": [{
        "sender": {"id": sender}, "recipient": {"id": "1234567890"}, "timestamp": int(time.time() * 1000),
        "message": {"mid": mid, "text": text}}]}]}).encode()  # fmt: skip


def tg_update(update_id: int, user: int, text: str) -> bytes:
    return json.dumps({"update_id": update_id, "message": {
        "message_id": update_id % 100000, "date": int(time.time()), "text": text,
        "chat": {"id": user, "type": "private", "first_name": "Budi"},
        "from": {"id": user, "is_bot": False, "first_name": "Budi"}}}).encode()  # fmt: skip


def test_forged_missing_malformed_and_oversize_webhooks_publish_nothing(hooks: LoketStack) -> None:
    pg_url = hooks.pg_url  # type: ignore[attr-defined]
    base = inbound_count(pg_url)
    client = httpx.Client(base_url=hooks.url, timeout=30)
    tg_ok = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}
    big = b'{"update_id": 1, "pad": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    kannel_query = {
        "account": "kannel-main",
        "from": "081234567890",
        "to": "1500123",
        "text": "hai",
        "id": "k1",
    }
    twilio_url = f"{hooks.url}/webhooks/sms/twilio?account=twilio-main"
    twilio_form = {"MessageSid": "SM" + uuid.uuid4().hex, "From": "+6281234567890", "To": "+6281100001111",
                   "Body": "hai", "AccountSid": TWILIO_SID}  # fmt: skip
    fb_body = fb_event("m_" + uuid.uuid4().hex, "555", "halo")
    cases: list[tuple[str, httpx.Response, tuple[int, ...]]] = [
        ("kannel, no secret", client.get("/webhooks/sms/kannel", params=kannel_query), (401, 403)),
        ("kannel, wrong secret", client.get("/webhooks/sms/kannel",
                                            params={**kannel_query, "secret": "x" * 24}), (401, 403)),
        ("twilio, no signature", client.post(twilio_url, data=twilio_form), (401, 403)),
        ("twilio, forged signature", client.post(twilio_url, data=twilio_form, headers={
            "X-Twilio-Signature": compute_signature("not-the-token", twilio_url,
                                                    {k: [v] for k, v in twilio_form.items()})}), (401, 403)),
        ("telegram, no secret header", client.post("/webhooks/telegram", content=tg_update(1, 9, "x"),
                                                   headers={"Content-Type": "application/json"}), (401, 403)),
        ("telegram, wrong secret", client.post("/webhooks/telegram", content=tg_update(2, 9, "x"), headers={
            **tg_ok, "X-Telegram-Bot-Api-Secret-Token": "nope"}), (401, 403)),
        ("telegram, invalid JSON", client.post("/webhooks/telegram", content=b'{"update_id": 3, ', headers=tg_ok),
         (400, 422)),
        ("telegram, JSON array", client.post("/webhooks/telegram", content=b"[1, 2]", headers=tg_ok), (400, 422)),
        ("telegram, form body", client.post("/webhooks/telegram", content=b"update_id=4&text=hai", headers={
            **tg_ok, "Content-Type": "application/x-www-form-urlencoded"}), (400, 415, 422)),
        ("telegram, oversize", client.post("/webhooks/telegram", content=big, headers=tg_ok), (413,)),
        ("facebook, no signature", client.post("/webhooks/facebook", content=fb_body,
                                               headers={"Content-Type": "application/json"}), (401, 403)),
        ("facebook, forged signature", client.post("/webhooks/facebook", content=fb_body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": fb_signature(fb_body, "wrong")}), (401, 403)),
        ("facebook, signed invalid JSON", client.post("/webhooks/facebook", content=b"{not json", headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": fb_signature(b"{not json")}), (400, 422)),
        ("facebook, signed XML", client.post("/webhooks/facebook", content=b"<page/>", headers={
            "Content-Type": "application/xml", "X-Hub-Signature-256": fb_signature(b"<page/>")}), (400, 415, 422)),
        ("facebook, oversize", client.post("/webhooks/facebook", content=big, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": fb_signature(big)}), (413,)),
        ("facebook, oversize chunked", client.post("/webhooks/facebook", content=iter([big[:500_000], big[500_000:]]),
                                                   headers={"Content-Type": "application/json"}), (413,)),
        ("twilio, oversize", client.post(twilio_url, content=b"Body=" + b"x" * (1024 * 1024 + 10), headers={
            "Content-Type": "application/x-www-form-urlencoded"}), (413,)),
        ("kannel, unknown account", client.get("/webhooks/sms/kannel", params={**kannel_query, "account": "nope",
                                                                                 "secret": KANNEL_SECRET}), (404,)),
        ("no such provider", client.post("/webhooks/sms/carrier-pigeon", content=b"hai"), (404,)),
        ("telegram, GET", client.get("/webhooks/telegram"), (405,)),
        ("twilio, GET", client.get(twilio_url), (405,)),
    ]  # fmt: skip
    wrong = [
        (name, r.status_code, r.text[:120])
        for name, r, allowed in cases
        if r.status_code not in allowed
    ]
    assert not wrong, wrong
    for name, response, _ in cases:
        assert response.text.strip(), f"{name}: a refusal says why"
    time.sleep(3)  # grace period: anything published would have reached the database by now
    assert inbound_count(pg_url) == base
    print(
        f"\n{len(cases)} refused webhook calls: "
        + ", ".join(f"{n}={r.status_code}" for n, r, _ in cases)
    )


def test_replayed_events_are_one_message(hooks: LoketStack) -> None:
    pg_url = hooks.pg_url  # type: ignore[attr-defined]
    client = httpx.Client(base_url=hooks.url, timeout=30)
    update_id = int(time.time() * 1000) % 2_000_000_000
    user = 700000 + update_id % 1000
    tg_headers = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}
    mid = "m_" + uuid.uuid4().hex
    fb_body = fb_event(mid, str(user), "halo dua kali")
    sms_id = uuid.uuid4().hex
    kannel = {"account": "kannel-main", "secret": KANNEL_SECRET, "from": "081234500000", "to": "1500123",
              "text": "dua kali", "id": sms_id}  # fmt: skip
    for _ in range(3):
        assert client.post("/webhooks/telegram", content=tg_update(update_id, user, "dua kali"),
                           headers=tg_headers).status_code == 200  # fmt: skip
        assert (
            client.post(
                "/webhooks/facebook",
                content=fb_body,
                headers={
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": fb_signature(fb_body),
                },
            ).status_code
            == 200
        )
        assert client.get("/webhooks/sms/kannel", params=kannel).status_code == 200
    time.sleep(3)  # the replays have had time to land
    rows = db.fetch(pg_url, "SELECT channel, account, external_id, sender FROM messages WHERE direction = 'in'"
                    " AND ((channel IN ('telegram', 'facebook') AND sender = $1) OR (channel = 'sms'"
                    " AND external_id LIKE $2))", str(user), f"%{sms_id}%")  # fmt: skip
    assert sorted(r["channel"] for r in rows) == ["facebook", "sms", "telegram"], rows
    assert any(mid in r["external_id"] for r in rows)
    for row in rows:
        tally = check_inbound(pg_url, row["channel"], row["account"], [row["external_id"]])
        assert tally.ok, tally.summary()
    print(f"\nreplayed 3x each: {[(r['channel'], r['external_id']) for r in rows]}")


# --- secrets never in logs -----------------------------------------------------------------------


def test_secrets_never_appear_in_logs(hooks: LoketStack, smtp: SmtpServer) -> None:
    pg_url = hooks.pg_url  # type: ignore[attr-defined]
    client = httpx.Client(base_url=hooks.url, timeout=30)
    # Login failures, one with a secret typed as the password.
    hooks.add_agent("secret-agent", "agent", password="the-right-password-1")
    for password in ("wrong", SECRETS["TEST_KANNEL_PASSWORD"], "the-right-password-2"):
        assert (
            client.post(
                "/api/login", json={"username": "secret-agent", "password": password}
            ).status_code
            == 401
        )
    # A caller on SMS and on Telegram; replies to both fail at the closed providers.
    sms_id = uuid.uuid4().hex
    answer = client.get("/webhooks/sms/kannel", params={
        "account": "kannel-main", "secret": KANNEL_SECRET, "from": "081298765432", "to": "1500123",
        "text": "tolong", "id": sms_id})  # fmt: skip
    assert answer.status_code == 200
    update_id = int(time.time()) % 1_000_000_000 + 17
    assert (
        client.post(
            "/webhooks/telegram",
            content=tg_update(update_id, 4242, "tolong juga"),
            headers={
                "X-Telegram-Bot-Api-Secret-Token": TG_SECRET,
                "Content-Type": "application/json",
            },
        ).status_code
        == 200
    )
    agent = hooks.client()
    tickets = wait_until(lambda: db.fetch(pg_url, "SELECT DISTINCT ticket_id, channel FROM messages"
                                          " WHERE external_id LIKE $1 OR (channel = 'telegram' AND sender = '4242')",
                                          f"%{sms_id}%") if len(db.fetch(
                             pg_url, "SELECT 1 FROM messages WHERE external_id LIKE $1 OR"
                             " (channel = 'telegram' AND sender = '4242')", f"%{sms_id}%")) >= 2 else None,
                         what="SMS and Telegram tickets")  # fmt: skip
    reply_ids = []
    for ticket in tickets:
        response = agent.post(
            f"/api/tickets/{ticket['ticket_id']}/replies", json={"body": "kami bantu"}
        )
        assert response.status_code == 201, response.text
        reply_ids.append(response.json()["id"])
    wait_until(lambda: all((db.fetchval(pg_url, "SELECT status_reason FROM messages WHERE id = $1", mid) or "")
                           for mid in reply_ids), timeout=60, what="send failures recorded")  # fmt: skip
    reasons = [
        db.fetchval(pg_url, "SELECT status_reason FROM messages WHERE id = $1", mid)
        for mid in reply_ids
    ]
    # The IMAP account with the wrong password: the channel is down, and says so.
    wait_until(lambda: "wrong-password" in hooks.log_path("up").read_text(errors="replace"), timeout=30,
               what="IMAP login failure logged")  # fmt: skip
    time.sleep(2)
    logs = sorted(hooks.workdir.glob("*.log"))
    assert logs
    leaks = []
    for path in logs:
        text = path.read_text(errors="replace")
        leaks += [(path.name, name) for name, value in SECRETS.items() if value in text]
    for reason in reasons:
        leaks += [("status_reason", name) for name, value in SECRETS.items() if value in reason]
    assert not leaks, leaks
    print(
        f"\nsecrets checked in {[p.name for p in logs]} and {len(reasons)} failure reasons: none found;"
        f" reasons {reasons}"
    )
