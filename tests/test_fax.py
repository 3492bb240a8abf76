"""Fax: sender number extraction, OCR of generated faxes with Tesseract, and PDF replies."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
from pathlib import Path

import pytest

from channels import fax
from channels.fax import FaxAccount
from tests.support import faxgen

KEY_WORDS = ("Sekolah", "internet", "Senin", "bantuan", "teknisi")
PAGE2_WORDS = ("Jaringan", "laboratorium", "ujian")

needs_ocr = pytest.mark.skipif(
    shutil.which("tesseract") is None or shutil.which("pdftoppm") is None,
    reason="tesseract-ocr and poppler-utils are needed",
)


def make_account(**overrides: object) -> FaxAccount:
    config: dict[str, object] = {
        "name": "fax-main",
        "imap_host": "127.0.0.1",
        "imap_port": 143,
        "imap_user": "fax",
        "imap_password": "pw",
        "imap_tls": False,
        "imap_folder": "INBOX",
        "number_source": "subject",
        "number_pattern": "",
        "gateway_address": "{number}@fax.example.net",
        "smtp_host": "127.0.0.1",
        "smtp_port": 25,
        "smtp_user": "",
        "smtp_password": "",
        "smtp_tls": False,
    }
    config.update(overrides)
    return FaxAccount.from_config(config)


# --- sender number -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "number"),
    [
        ("Fax from +62 21 555 1234 (2 pages)", "+62 21 555 1234"),
        ("Faks masuk dari 021-5551234", "021-5551234"),
        ("Fax (021) 555.1234 received", "(021) 555.1234"),
        ("No number here, page 1", None),
    ],
)
def test_number_from_subject(subject: str, number: str | None) -> None:
    assert fax.fax_number({}, subject, make_account()) == number


def test_number_from_subject_with_pattern() -> None:
    account = make_account(number_pattern=r"CSID:\s*(\S+)")
    assert fax.fax_number({}, "Fax 3 pages CSID: +622155512 ", account) == "+622155512"


def test_number_from_sender_address() -> None:
    account = make_account(number_source="from")
    headers = {"From": "Fax Gateway <6221555123@fax.example.net>"}
    assert fax.fax_number(headers, "New fax", account) == "6221555123"
    assert fax.fax_number({"From": "noreply@fax.example.net"}, None, account) is None


def test_number_from_named_header() -> None:
    account = make_account(number_source="header:X-Fax-Caller-ID")
    headers = {"x-fax-caller-id": "+62 22 4201234", "From": "fax@example.net"}
    assert fax.fax_number(headers, "Fax", account) == "+62 22 4201234"
    assert fax.fax_number({"From": "x"}, "Fax from 0215551234", account) is None


def test_bad_number_source_is_refused_at_config() -> None:
    with pytest.raises(ValueError):
        make_account(number_source="body")
    with pytest.raises(ValueError):
        make_account(gateway_address="fax@example.net")


def test_gateway_recipient() -> None:
    assert fax.gateway_recipient(make_account(), "+6221555123") == "6221555123@fax.example.net"
    plus = make_account(gateway_address="fax+{e164}@relay.example.net")
    assert fax.gateway_recipient(plus, "+6221555123") == "fax++6221555123@relay.example.net"
    with pytest.raises(ValueError):
        fax.gateway_recipient(make_account(), "n/a")


# --- OCR -------------------------------------------------------------------------------------


def assert_recognized(result: fax.OcrResult, label: str) -> None:
    print(f"\nfax OCR ({label}): {result.pages} pages, {result.seconds_per_page:.2f} s/page")
    assert result.problems == ()
    assert result.pages == 2
    for word in KEY_WORDS:
        assert word in result.page_texts[0], (word, result.page_texts[0])
    for word in PAGE2_WORDS:
        assert word in result.page_texts[1], (word, result.page_texts[1])
    assert "Sekolah kami tidak bisa mengakses internet sejak Senin" in result.text


@needs_ocr
@pytest.mark.slow
def test_ocr_scanned_pdf() -> None:
    assert_recognized(fax.ocr_pages(faxgen.scanned_pdf(), "application/pdf"), "image PDF")


@needs_ocr
@pytest.mark.slow
def test_ocr_text_pdf() -> None:
    assert_recognized(fax.ocr_pages(faxgen.text_pdf(), "application/pdf"), "text PDF")


@needs_ocr
@pytest.mark.slow
def test_ocr_multipage_tiff() -> None:
    # Declared as octet-stream on purpose: the magic bytes decide.
    assert_recognized(fax.ocr_pages(faxgen.multipage_tiff(), "application/octet-stream"), "TIFF")


@needs_ocr
@pytest.mark.parametrize(
    ("data", "content_type", "problem"),
    [
        (
            b"%PDF-1.4\n%garbage that is not a PDF at all\n",
            "application/pdf",
            "PDF could not be read",
        ),
        (b"", "application/pdf", "PDF could not be read"),
        (b"II*\x00\x08\x00\x00\x00broken", "image/tiff", "TIFF could not be read"),
        (b"plain text, not an image", "text/plain", "image could not be read"),
    ],
)
def test_corrupt_file_gives_a_problem_not_an_exception(
    data: bytes, content_type: str, problem: str
) -> None:
    result = fax.ocr_pages(data, content_type)
    assert result.text == "" and result.pages == 0
    assert any(p.startswith(problem) for p in result.problems), result.problems


@needs_ocr
def test_truncated_pdf_gives_a_problem() -> None:
    data = faxgen.scanned_pdf()
    result = fax.ocr_pages(data[: len(data) // 3], "application/pdf")
    assert result.problems and result.text == ""


def test_missing_language_is_reported() -> None:
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract-ocr is needed")
    result = fax.ocr_pages(faxgen.multipage_tiff(), "image/tiff", languages=("xyz",))
    assert result.problems == ("OCR language data missing: xyz",)


# --- PDF replies ---------------------------------------------------------------------------


def test_render_reply_pdf_contains_the_reply() -> None:
    from pypdf import PdfReader

    reply = (
        "Yth. Bapak/Ibu,\n\nKoneksi internet sekolah Anda sudah dipulihkan oleh teknisi kami. "
        "Silakan hubungi kami kembali bila masih ada gangguan.\n\nSalam, Pusat Layanan ✓ €"
    )
    pdf = fax.render_reply_pdf(reply, ticket_id=1234, title="Balasan atas faks Anda")
    assert pdf.startswith(b"%PDF")
    reader = PdfReader(io.BytesIO(pdf))
    page = reader.pages[0]
    assert round(float(page.mediabox.width)) == 595 and round(float(page.mediabox.height)) == 842
    text = " ".join(" ".join(p.extract_text().split()) for p in reader.pages)
    for fragment in (
        "Balasan atas faks Anda",
        "Tiket #1234",
        "sudah dipulihkan",
        "Pusat Layanan ✓ €",
    ):
        assert fragment in text, (fragment, text)
    if shutil.which("pdftotext"):
        plain = subprocess.run(
            ["pdftotext", "-", "-"], input=pdf, capture_output=True, check=True
        ).stdout.decode()
        assert "Koneksi internet sekolah Anda" in " ".join(plain.split())


def test_long_reply_spans_pages() -> None:
    from pypdf import PdfReader

    reply = "\n".join(f"Baris {n}: keterangan lanjutan untuk tiket ini." for n in range(120))
    reader = PdfReader(io.BytesIO(fax.render_reply_pdf(reply, ticket_id=7, title="Balasan")))
    assert len(reader.pages) >= 3
    assert "Baris 119" in reader.pages[-1].extract_text()


@needs_ocr
@pytest.mark.slow
def test_recognized_pages_over_the_text_budget_are_cut_with_the_full_text_attached(
    tmp_path: Path,
) -> None:
    """The OCR stage adds text after the edge's budget was applied: it applies it again."""
    from types import SimpleNamespace

    from channels.blobs import DiskBlobStore
    from channels.budget import TEXT_CUT_META, TEXT_FILENAME
    from channels.types import AttachmentRef, RawInbound
    from workers.pipeline.wiring.fax import recognize
    from workers.runtime.settings import Settings

    line = "Laporan gangguan jaringan internet di sekolah sejak hari Senin pagi"
    pdf = faxgen.text_pdf(((line,) * 30,))  # one full page, about 2,000 characters
    blobs = DiskBlobStore(tmp_path / "blobs")
    page = AttachmentRef(filename="fax.pdf", content_type="application/pdf", size=len(pdf),
                         sha256=blobs.put(pdf))  # fmt: skip
    raw = RawInbound(channel="fax", account="fax-main", external_id="<f1@x>",
                     sender="+62215551234", body_text="Sampul", attachments=[page])  # fmt: skip
    rt = SimpleNamespace(blobs=blobs, settings=Settings(max_text_chars=1000))

    raw = asyncio.run(recognize(rt, raw, ("ind", "eng")))  # type: ignore[arg-type]

    assert int(raw.meta[TEXT_CUT_META]) > 1500, raw.meta
    assert "message cut" in raw.body_text and len(raw.body_text) < 1200
    original = next(a for a in raw.attachments if a.filename == TEXT_FILENAME)
    full = blobs.get(original.sha256).decode()
    assert full.startswith("Sampul") and full.count("jaringan") >= 25
    assert any(problem.startswith("text cut") for problem in raw.problems)
