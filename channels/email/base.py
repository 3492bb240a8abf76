"""Limits, the headers kept, and the problems a parse notes on the message."""

from __future__ import annotations

import re

from channels import charsets

MAX_DEPTH = 20
MAX_PARTS = 500
MAX_PROBLEMS = 50
# Structured header parsing in the stdlib is superlinear in the value's length.
MAX_HEADER_CHARS = 16 * 1024
MAX_FILENAME_CHARS = 150

KEPT_HEADERS = (
    "message-id",
    "in-reply-to",
    "references",
    "from",
    "sender",
    "to",
    "cc",
    "delivered-to",
    "x-original-to",
    "reply-to",
    "date",
    "subject",
    "auto-submitted",
    "precedence",
    "x-autoreply",
    "x-autorespond",
    "x-auto-response-suppress",
    "x-loop",
    "list-id",
    "list-unsubscribe",
    "return-path",
    "content-type",
)
# Headers that may legitimately appear more than once and are all worth keeping.
_JOINED_HEADERS = {"to", "cc", "delivered-to", "x-original-to"}
# Where a reply can go, in order of preference.
_SENDER_HEADERS = ("from", "reply-to", "sender", "return-path")
# The problem that flags a message nobody can answer by mail (meta "no_reply_address" too).
NO_REPLY_ADDRESS = "no reply address"

_DEFECT_TEXT = {
    "StartBoundaryNotFoundDefect": "MIME start boundary not found",
    "CloseBoundaryNotFoundDefect": "MIME closing boundary missing; the last part runs to the end",
    "NoBoundaryInMultipartDefect": "multipart without boundary parameter",
    "MultipartInvariantViolationDefect": "multipart content without parts",
    "FirstHeaderLineIsContinuationDefect": "first header line is a continuation line",
    "MissingHeaderBodySeparatorDefect": "header block not ended by a blank line",
    "MisplacedEnvelopeHeaderDefect": "mbox 'From ' line inside the headers",
    "InvalidBase64PaddingDefect": "base64 with bad padding",
    "InvalidBase64CharactersDefect": "base64 with invalid characters",
    "InvalidBase64LengthDefect": "base64 of impossible length",
    "InvalidMultipartContentTransferEncodingDefect": "multipart with a transfer encoding other than 7bit/8bit/binary",
    "UndecodableBytesDefect": "undecodable bytes in a header",
    "NonASCIILocalPartDefect": "non-ASCII local part in an address",
    "InvalidDateDefect": "invalid Date header",
    "InvalidHeaderDefect": "invalid header",
    "HeaderMissingRequiredValue": "header without a required value",
    "ObsoleteHeaderDefect": "obsolete header syntax",
    "NonPrintableDefect": "non-printable characters in a header",
}

_USABLE_ADDRESS_RE = re.compile(
    r"^[^\s@<>()\[\],;:\"\\]{1,64}@(?:[^\s@<>()\[\],;:\"\\.]+\.)+[^\s@<>()\[\],;:\"\\.]{2,}$"
)
_TOKEN_RE = re.compile(r"^[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,128}$")
_SURROGATES_RE = re.compile("[\udc80-\udcff]+")
_WORD_CHARSET_RE = re.compile(r"=\?([^?*\s]{1,40})(?:\*[^?]*)?\?[bBqQ]\?")
_REPLY_PREFIX_RE = re.compile(
    r"^\s*(?:re|aw|sv|antw|balas|bls)\s*(?:\[\d+\])?\s*:\s*", re.IGNORECASE
)


class _Problems:
    """Problems met while parsing, deduplicated and bounded."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text in self.items:
            return
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(text)
        elif len(self.items) == MAX_PROBLEMS:
            self.items.append("more problems not listed")


def _clean(text: str) -> str:
    """A string safe to store: no NUL, no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


def _undo_surrogates(text: str, charset: str | None = None) -> str:
    """Header text sent without RFC 2047: raw 8-bit bytes (kept as surrogate escapes) or
    ISO-2022-JP escapes, decoded as UTF-8, else as `charset` (what the message declares
    elsewhere), else as detected, else as windows-1252."""
    if _SURROGATES_RE.search(text):
        data = text.encode("utf-8", "surrogateescape")
    elif "\x1b$" in text and text.isascii():
        data = text.encode("ascii")
    else:
        return text
    decoded, _ = charsets.decode(data, None, hint=charset)
    return decoded


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__
