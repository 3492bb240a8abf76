"""Mail as real mailboxes hold it: wrong or missing charsets, broken header blocks, odd senders."""

from __future__ import annotations

import html
import re
import uuid
from pathlib import Path

import httpx
import pytest

from channels import charsets
from channels.blobs import DiskBlobStore
from channels.email import NO_REPLY_ADDRESS, parse_email
from channels.email.base import _Problems
from channels.email.headers import _repair_header_block
from channels.types import RawInbound
from normalizer.canonical import canonicalize
from tests.support import db
from tests.support.dovecot import DovecotServer
from tests.support.stack import LoketStack, wait_until

REALWORLD = Path(__file__).parent / "fixtures" / "mail_realworld"
CORPUS = Path(__file__).parent / "fixtures" / "mail"

# fixture: (sender, sender_name, subject, body_text); an empty sender means "no reply address".
EXPECTED: dict[str, tuple[str, str | None, str, str]] = {
    # charsets declared too narrowly: decoded by the label's common superset
    "gb2312_label_gbk_text.eml": (
        "wang.rongji@mail.example.cn", "王镕喆", "关于护照办理的咨询（王镕喆）",
        "您好，我叫王镕喆，想咨询一下护照办理的进度。啰嗦了，谢谢！\n",
    ),
    "iso2022jp_cp50221_symbols.eml": (
        "sato@example.co.jp", "㈱佐藤", "申請書①の件",
        "①申請書と②写真を送ります。ｶﾀｶﾅもOKです。\n",
    ),
    "shift_jis_label_cp932_text.eml": (
        "takahashi@example.co.jp", "髙橋", "書類Ⅲの件", "①と②の書類を﨑山さんに送りました。\n",
    ),
    "ks_c_5601_cp949_text.eml": (
        "kim@example.kr", "김똠", "똠방각하 문의", "안녕하세요. 뷁 똠 문의드립니다.\n",
    ),
    "big5_label_hkscs_text.eml": (
        "chan@example.hk", None, "申請咗未", "我嘅申請已經交咗，請問幾時有結果？\n",
    ),
    "latin1_label_cp1252_text.eml": (
        "jose@example.es", "José Muñoz", "“Cita” – información",
        "La tasa es de 20€ – “sin recargo”, ¿verdad?\n",
    ),
    # charsets declared wrongly or not at all
    "iso2022jp_label_sjis_body.eml": (
        "yamada@example.co.jp", "山田太郎", "ビザ申請について",
        "お世話になっております。①の書類と㈱山田商事の証明書を添付します。髙橋\n",
    ),
    "iso2022jp_undeclared.eml": (
        "suzuki@example.co.jp", None, "パスポートの更新", "更新の手続きを教えてください。\n鈴木\n",
    ),
    "undeclared_gbk_body.eml": (
        "zhang.wei@example.cn", None, "护照咨询",
        "您好，我想咨询一下护照办理的进度，已经等了三个星期了。谢谢！\n",
    ),
    "ascii_label_big5_body.eml": (
        "lin@example.tw", None, "Visa question",
        "您好，請問護照辦理進度如何？我已經等了三個星期。謝謝！\n",
    ),
    # raw 8-bit header bytes without RFC 2047
    "raw_8bit_headers_gbk.eml": (
        "li.rong@example.cn", "李镕", "签证申请材料清单", "请问签证申请需要哪些材料？\n",
    ),
    "raw_8bit_headers_cp1252.eml": (
        "francois@example.fr", "François Müller", "Résumé – “urgent”",
        "Bonjour, le résumé coûte 5€ – merci.\n",
    ),
    "raw_8bit_headers_utf8.eml": (
        "dewi@example.id", "Dewi Śartika", "Layanan antrean – tidak bisa 🙏",
        "Sudah tiga kali mencoba – gagal terus. Mohon bantuannya 🙏\n",
    ),
    # broken header blocks
    "unindented_continuation.eml": (
        "rudi.hartono@example.id", "Rudi Hartono",
        "Permohonan informasi tentang pembuatan paspor baru untuk anak di bawah umur",
        "Syarat apa saja yang dibutuhkan untuk paspor anak?\n",
    ),
    "leading_non_header_line.eml": (
        "sri.wahyuni@example.id", "Sri Wahyuni", "Legalisir akta kelahiran",
        "Berapa lama proses legalisir akta kelahiran?\n",
    ),
    # senders: From unusable, fallbacks, no address at all
    "from_empty_angle_reply_to.eml": (
        "agus.salim@example.id", "Agus Salim", "Pengaduan jalan rusak",
        "Jalan di depan rumah kami rusak parah.\n",
    ),
    "from_trailing_dot_sender.eml": (
        "maya.sekretariat@example.com", "Maya", "Jadwal wawancara",
        "Kapan jadwal wawancara saya?\n",
    ),
    "from_display_name_only.eml": (
        "budi.prasetyo@example.id", "Budi Prasetyo", "Status permohonan KTP",
        "Bagaimana status permohonan KTP saya?\n",
    ),
    "from_missing_reply_to.eml": (
        "lina@example.id", None, "Pertanyaan biaya", "Berapa biaya pembuatan SIM?\n",
    ),
    "no_reply_address.eml": (
        "", "Pelapor Anonim", "Laporan pungutan liar", "Ada pungutan liar di loket pelayanan.\n",
    ),
    "from_address_in_display_name.eml": (
        "", "andi@example.id", "Permintaan data", "Mohon kirimkan data yang saya minta.\n",
    ),
}  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    return DiskBlobStore(tmp_path / "blobs")


