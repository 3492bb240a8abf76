"""`loket up --demo`: sample Indonesian traffic through each channel's real inbound path, and a demo login.

Every message enters where a real one does (the mail parser, the SMS gateway's webhook handler,
the platforms' signed webhook handlers) and is published to the raw topic; the pipeline does
the rest. Calls are logged through the help-desk procedure like an agent logs them. Everything
is marked demo; nothing here runs without `--demo`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import secrets
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid

import asyncpg

from channels.email import parse_email
from channels.sms import kannel
from channels.social import facebook, telegram, twitter
from channels.types import RawInbound, WebhookOutcome
from ticketing import agents, procedure
from ticketing.callers import IdentityTaken
from workers.pipeline import intake
from workers.runtime.runtime import Runtime
from workers.web.webhooks import publish_outcome

log = logging.getLogger(__name__)

DEMO_USER = "demo"
HELPDESK = "pengaduan@loket-demo.example.id"
# After the first burst, a new message every so often for a while, so the queue visibly lives.
TRICKLE_EVERY_SECONDS = 30.0
TRICKLE_COUNT = 10


@dataclass(frozen=True)
class DemoAccounts:
    """In-process accounts whose secrets only this process knows: the demo signs its own payloads."""

    sms: kannel.KannelAccount
    telegram: telegram.TelegramAccount
    facebook: facebook.FacebookAccount
    twitter: twitter.TwitterAccount

    @classmethod
    def create(cls) -> DemoAccounts:
        return cls(
            sms=kannel.KannelAccount(
                name="demo-sms", sender="1500123", sendsms_url="http://127.0.0.1:9/cgi-bin/sendsms",
                username="demo", password=secrets.token_urlsafe(16),
                inbound_secret=secrets.token_urlsafe(24),
            ),
            telegram=telegram.TelegramAccount(
                name="demo-telegram", token=f"0:{secrets.token_urlsafe(16)}",
                secret_token=secrets.token_urlsafe(24), api_url="http://127.0.0.1:9",
            ),
            facebook=facebook.FacebookAccount(
                name="demo-facebook", page_id="100200300", app_secret=secrets.token_urlsafe(24),
                verify_token=secrets.token_urlsafe(16), page_token=secrets.token_urlsafe(16),
                graph_url="http://127.0.0.1:9",
            ),
            twitter=twitter.TwitterAccount(
                name="demo-twitter", consumer_key="demo", consumer_secret=secrets.token_urlsafe(24),
                access_token="demo", access_token_secret=secrets.token_urlsafe(16),
                api_url="http://127.0.0.1:9", user_id="4337869213",
            ),
        )  # fmt: skip


# --- sample content ------------------------------------------------------------------------

EMAILS = [
    (
        "Ibu Siti Aminah, S.Pd",
        "siti.aminah@sdn3-bogor.sch.id",
        "Akun operator Dapodik terkunci",
        "Selamat pagi Bapak/Ibu,\n\nAkun operator Dapodik SD Negeri 3 Bogor terkunci sejak kemarin sore"
        " setelah tiga kali salah kata sandi. Batas sinkronisasi tanggal 31 ini.\nMohon dibantu reset.\n\n"
        "Hormat kami,\nSiti Aminah\nOperator SDN 3 Bogor",
        None,
    ),
    (
        "Bambang Sutrisno",
        "bambang.s@smpn1-klaten.sch.id",
        "Dana BOS tahap 2 belum masuk rekening",
        "Dengan hormat,\n\nSampai hari ini dana BOS tahap 2 untuk SMP Negeri 1 Klaten belum masuk ke"
        " rekening sekolah. Terlampir rekap dan tangkapan layar mutasi rekening.\n\nTerima kasih.",
        "attachments",
    ),
    (
        "Dewi Lestari",
        "dewi.lestari@gmail.com",
        "Sertifikat pelatihan guru tidak bisa diunduh",
        "Halo admin, sertifikat pelatihan Kurikulum Merdeka saya tidak bisa diunduh, muncul pesan"
        " 'file tidak ditemukan'. Mohon bantuannya.",
        "html",
    ),
    (
        "Agus Prasetyo",
        "agus.prasetyo@yahoo.co.id",
        "Jadwal ANBK susulan",
        "Selamat siang, kapan jadwal ANBK susulan untuk siswa yang sakit? Terima kasih.",
        None,
    ),
]
SMS = [
    (
        "0812-8765-4321",
        "Min, NISN anak saya tdk ditemukan di sistem PIP. Mohon bantuan. Ibu Rina, Depok",
    ),
    ("085711223344", "Kapan pendaftaran PPDB jalur zonasi dibuka? Trims"),
    ("+62 813 1122 3344", "Kartu KIP anak sy hilang, bagaimana cara urus yg baru?"),
]
TELEGRAM = [
    (
        7100001,
        "Rudi",
        "Hartono",
        "Halo, portal guru error 502 sejak pagi, tidak bisa isi presensi.",
    ),
    (7100002, "Maya", "Sari", "Selamat sore, bagaimana cara ganti email di akun SIMPKB?"),
]
FACEBOOK = [
    ("6543210000000001", "Halo admin, bagaimana cara mengurus legalisir ijazah yang hilang?"),
]
TWITTER = [
    (
        "3001969301",
        "Yusuf Ramadhan",
        "yusufr",
        "Halo min, tunjangan profesi guru bulan ini belum cair ya?",
    ),
]
CALLS = [
    # (name, organization, phone, problem, what happens next)
    (
        "Bapak Hendra Wijaya",
        "SMA Negeri 5 Surabaya",
        "031-5678901",
        "Nilai rapor siswa kelas XII tidak muncul di e-Rapor setelah sinkronisasi.",
        "open",
    ),
    (
        "Ibu Sri Wahyuni",
        "Dinas Pendidikan Kab. Sleman",
        "0274-868123",
        "Menanyakan juknis bantuan sarana prasarana tahun ini; menunggu dokumen dari pusat.",
        "pend",
    ),
    (
        "Pak Joko Susilo",
        "SDN Sukamaju 2",
        "0813-9988-7766",
        "Data guru honorer hilang dari Dapodik setelah pembaruan aplikasi.",
        "support",
    ),
    (
        "Ibu Ratna Dewi",
        "Yayasan Pendidikan Harapan",
        "021-7418780",
        "Izin operasional sekolah belum terbit padahal berkas lengkap sejak tiga bulan lalu.",
        "management",
    ),
    (
        "Bapak Ahmad Fauzi",
        "MI Al-Hidayah",
        "0857-1234-5678",
        "Lupa kata sandi akun Info GTK.",
        "resolved",
    ),
    (
        "Ibu Lina Marlina",
        None,
        "0812-3000-4000",
        "Ingin melapor pungutan liar di sekolah, tetapi memutuskan tidak jadi melapor.",
        "withdrawn",
    ),
]
TRICKLE: list[tuple[str, str, str]] = [
    ("sms", "0812-8765-4321", "Min, sudah ada kabar soal NISN anak saya?"),
    ("telegram", "7100003", "Apakah ada webinar literasi digital bulan ini?"),
    (
        "email",
        "kepala.sekolah@smkn2-medan.sch.id",
        "Surat edaran libur semester belum kami terima.",
    ),
    ("sms", "0878-5555-1212", "Bagaimana cara cek status penyaluran PIP?"),
    ("facebook", "6543210000000002", "Admin, link pendaftaran beasiswa tidak bisa dibuka."),
]


def _png(width: int = 64, height: int = 40) -> bytes:
    """A small PNG (a blue bar chart on white), made here so the demo ships no image files."""
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            bar = (x // 8) % 2 == 0 and y > height - 6 - (x // 8) * 4
            row += bytes((30, 90, 200) if bar else (255, 255, 255))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))  # fmt: skip


def _mail(name: str, address: str, subject: str, body: str, extra: str | None) -> bytes:
    message = EmailMessage()
    message["From"] = formataddr((name, address))
    message["To"] = HELPDESK
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain="demo.loket.example.id")
    message.set_content(body)
    if extra == "html":
        paragraphs = "".join(f"<p>{line}</p>" for line in body.split("\n") if line)
        message.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
    elif extra == "attachments":
        rekap = b"bulan,tahap,jumlah\nJanuari,1,125000000\nJuli,2,0\n"
        message.add_attachment(rekap, maintype="text", subtype="csv", filename="rekap-bos.csv")
        message.add_attachment(
            _png(), maintype="image", subtype="png", filename="mutasi-rekening.png"
        )
    return message.as_bytes()


def _demo(raw: RawInbound) -> RawInbound:
    raw.meta["demo"] = "1"
    return raw


# --- channels ------------------------------------------------------------------------------


async def send_email(rt: Runtime, name: str, address: str, subject: str, body: str,
                     extra: str | None = None) -> None:  # fmt: skip
    """Through the mail parser, as the IMAP poller does, onto the raw topic."""
    raw = parse_email(
        _mail(name, address, subject, body, extra), account="demo-email", external_id="",
        blobs=rt.blobs, max_attachment_bytes=rt.settings.max_attachment_bytes,
    )  # fmt: skip
    raw.external_id = raw.headers.get("message-id") or f"demo:{uuid.uuid4().hex}"
    await intake.publish_inbound(rt, [_demo(raw)])


async def _publish(rt: Runtime, outcome: WebhookOutcome) -> None:
    for raw in outcome.messages:
        _demo(raw)
    await publish_outcome(rt, outcome)


async def send_sms(rt: Runtime, accounts: DemoAccounts, number: str, text: str) -> None:
    """An MO message as Kannel's sms-service calls the webhook."""
    query = {"from": number, "to": accounts.sms.sender, "text": text, "id": uuid.uuid4().hex,
             "ts": str(int(time.time())), "secret": accounts.sms.inbound_secret}  # fmt: skip
    outcome = kannel.handle_webhook(accounts.sms, "GET", query, {}, b"", remote_addr="127.0.0.1")
    await _publish(rt, outcome)


