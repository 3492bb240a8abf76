"""The size budget at the edge: over-long text is cut, and the full original kept as an attachment."""

from __future__ import annotations

import msgspec

from channels.types import AttachmentRef, BlobStore, RawInbound

# Characters of body text (and of sanitized HTML) a message keeps; LOKET_MAX_TEXT_CHARS.
DEFAULT_MAX_TEXT_CHARS = 64_000
# An encoded RawInbound stays under this many bytes. The normalizer's record carries the raw
# message plus its display text (up to the body again), and must stay well under Kafka's
# default limit of 1 MiB per record.
MAX_RAW_BYTES = 320 * 1024
# Limits for the small fields, applied only when a message is still over MAX_RAW_BYTES
# after its body was cut (thousands of recipients, a giant header).
_FIELD_CHARS = 2_000
_MAX_PROBLEMS = 50
_MIN_BODY_CHARS = 1_000
# Headers threading and loop detection read: kept when the others must go.
_THREADING_HEADERS = frozenset({
    "message-id", "in-reply-to", "references", "subject", "from", "to", "cc", "reply-to",
    "date", "auto-submitted", "precedence", "x-autoreply", "x-autorespond", "x-loop",
    "return-path", "content-type", "list-id",
})  # fmt: skip

TEXT_FILENAME = "original-text.txt"
HTML_FILENAME = "original.html"
# meta keys saying what was cut: the original's length in characters.
TEXT_CUT_META = "text_cut_from"
HTML_CUT_META = "html_cut_from"

_encoder = msgspec.json.Encoder()


def cut_notice(kept: int, total: int) -> str:
    """The line appended to a cut text, so the agent never mistakes it for the whole message."""
    return (
        f"[loket: message cut: the first {kept:,} of {total:,} characters are shown;"
        f" the full text is attached as {TEXT_FILENAME}]"
    )


def cut_text(text: str, max_chars: int) -> str | None:
    """`text` cut to at most `max_chars` characters plus a notice line, or None when it fits (pure).

    The cut falls on the last line break or space of the final few hundred characters, so a
    word is not split where that is possible.
    """
    if len(text) <= max_chars:
        return None
    head = text[:max_chars]
    boundary = max(head.rfind("\n"), head.rfind(" "))
    if boundary >= max_chars - 300 and boundary > 0:
        head = head[:boundary]
    return f"{head.rstrip()}\n\n{cut_notice(len(head), len(text))}"


def encoded_size(raw: RawInbound) -> int:
    """Bytes of `raw` as it travels on the raw topic."""
    return len(_encoder.encode(raw))


