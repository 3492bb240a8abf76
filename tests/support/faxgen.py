"""Test faxes: Indonesian text rendered as a text PDF, a scanned (image) PDF and a multi-page TIFF."""

from __future__ import annotations

import io
from pathlib import Path

from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

PAGES = (
    (
        "Kepada Yth. Pusat Layanan Kementerian",
        "Sekolah kami tidak bisa mengakses internet sejak Senin.",
        "Mohon bantuan teknisi secepatnya.",
        "Hormat kami, Kepala Sekolah SDN 3 Bandung",
    ),
    (
        "Lampiran: nomor pelanggan 1234567",
        "Jaringan sekolah terputus dan komputer laboratorium",
        "tidak dapat digunakan untuk ujian.",
    ),
)


def text_pdf(pages: tuple[tuple[str, ...], ...] = PAGES) -> bytes:
    """A PDF with real text (as sent by fax-to-email services that keep text)."""
    pdf = FPDF(format="A4")
    pdf.add_font("DejaVu", fname=str(FONT))
    pdf.set_font("DejaVu", size=14)
    for lines in pages:
        pdf.add_page()
        for line in lines:
            pdf.multi_cell(0, 10, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def page_images(pages: tuple[tuple[str, ...], ...] = PAGES, dpi: int = 200) -> list[Image.Image]:
    """Bilevel A4 page images, as a fax machine scans them."""
    width, height = int(8.27 * dpi), int(11.69 * dpi)
    font = ImageFont.truetype(str(FONT), size=int(dpi * 0.16))
    images = []
    for lines in pages:
        image = Image.new("L", (width, height), 255)
        draw = ImageDraw.Draw(image)
        y = dpi
        for line in lines:
            draw.text((dpi, y), line, font=font, fill=0)
            y += int(dpi * 0.35)
        images.append(image.convert("1"))
    return images


def scanned_pdf(pages: tuple[tuple[str, ...], ...] = PAGES) -> bytes:
    """A PDF whose pages are only images (no text layer), like most fax gateways send."""
    images = page_images(pages)
    out = io.BytesIO()
    images[0].save(out, format="PDF", save_all=True, append_images=images[1:], resolution=200)
    return out.getvalue()


def multipage_tiff(pages: tuple[tuple[str, ...], ...] = PAGES) -> bytes:
    """A multi-page CCITT Group 4 TIFF, the classic fax file format."""
    images = page_images(pages)
    out = io.BytesIO()
    images[0].save(
        out,
        format="TIFF",
        save_all=True,
        append_images=images[1:],
        compression="group4",
        dpi=(200, 200),
    )
    return out.getvalue()