async def send_telegram(rt: Runtime, accounts: DemoAccounts, user_id: int, first: str, last: str,
                        text: str) -> None:  # fmt: skip
    """A Bot API Update, with the secret token header Telegram sends."""
    user = {
        "id": user_id,
        "is_bot": False,
        "first_name": first,
        "last_name": last,
        "language_code": "id",
    }
    update = {
        "update_id": random.randint(10_000_000, 99_999_999),
        "message": {"message_id": random.randint(1, 10_000_000), "from": user,
                    "chat": {"id": user_id, "first_name": first, "last_name": last, "type": "private"},
                    "date": int(time.time()), "text": text},
    }  # fmt: skip
    headers = {"x-telegram-bot-api-secret-token": accounts.telegram.secret_token}
    outcome = await telegram.handle_webhook(
        accounts.telegram, "POST", {}, headers, json.dumps(update).encode(), blobs=rt.blobs
    )
    await _publish(rt, outcome)


async def send_facebook(rt: Runtime, accounts: DemoAccounts, psid: str, text: str) -> None:
    """A Messenger page event batch, signed with the app secret like Facebook signs it."""
    now_ms = int(time.time() * 1000)
    batch = {"object": "page", "entry": [{"id": accounts.facebook.page_id, "time": now_ms, "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": accounts.facebook.page_id}, "timestamp": now_ms,
         "message": {"mid": f"mid.demo.{uuid.uuid4().hex}", "text": text}}]}]}  # fmt: skip
    body = json.dumps(batch).encode()
    signature = hmac.new(accounts.facebook.app_secret.encode(), body, hashlib.sha256).hexdigest()
    outcome = await facebook.handle_webhook(
        accounts.facebook,
        "POST",
        {},
        {"x-hub-signature-256": f"sha256={signature}"},
        body,
        blobs=rt.blobs,
    )
    await _publish(rt, outcome)