def fit_raw(
    raw: RawInbound,
    blobs: BlobStore,
    max_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_bytes: int = MAX_RAW_BYTES,
) -> bool:
    """Fit `raw` to the budget in place; True when something was cut.

    Body text over `max_chars` is cut with a notice line, and sanitized HTML over it is
    dropped (the text stays); each original goes to `blobs` as an attachment of the message,
    and `problems` says what happened. A message still over `max_bytes` (wide characters,
    giant headers) has its text cut further, then its small fields.
    """
    cut = False
    original = raw.body_text if TEXT_CUT_META not in raw.meta else None
    if raw.body_html is not None and len(raw.body_html) > max_chars:
        _drop_html(raw, blobs)
        cut = True
    if TEXT_CUT_META not in raw.meta and len(raw.body_text) > max_chars:
        _cut_body(raw, blobs, raw.body_text, max_chars)
        cut = True
    size = encoded_size(raw)
    if size <= max_bytes:
        return cut
    if raw.body_html is not None:
        _drop_html(raw, blobs)
        size = encoded_size(raw)
    if original is None:
        original = _original_text(raw, blobs)
    limit = min(len(raw.body_text), max_chars)
    while size > max_bytes and limit > _MIN_BODY_CHARS:
        # Shrink by the share the message is over, and a little more, until it fits.
        limit = max(_MIN_BODY_CHARS, int(limit * max_bytes / size * 0.9))
        _cut_body(raw, blobs, original, limit)
        size = encoded_size(raw)
    for chars in (_FIELD_CHARS, _FIELD_CHARS // 10):
        if size > max_bytes:
            _cut_small_fields(raw, chars)
            size = encoded_size(raw)
    if size > max_bytes:
        left_out = len(set(raw.headers) - _THREADING_HEADERS)
        raw.headers = {k: v for k, v in raw.headers.items() if k in _THREADING_HEADERS}
        raw.problems.append(f"{left_out} header(s) left out: too many to keep")
        size = encoded_size(raw)
    while size > max_bytes and raw.attachments:
        keep = len(raw.attachments) * max_bytes // size // 2
        dropped = len(raw.attachments) - keep
        raw.attachments = raw.attachments[:keep]
        raw.problems.append(f"{dropped} attachment reference(s) left out: too many to keep")
        size = encoded_size(raw)
    return True


def _original_text(raw: RawInbound, blobs: BlobStore) -> str:
    """The body text before any cut (from the blob store when it was cut already)."""
    if TEXT_CUT_META not in raw.meta:
        return raw.body_text
    for attachment in raw.attachments:
        if attachment.filename == TEXT_FILENAME and attachment.sha256:
            return blobs.get(attachment.sha256).decode("utf-8")
    return raw.body_text


def _cut_body(raw: RawInbound, blobs: BlobStore, original: str, max_chars: int) -> None:
    kept = cut_text(original, max_chars)
    if kept is None:
        return
    raw.body_text = kept
    if TEXT_CUT_META in raw.meta:
        return  # cut again, smaller: the original is attached and the problem said already
    data = original.encode("utf-8", "surrogatepass")
    raw.attachments.append(
        AttachmentRef(
            filename=TEXT_FILENAME,
            content_type="text/plain; charset=utf-8",
            size=len(data),
            sha256=blobs.put(data),
        )
    )
    raw.meta[TEXT_CUT_META] = str(len(original))
    raw.problems.append(
        f"text cut: {len(original):,} characters, over the limit of {max_chars:,};"
        f" the full text is attached as {TEXT_FILENAME}"
    )


def _drop_html(raw: RawInbound, blobs: BlobStore) -> None:
    html = raw.body_html or ""
    data = html.encode("utf-8", "surrogatepass")
    raw.attachments.append(
        AttachmentRef(
            filename=HTML_FILENAME,
            content_type="text/html; charset=utf-8",
            size=len(data),
            sha256=blobs.put(data),
        )
    )
    raw.body_html = None
    raw.meta[HTML_CUT_META] = str(len(html))
    # Cutting HTML could leave an open tag; the text version is shown instead.
    raw.problems.append(
        f"HTML part of {len(html):,} characters not shown (too large); it is attached as"
        f" {HTML_FILENAME}, the text version is shown"
    )


def _cut_small_fields(raw: RawInbound, chars: int) -> None:
    def short(value: str) -> str:
        return value if len(value) <= chars else value[:chars] + "…"

    raw.subject = short(raw.subject) if raw.subject is not None else None
    raw.sender_name = short(raw.sender_name) if raw.sender_name is not None else None
    raw.headers = {name[:200]: short(value) for name, value in raw.headers.items()}
    raw.meta = {name[:200]: short(value) for name, value in raw.meta.items()}
    problems = [p if p.startswith(("text cut", "HTML part")) else short(p) for p in raw.problems]
    problems = problems[:_MAX_PROBLEMS]
    raw.attachments = [
        msgspec.structs.replace(a, filename=a.filename[:255]) if len(a.filename) > 255 else a
        for a in raw.attachments
    ]
    problems.append(
        f"header values and other fields cut to {chars:,} characters: the message was too large"
    )
    raw.problems = problems
