"""Fax via a fax-to-email mailbox: sender number from the mail, OCR of the pages, PDF replies.

The mailbox itself is read like any e-mail account (`channels/email.py` parses the MIME);
this module works on the headers and the attachment bytes. Replies go out as a PDF
attached to a mail addressed to the gateway, e.g. `6221555123@fax.example.net`.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")  # Debian package fonts-dejavu-core
OCR_DPI = 300
MAX_PAGES = 50
PAGE_TIMEOUT = 120.0  # seconds for one page, rasterizing or recognizing

_SOURCE = re.compile(r"^(subject|from|header:[A-Za-z0-9-]+)$")
# Defaults when `number_pattern` is empty: a run of digits and separators, optionally
# after a '+', in a subject or header; the local part of the sender address for "from".
_DEFAULT_PATTERN = r"(\+?(?:\(\d+\)|\d)[\d .-]{4,}\d)"
_DEFAULT_FROM_PATTERN = r"(\+?\d{5,})@"


@dataclass(frozen=True)
class FaxAccount:
    """A `[[channels.fax]]` entry: the fax-to-email mailbox and the gateway replies go through."""

    name: str
    imap_host: str
    imap_user: str
    imap_password: str
    gateway_address: str
    smtp_host: str
    imap_port: int = 993
    imap_tls: bool = True
    imap_folder: str = "INBOX"
    number_source: str = "subject"
    number_pattern: str = ""
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_tls: bool = True

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> FaxAccount:
        """Build from a config table whose secrets are already resolved from the environment."""
        name = str(d["name"])
        source = str(d.get("number_source") or "subject")
        if not _SOURCE.match(source):
            raise ValueError(
                f"channels.fax {name!r}: number_source must be subject, from or header:NAME"
            )
        pattern = str(d.get("number_pattern") or "")
        if pattern:
            re.compile(pattern)  # a bad pattern fails at start-up, not per fax
        gateway = str(d["gateway_address"])
        if "{number}" not in gateway and "{e164}" not in gateway:
            raise ValueError(f"channels.fax {name!r}: gateway_address needs {{number}} or {{e164}}")
        return cls(
            name=name,
            imap_host=str(d["imap_host"]),
            imap_port=int(d.get("imap_port", 993)),
            imap_user=str(d["imap_user"]),
            imap_password=str(d["imap_password"]),
            imap_tls=bool(d.get("imap_tls", True)),
            imap_folder=str(d.get("imap_folder") or "INBOX"),
            number_source=source,
            number_pattern=pattern,
            gateway_address=gateway,
            smtp_host=str(d["smtp_host"]),
            smtp_port=int(d.get("smtp_port", 587)),
            smtp_user=str(d.get("smtp_user") or ""),
            smtp_password=str(d.get("smtp_password") or ""),
            smtp_tls=bool(d.get("smtp_tls", True)),
        )


def fax_number(
    raw_mail_headers: Mapping[str, str], subject: str | None, account: FaxAccount
) -> str | None:
    """The sending fax number, as the gateway wrote it (normalizer turns it into E.164).

    `number_source` says where to look; `number_pattern`'s first group (or whole match)
    is the number.
    """
    headers = {name.lower(): value for name, value in raw_mail_headers.items()}
    if account.number_source == "subject":
        value = subject if subject is not None else headers.get("subject")
        pattern = account.number_pattern or _DEFAULT_PATTERN
    elif account.number_source == "from":
        value = headers.get("from")
        pattern = account.number_pattern or _DEFAULT_FROM_PATTERN
    else:
        value = headers.get(account.number_source.split(":", 1)[1].lower())
        pattern = account.number_pattern or _DEFAULT_PATTERN
    if not value:
        return None
    match = re.search(pattern, value)
    if not match:
        return None
    number = match.group(1) if match.re.groups else match.group(0)
    return number.strip() or None


def gateway_recipient(account: FaxAccount, number: str) -> str:
    """The gateway address a fax to `number` is mailed to.

    `number` is expected in E.164 (`+6221555123`); `{number}` in `gateway_address` becomes
    its digits without '+' (`6221555123@fax.example.net`), `{e164}` keeps the '+'.
    """
    digits = re.sub(r"\D", "", number)
    if not digits:
        raise ValueError(f"no digits in fax number {number!r}")
    return account.gateway_address.replace("{number}", digits).replace("{e164}", f"+{digits}")


@dataclass(frozen=True)
class OcrResult:
    """Recognized text of a fax, page by page, and what went wrong on the way."""

    text: str
    pages: int
    seconds_per_page: float
    problems: tuple[str, ...] = ()
    page_texts: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def _installed_languages() -> frozenset[str]:
    done = subprocess.run(
        ["tesseract", "--list-langs"], capture_output=True, text=True, timeout=30, check=False
    )
    return frozenset(line.strip() for line in done.stdout.splitlines()[1:] if line.strip())


def _kind(data: bytes, content_type: str) -> str:
    """pdf, tiff or image, by magic bytes first and the declared type second."""
    if data.startswith(b"%PDF"):
        return "pdf"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared == "application/pdf":
        return "pdf"
    if declared in ("image/tiff", "image/tif"):
        return "tiff"
    return "image"


def _stderr_line(stderr: bytes | str | None) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def _pdf_pages(pdf: Path, out_dir: Path, problems: list[str]) -> list[Path]:
    try:
        info = subprocess.run(
            ["pdfinfo", str(pdf)], capture_output=True, timeout=PAGE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        problems.append("PDF could not be read: pdfinfo timed out")
        return []
    if info.returncode != 0:
        problems.append(f"PDF could not be read: {_stderr_line(info.stderr)}")
        return []
    match = re.search(rb"^Pages:\s+(\d+)", info.stdout, re.MULTILINE)
    total = int(match.group(1)) if match else 0
    if total == 0:
        problems.append("PDF could not be read: it has no pages")
        return []
    last = min(total, MAX_PAGES)
    if total > MAX_PAGES:
        problems.append(f"only the first {MAX_PAGES} of {total} pages were read")
    try:
        done = subprocess.run(
            ["pdftoppm", "-r", str(OCR_DPI), "-gray", "-png", "-f", "1", "-l", str(last),
             str(pdf), str(out_dir / "page")],
            capture_output=True,
            timeout=PAGE_TIMEOUT * last,
            check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        problems.append("PDF could not be rasterized: pdftoppm timed out")
        return []
    pages = sorted(out_dir.glob("page-*.png"))
    if done.returncode != 0 or not pages:
        problems.append(f"PDF could not be rasterized: {_stderr_line(done.stderr)}")
    return pages


def _image_pages(data: bytes, out_dir: Path, problems: list[str], what: str) -> list[Path]:
    # Pillow splits multi-page TIFFs (CCITT G3/G4 included) into one PNG per page.
    from PIL import Image, ImageSequence, UnidentifiedImageError

    pages: list[Path] = []
    try:
        # Pillow warns (rather than raises) about damaged metadata; keep those as problems.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Image.open(io.BytesIO(data)) as image:
                for number, frame in enumerate(ImageSequence.Iterator(image), start=1):
                    if number > MAX_PAGES:
                        problems.append(f"only the first {MAX_PAGES} pages were read")
                        break
                    path = out_dir / f"page-{number:03d}.png"
                    dpi = frame.info.get("dpi")
                    frame.copy().save(path, format="PNG", **({"dpi": dpi} if dpi else {}))
                    pages.append(path)
        problems.extend(f"{what}: {warning.message}" for warning in caught)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        problems.append(f"{what} could not be read: {exc}")
    return pages


def _recognize(page: Path, languages: str, dpi: int | None, problems: list[str]) -> str:
    argv = ["tesseract", str(page), "stdout", "-l", languages]
    if dpi:
        argv += ["--dpi", str(dpi)]
    # One OCR thread per process: several fax workers on few cores should not fight.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, timeout=PAGE_TIMEOUT, check=False, env=env)
    except subprocess.TimeoutExpired:
        problems.append(f"{page.stem}: OCR timed out after {PAGE_TIMEOUT:.0f} s")
        return ""
    if done.returncode != 0:
        problems.append(f"{page.stem}: OCR failed: {_stderr_line(done.stderr)}")
        return ""
    return done.stdout.decode("utf-8", errors="replace").strip()


def ocr_pages(
    data: bytes, content_type: str, *, languages: Sequence[str] = ("ind", "eng")
) -> OcrResult:
    """Run Tesseract on every page of a PDF, a (multi-page) TIFF or an image; never raises.

    PDF pages are rasterized with pdftoppm at 300 dpi. Unreadable input or a missing
    tool gives an empty text and a problem saying why.
    """
    started = time.monotonic()
    problems: list[str] = []
    if shutil.which("tesseract") is None:
        return OcrResult(
            text="",
            pages=0,
            seconds_per_page=0.0,
            problems=("OCR unavailable: tesseract is not installed",),
        )
    installed = _installed_languages()
    usable = [lang for lang in languages if lang in installed]
    missing = [lang for lang in languages if lang not in installed]
    if missing:
        problems.append(f"OCR language data missing: {', '.join(missing)}")
    if not usable:
        return OcrResult(text="", pages=0, seconds_per_page=0.0, problems=tuple(problems))
    kind = _kind(data, content_type)
    with tempfile.TemporaryDirectory(prefix="loket-ocr-") as tmp:
        work = Path(tmp)
        dpi: int | None = None
        if kind == "pdf":
            if shutil.which("pdftoppm") is None:
                problems.append("PDF could not be read: pdftoppm (poppler-utils) is not installed")
                pages: list[Path] = []
            else:
                source = work / "fax.pdf"
                source.write_bytes(data)
                pages = _pdf_pages(source, work, problems)
                dpi = OCR_DPI
        else:
            pages = _image_pages(data, work, problems, "TIFF" if kind == "tiff" else "image")
        page_texts = tuple(_recognize(page, "+".join(usable), dpi, problems) for page in pages)
    elapsed = time.monotonic() - started
    return OcrResult(
        text="\n\n".join(text for text in page_texts if text),
        pages=len(pages),
        seconds_per_page=elapsed / len(pages) if pages else 0.0,
        problems=tuple(problems),
        page_texts=page_texts,
    )


def render_reply_pdf(text: str, *, ticket_id: int, title: str) -> bytes:
    """An A4 PDF of an agent's reply, in DejaVu Sans so any Unicode text prints."""
    from fpdf import FPDF

    class ReplyPdf(FPDF):
        def footer(self) -> None:
            self.set_y(-15)
            self.set_font("DejaVu", size=8)
            self.cell(0, 10, f"Tiket #{ticket_id} - halaman {self.page_no()}/{{nb}}", align="C")

    pdf = ReplyPdf(format="A4")
    pdf.add_font("DejaVu", fname=str(FONT_DIR / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", style="B", fname=str(FONT_DIR / "DejaVuSans-Bold.ttf"))
    pdf.set_title(title)
    pdf.set_creator("loket")
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.add_page()
    pdf.set_font("DejaVu", style="B", size=16)
    pdf.multi_cell(0, 9, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", size=10)
    today = datetime.date.today().strftime("%d-%m-%Y")
    pdf.cell(0, 7, f"Tiket #{ticket_id} - {today}", new_x="LMARGIN", new_y="NEXT")
    pdf.line(pdf.l_margin, pdf.get_y() + 2, pdf.w - pdf.r_margin, pdf.get_y() + 2)
    pdf.ln(6)
    pdf.set_font("DejaVu", size=12)
    pdf.multi_cell(0, 7, text.replace("\r\n", "\n"), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