async def send_twitter(rt: Runtime, accounts: DemoAccounts, user_id: str, name: str, handle: str,
                       text: str) -> None:  # fmt: skip
    """An Account Activity direct message event, signed like X signs it."""
    me = accounts.twitter.user_id
    batch = {
        "for_user_id": me,
        "direct_message_events": [{
            "type": "message_create", "id": str(random.randint(10**17, 10**18)),
            "created_timestamp": str(int(time.time() * 1000)),
            "message_create": {"target": {"recipient_id": me}, "sender_id": user_id,
                               "message_data": {"text": text, "entities": {}}},
        }],
        "users": {user_id: {"id": user_id, "name": name, "screen_name": handle},
                  me: {"id": me, "name": "Loket Demo", "screen_name": "loket_demo"}},
    }  # fmt: skip
    body = json.dumps(batch).encode()
    digest = hmac.new(accounts.twitter.consumer_secret.encode(), body, hashlib.sha256).digest()
    headers = {"x-twitter-webhooks-signature": "sha256=" + base64.b64encode(digest).decode()}
    outcome = await twitter.handle_webhook(
        accounts.twitter, "POST", {}, headers, body, blobs=rt.blobs
    )
    await _publish(rt, outcome)


# --- calls ---------------------------------------------------------------------------------