def parse(name: str, store: DiskBlobStore) -> RawInbound:
    data = (REALWORLD / name).read_bytes()
    return parse_email(data, account="helpdesk", external_id=name, blobs=store)


def test_every_fixture_has_its_expectation() -> None:
    assert sorted(path.name for path in REALWORLD.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sender_subject_and_body_exactly(name: str, store: DiskBlobStore) -> None:
    sender, sender_name, subject, body = EXPECTED[name]
    raw = parse(name, store)
    assert (raw.sender, raw.sender_name, raw.subject, raw.body_text) == (
        sender, sender_name, subject, body,
    )  # fmt: skip
    # The mail as it came is kept, byte for byte, whatever was repaired to read it.
    assert store.get(raw.meta["original_sha256"]) == (REALWORLD / name).read_bytes()
    flagged = raw.meta.get("no_reply_address") == "1"
    assert flagged == (not sender)
    assert (NO_REPLY_ADDRESS in raw.problems) == (not sender)
    for text in [raw.body_text, raw.subject or "", *raw.headers.values(), *raw.problems]:
        assert "\ufffd" not in text and "\x1b" not in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_identity_is_the_sender_or_none_never_made_up(name: str, store: DiskBlobStore) -> None:
    sender = EXPECTED[name][0]
    message = canonicalize(parse(name, store))
    if sender:
        assert message.identity is not None and message.identity.value == sender
    else:
        assert message.identity is None


def test_problems_say_what_was_wrong(store: DiskBlobStore) -> None:
    assert "declared charset iso-2022-jp does not fit the text; decoded as Shift_JIS (cp932)" in (
        parse("iso2022jp_label_sjis_body.eml", store).problems
    )
    assert "no charset declared; ISO-2022-JP escape sequences decoded" in (
        parse("iso2022jp_undeclared.eml", store).problems
    )
    assert "declared charset us-ascii does not fit the text; decoded as Big5-HKSCS (detected)" in (
        parse("ascii_label_big5_body.eml", store).problems
    )
    assert "no usable From address; sender taken from Reply-To" in (
        parse("from_empty_angle_reply_to.eml", store).problems
    )
    assert "2 header continuation line(s) without indentation joined" in (
        parse("unindented_continuation.eml", store).problems
    )
    # Superset decoding is the normal reading of these labels, not a problem.
    assert parse("gb2312_label_gbk_text.eml", store).problems == []


def test_the_fields_around_a_repaired_header_stay_whole(store: DiskBlobStore) -> None:
    raw = parse("unindented_continuation.eml", store)
    assert raw.headers["to"] == "helpdesk@helpdesk.example.org, arsip@helpdesk.example.org"
    assert raw.headers["message-id"] == "<unindented-0621@example.id>"
    skipped = parse("leading_non_header_line.eml", store)
    assert skipped.headers["message-id"] == "<leading-line-0622@example.id>"
    assert "Original email message" not in skipped.body_text


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda path: path.name)
def test_well_formed_header_blocks_are_left_alone(path: Path) -> None:
    data = path.read_bytes()
    assert _repair_header_block(data, _Problems()) is data


def test_mail_without_a_blank_line_after_its_headers_keeps_its_body(store: DiskBlobStore) -> None:
    data = b"From: a@example.org\r\nSubject: halo\r\nini badan pesan\r\nbaris kedua\r\n"
    raw = parse_email(data, account="helpdesk", external_id="nosep", blobs=store)
    assert raw.sender == "a@example.org" and raw.subject == "halo"
    assert raw.body_text == "ini badan pesan\nbaris kedua\n"


def test_trailing_dot_is_dropped_only_when_nothing_else_answers(store: DiskBlobStore) -> None:
    data = b"From: Maya <Maya@Example.com.>\r\nSubject: x\r\n\r\nisi\r\n"
    raw = parse_email(data, account="helpdesk", external_id="dot", blobs=store)
    assert (raw.sender, raw.sender_name) == ("maya@example.com", "Maya")
    assert "no_reply_address" not in raw.meta


def test_fax_mail_without_sender_is_not_flagged_for_e_mail_replies(store: DiskBlobStore) -> None:
    data = b"Subject: Fax from +62215550100\r\n\r\nhalaman 1\r\n"
    raw = parse_email(data, account="fax", external_id="fax", blobs=store, channel="fax")
    assert raw.sender == "" and "no_reply_address" not in raw.meta


