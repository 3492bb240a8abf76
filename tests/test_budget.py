"""The size budget at the edge (pure, with a blob store on disk): cut text, originals kept, records small."""

from __future__ import annotations

from pathlib import Path

import pytest

from channels.blobs import DiskBlobStore
from channels.budget import (
    HTML_FILENAME,
    MAX_RAW_BYTES,
    TEXT_CUT_META,
    TEXT_FILENAME,
    cut_text,
    encoded_size,
    fit_raw,
)
from channels.types import MatchedInbound, RawInbound, encoder
from normalizer.canonical import canonicalize

# Kafka's default limit per record; what loket publishes must stay under it.
KAFKA_RECORD_LIMIT = 1024 * 1024


@pytest.fixture
def blobs(tmp_path: Path) -> DiskBlobStore:
    return DiskBlobStore(tmp_path / "blobs")


def raw_with(text: str, html: str | None = None, **fields: object) -> RawInbound:
    return RawInbound(
        channel="email",
        account="helpdesk",
        external_id="<big@example.org>",
        sender="warga@example.org",
        body_text=text,
        body_html=html,
        **fields,  # type: ignore[arg-type]
    )


def test_short_text_is_left_alone(blobs: DiskBlobStore) -> None:
    raw = raw_with("Selamat pagi, saya mau tanya status pengaduan saya")
    assert fit_raw(raw, blobs, 64_000) is False
    assert raw.body_text == "Selamat pagi, saya mau tanya status pengaduan saya"
    assert raw.attachments == [] and raw.problems == [] and TEXT_CUT_META not in raw.meta


def test_cut_text_falls_on_a_word_boundary_and_says_so() -> None:
    text = "kata " * 1000
    cut = cut_text(text, 1002)
    assert cut is not None
    head, notice = cut.split("\n\n")
    assert head == ("kata " * 200).rstrip()
    assert "the first 999 of 5,000 characters" in notice
    assert TEXT_FILENAME in notice
    assert cut_text("pendek", 10) is None


def test_long_text_is_cut_and_the_original_attached(blobs: DiskBlobStore) -> None:
    original = "Mohon bantuan. " * 40_000  # 600,000 characters
    raw = raw_with(original)
    assert fit_raw(raw, blobs, 64_000) is True
    assert len(raw.body_text) < 64_200
    assert raw.body_text.startswith("Mohon bantuan.")
    assert "[loket: message cut" in raw.body_text.splitlines()[-1]
    assert raw.meta[TEXT_CUT_META] == str(len(original))
    (attachment,) = raw.attachments
    assert attachment.filename == TEXT_FILENAME and attachment.size == len(original)
    assert blobs.get(attachment.sha256).decode() == original
    assert any("text cut" in p for p in raw.problems)


def test_fitting_twice_changes_nothing_more(blobs: DiskBlobStore) -> None:
    raw = raw_with("x" * 100_000)
    fit_raw(raw, blobs, 64_000)
    before = (raw.body_text, list(raw.attachments), list(raw.problems))
    fit_raw(raw, blobs, 64_000)
    assert (raw.body_text, raw.attachments, raw.problems) == before


def test_large_html_is_not_shown_but_attached(blobs: DiskBlobStore) -> None:
    html = "<p>" + "Laporan banjir di RT 05. " * 5_000 + "</p>"
    raw = raw_with("Laporan banjir di RT 05.", html)
    assert fit_raw(raw, blobs, 64_000) is True
    assert raw.body_html is None
    assert raw.body_text == "Laporan banjir di RT 05."
    (attachment,) = raw.attachments
    assert attachment.filename == HTML_FILENAME
    assert blobs.get(attachment.sha256).decode() == html


@pytest.mark.parametrize("char", ["a", "é", "😀", "\x01", '"', "\\"])
def test_a_maximal_message_stays_under_the_broker_limit_downstream(
    blobs: DiskBlobStore, char: str
) -> None:
    # Wide characters and characters JSON escapes make a 64,000-character text far more
    # than 64,000 bytes; the normalizer's record carries the text twice (raw and display).
    raw = raw_with(
        (char * 9 + " ") * 20_000,
        html=(char * 9 + " ") * 6_000,
        subject=char * 5_000,
        headers={"to": ", ".join(f"orang{i}@example.org" for i in range(3_000))},
    )
    fit_raw(raw, blobs, 64_000)
    assert encoded_size(raw) <= MAX_RAW_BYTES
    matched = MatchedInbound(message=canonicalize(raw), caller_id=1, match_reason="new caller")
    assert len(encoder.encode(matched)) < KAFKA_RECORD_LIMIT * 0.7
    assert any(a.filename == TEXT_FILENAME for a in raw.attachments)


def test_giant_headers_alone_are_cut_to_fit(blobs: DiskBlobStore) -> None:
    raw = raw_with("pendek", headers={f"x-h{i}": "v" * 5_000 for i in range(200)})
    assert encoded_size(raw) > MAX_RAW_BYTES
    assert fit_raw(raw, blobs, 64_000) is True
    assert encoded_size(raw) <= MAX_RAW_BYTES
    assert raw.body_text == "pendek"
    assert any("cut to" in p for p in raw.problems)