async def log_calls(conn: asyncpg.Connection, rt: Runtime, agent_id: int) -> list[int]:
    """Phone calls as an agent logs them, left at each tier and status of the procedure."""
    ticket_ids = []
    for name, organization, phone, problem, outcome in CALLS:
        identity = procedure.identity_from_input("phone", phone)
        try:
            caller_id = await procedure.register_caller(
                conn, procedure.CallerFields(name=name, organization=organization), [identity],
                actor=DEMO_USER, agent_id=agent_id,
            )  # fmt: skip
        except IdentityTaken as exc:
            caller_id = exc.caller_id
        await conn.execute("UPDATE callers SET is_demo = true WHERE id = $1", caller_id)
        async with conn.transaction():
            ticket_id = await procedure.log_contact(
                conn, caller_id=caller_id, channel="phone", subject="", body=problem,
                actor=DEMO_USER, agent_id=agent_id, rules=rt.rules,
            )  # fmt: skip
            await conn.execute("UPDATE tickets SET is_demo = true WHERE id = $1", ticket_id)
            steps: list[tuple[str, dict[str, str]]] = {
                "open": [],
                "pend": [("pend", {"note": "menunggu dokumen dari pusat"})],
                "support": [("escalate", {"note": "perlu akses basis data Dapodik"})],
                "management": [("escalate", {}), ("escalate", {"note": "butuh keputusan pimpinan"})],
                "resolved": [("close", {"reason": "resolved",
                                        "solution": "Kata sandi Info GTK direset; penelepon sudah bisa masuk."})],
                "withdrawn": [("close", {"reason": "withdrawn"})],
            }[outcome]  # fmt: skip
            for action, fields in steps:
                await procedure.transition(
                    conn, ticket_id, action, actor=DEMO_USER, agent_id=agent_id, rules=rt.rules,
                    note=fields.get("note"), solution=fields.get("solution"), reason=fields.get("reason"),
                )  # fmt: skip
        ticket_ids.append(ticket_id)
    return ticket_ids


async def _mark_demo_callers(conn: asyncpg.Connection) -> None:
    """Callers the pipeline created for demo messages: demo too, unless they have real tickets."""
    await conn.execute(
        "UPDATE callers c SET is_demo = true WHERE NOT c.is_demo"
        " AND EXISTS (SELECT 1 FROM tickets t WHERE t.caller_id = c.id AND t.is_demo)"
        " AND NOT EXISTS (SELECT 1 FROM tickets t WHERE t.caller_id = c.id AND NOT t.is_demo)"
    )


# --- the demo ------------------------------------------------------------------------------


async def _first_burst(rt: Runtime, accounts: DemoAccounts) -> None:
    for name, address, subject, body, extra in EMAILS:
        await send_email(rt, name, address, subject, body, extra)
    for number, text in SMS:
        await send_sms(rt, accounts, number, text)
    for user_id, first, last, text in TELEGRAM:
        await send_telegram(rt, accounts, user_id, first, last, text)
    for psid, text in FACEBOOK:
        await send_facebook(rt, accounts, psid, text)
    for x_user_id, name, handle, text in TWITTER:
        await send_twitter(rt, accounts, x_user_id, name, handle, text)


async def _trickle(rt: Runtime, accounts: DemoAccounts) -> None:
    for i in range(TRICKLE_COUNT):
        await asyncio.sleep(TRICKLE_EVERY_SECONDS)
        channel, sender, text = TRICKLE[i % len(TRICKLE)]
        if channel == "sms":
            await send_sms(rt, accounts, sender, text)
        elif channel == "telegram":
            await send_telegram(rt, accounts, int(sender), "Warga", "Demo", text)
        elif channel == "facebook":
            await send_facebook(rt, accounts, sender, text)
        else:
            await send_email(rt, "Kepala Sekolah", sender, "Surat edaran libur semester", text)
        async with rt.pool.acquire() as conn:
            await _mark_demo_callers(conn)


async def run_demo(rt: Runtime) -> None:
    """Create the demo login, then send the sample traffic; a second run only renews the login."""
    try:
        password = secrets.token_urlsafe(12)
        async with rt.pool.acquire() as conn:
            agent_id = await agents.add_agent(
                conn, DEMO_USER, password, "admin", display_name="Demo"
            )
            already = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tickets WHERE is_demo)")
        host, port = rt.settings.host_port()
        print(f"demo: log in at http://{host}:{port}/login as {DEMO_USER!r} with password {password!r}",
              flush=True)  # fmt: skip
        if already:
            print(
                "demo: sample traffic is already in this database; not sending it again", flush=True
            )
            return
        accounts = DemoAccounts.create()
        async with rt.pool.acquire() as conn:
            calls = await log_calls(conn, rt, agent_id)
        await _first_burst(rt, accounts)
        print(f"demo: {len(calls)} phone calls logged; e-mail, SMS, Telegram, Facebook and X messages"
              " sent through their inbound paths", flush=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            async with rt.pool.acquire() as conn:
                channels = await conn.fetchval(
                    "SELECT count(DISTINCT channel) FROM tickets WHERE is_demo AND channel <> 'phone'"
                )
                await _mark_demo_callers(conn)
            if channels >= 5:
                break
            await asyncio.sleep(0.5)
        await _trickle(rt, accounts)
    except asyncio.CancelledError:
        raise
    except Exception:
        # The demo is an extra: its failure is logged and never takes the running system down.
        log.exception("demo traffic failed")