# --- the charset decisions on their own ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "label", "text"),
    [
        ("镕".encode("gbk"), "gb2312", "镕"),
        ("𠮷".encode("gb18030"), "gbk", "𠮷"),
        ("①".encode("cp932"), "shift_jis", "①"),
        ("똠".encode("cp949"), "euc-kr", "똠"),
        ("嘅".encode("big5hkscs"), "big5", "嘅"),
        (b"\x93ok\x94 \x80", "iso-8859-1", "“ok” €"),
        (b"\x93ok\x94", "us-ascii", "“ok”"),
        ("café".encode(), "iso-8859-1", "café"),  # UTF-8 under a Latin label
        (b"\x1b$B-!\x1b(B", "iso-2022-jp", "①"),  # NEC row 13 in ISO-2022-JP (CP50221)
        (b"\x1b(I6@6E\x1b(B", "iso-2022-jp", "ｶﾀｶﾅ"),  # JIS X 0201 katakana
        ("ﾃｽﾄ".encode("cp932"), None, "ﾃｽﾄ"),
        ("Здравствуйте, у меня вопрос о паспорте.".encode("cp1251"), None,
         "Здравствуйте, у меня вопрос о паспорте."),
        (b"caf\xe9", "x-unknown-8859", "café"),
    ],
)  # fmt: skip
def test_decode(data: bytes, label: str | None, text: str) -> None:
    assert charsets.decode(data, label)[0] == text


def test_latin_text_is_never_taken_for_another_script() -> None:
    # Detection alone reads these as windows-1250 or Cyrillic.
    for data in [b"Apakah loket buka hari Sabtu? Saya bekerja di caf\xe9.", b"Jos\xe9 Garc\xeda"]:
        assert charsets.decode(data, None)[0] == data.decode("cp1252")


def test_jis_to_shift_jis_matches_the_codecs() -> None:
    text = "あいうえお漢字カタカナ、。「」ー〜"
    assert charsets.decode_iso2022jp_cp932(text.encode("iso2022_jp")) == text.replace("〜", "～")


# --- end to end: Dovecot in, a running loket, the ticket as the agent sees it ------------------

E2E_FIXTURES = [
    "gb2312_label_gbk_text.eml",
    "iso2022jp_label_sjis_body.eml",
    "raw_8bit_headers_gbk.eml",
    "unindented_continuation.eml",
    "leading_non_header_line.eml",
    "from_empty_angle_reply_to.eml",
    "no_reply_address.eml",
]


def _message_id(name: str) -> str:
    found = re.search(rb"^Message-ID: (<[^>]+>)", (REALWORLD / name).read_bytes(), re.MULTILINE)
    assert found is not None
    return found.group(1).decode()


def _console(stack: LoketStack) -> httpx.Client:
    """A console session (cookie login through the form), as an agent's browser has."""
    username = f"agent-{uuid.uuid4().hex[:8]}"
    password = stack.add_agent(username)
    client = httpx.Client(base_url=stack.url, timeout=30)
    client.get("/login")
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf": client.cookies["loket_csrf"]},
    )
    assert response.status_code in (302, 303), response.text
    return client


@pytest.mark.slow
def test_real_world_mails_through_dovecot_become_readable_tickets(
    stack: LoketStack, dovecot: DovecotServer, pg_url: str
) -> None:
    dovecot.append_many("helpdesk", [(REALWORLD / name).read_bytes() for name in E2E_FIXTURES])

    def stored() -> dict[str, dict] | None:
        rows = db.fetch(
            pg_url,
            "SELECT id, ticket_id, sender, subject, body_text, headers->>'message-id' AS mid"
            " FROM messages WHERE direction = 'in' AND headers->>'message-id' = ANY($1::text[])",
            [_message_id(name) for name in E2E_FIXTURES],
        )
        return {row["mid"]: row for row in rows} if len(rows) == len(E2E_FIXTURES) else None

    rows = wait_until(stored, timeout=60, what="the real-world mails stored")
    agent = stack.client()
    console = _console(stack)
    for name in E2E_FIXTURES:
        sender, _, subject, body = EXPECTED[name]
        row = rows[_message_id(name)]
        assert (row["sender"], row["subject"], row["body_text"]) == (sender, subject, body), name
        ticket = agent.get(f"/api/tickets/{row['ticket_id']}").json()
        assert ticket["subject"] == subject, name
        [message] = [m for m in ticket["messages"] if m["id"] == row["id"]]
        assert message["body_text"] == body and message["sender"] == sender, name
        assert (NO_REPLY_ADDRESS in message["problems"]) == (not sender), name
        page = console.get(f"/tickets/{row['ticket_id']}")
        assert page.status_code == 200, name
        assert ('id="no-reply-address"' in page.text) == (not sender), name
        if not sender:  # nowhere to send an answer: the agent is told, nothing is queued
            refused = agent.post(f"/api/tickets/{row['ticket_id']}/replies", json={"body": "Baik."})
            assert refused.status_code == 422 and "no reply address" in refused.text, refused.text
            assert not db.fetchval(
                pg_url, "SELECT count(*) FROM messages WHERE ticket_id = $1 AND direction = 'out'",
                row["ticket_id"],
            )  # fmt: skip
        assert html.escape(subject, quote=False) in page.text, name
    console.close()
