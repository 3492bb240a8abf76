"""MIME mail to `RawInbound` (tolerant of anything a mailbox can hold), and replies to MIME."""

from __future__ import annotations

import math
import mimetypes
import re
import time
import unicodedata
from datetime import UTC, datetime
from email import errors as email_errors
from email import policy
from email.header import decode_header, make_header
from email.headerregistry import Address, BaseHeader
from email.message import EmailMessage, Message
from email.parser import BytesParser, HeaderParser
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from html.parser import HTMLParser

import nh3

from channels import charsets
from channels.types import AttachmentRef, BlobStore, ChannelError, OutboundReply, RawInbound
from normalizer.threading import (
    make_message_id,
    make_reply_address,
    subject_token,
)

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


# --- headers --------------------------------------------------------------------------------


def _raw_headers(part: Message, problems: _Problems) -> dict[str, list[str]]:
    """Header name (lower case) → raw values, without the stdlib's lazy parsing."""
    found: dict[str, list[str]] = {}
    try:
        items = list(part.raw_items())
    except Exception as exc:  # a header block we cannot even list: keep the body
        problems.add(f"headers unreadable ({_describe(exc)})")
        return found
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str):
            continue
        found.setdefault(name.strip().lower(), []).append(value)
    return found


def _parse_header(
    name: str, raw: str, problems: _Problems, charset: str | None = None
) -> BaseHeader | None:
    """The policy's header object for a raw value (shortened first if absurdly long), or None."""
    value = _undo_surrogates(raw, charset)
    if len(value) > MAX_HEADER_CHARS:
        problems.add(f"{name} header of {len(value)} characters cut to {MAX_HEADER_CHARS}")
        value = value[:MAX_HEADER_CHARS]
    try:
        return policy.default.header_fetch_parse(name, value)
    except Exception as exc:  # stdlib header parser bugs; fall back to plain decoding
        problems.add(f"{name} header unparsable ({_describe(exc)})")
        return None


def _decode_plain(raw: str, problems: _Problems | None = None, charset: str | None = None) -> str:
    """RFC 2047 decoding without structure; labels decode as body text does (supersets, ...)."""
    value = " ".join(_undo_surrogates(raw, charset).split())
    try:
        chunks = decode_header(value)
        usable: list[tuple[bytes | str, str | None]] = []
        for chunk, charset in chunks:
            if isinstance(chunk, bytes) and charset not in (None, "unknown-8bit"):
                # Decode here, so an unknown charset costs one character's guess, not the header.
                text = _decode_text(chunk, charset, problems or _Problems())
                usable.append((text.encode("utf-8"), "utf-8"))
            else:
                usable.append((chunk, charset))
        return _undo_surrogates(str(make_header(usable)))
    except (email_errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return value


def _words_need_superset(raw: str) -> bool:
    """Whether an encoded word's label is unknown or narrower than what senders put under it."""
    return any(charsets.needs_superset(label) for label in _WORD_CHARSET_RE.findall(raw))


def _header_text(name: str, raw: str, problems: _Problems, charset: str | None = None) -> str:
    header = _parse_header(name, raw, problems, charset)
    if header is None:
        return _clean(_decode_plain(raw[:MAX_HEADER_CHARS], problems, charset))
    text = " ".join(str(header).split())
    if "=?" in raw and ("\ufffd" in text or _words_need_superset(raw)):
        # The policy decodes words by their label's strict table (replacing what it lacks);
        # decode them the tolerant way instead.
        found = _Problems()
        text = _decode_plain(raw[:MAX_HEADER_CHARS], found, charset)
        for problem in found.items:
            problems.add(f"{name} header: {problem}")
    return _clean(text)


def _addresses(
    name: str, raw: str, problems: _Problems, charset: str | None = None
) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address header."""
    header = _parse_header(name, raw, problems, charset)
    pairs: list[tuple[str, str]] = []
    if header is not None and hasattr(header, "addresses"):
        try:
            pairs = [(item.display_name, item.addr_spec) for item in header.addresses]
        except Exception as exc:  # malformed group syntax and similar
            problems.add(f"{name} header addresses unreadable ({_describe(exc)})")
    unknown_charset = _Problems()
    plain = _decode_plain(raw[:MAX_HEADER_CHARS], unknown_charset, charset)
    if (
        not any(_usable_address(address) for _, address in pairs)
        or unknown_charset.items
        or ("=?" in raw and _words_need_superset(raw))
    ):
        # The policy lost the display name (unknown charset) or found no usable address
        # (it reads "Maya <maya@example.com.>" as the address "Maya"): the lenient reading.
        pairs = getaddresses([plain]) + pairs
    return [(_clean(display), _clean(address).strip().strip("<>")) for display, address in pairs]


# --- content type, disposition, payload ---------------------------------------------------


class _PartInfo:
    """What we need to know about one MIME part, read once."""

    def __init__(self, part: Message, problems: _Problems):
        raw = _raw_headers(part, problems)
        self.content_type = "text/plain"
        self.params: dict[str, str] = {}
        self.disposition = ""
        self.filename: str | None = None
        ctype = self._first(raw, "content-type")
        if ctype is not None:
            header = _parse_header("content-type", ctype, problems)
            found = getattr(header, "content_type", "") if header is not None else ""
            if found and _TOKEN_RE.match(found):
                self.content_type = found
                self.params = self._params(header)
            else:
                problems.add(f"Content-Type {ctype[:80]!r} not understood; read as text/plain")
        elif part.get_default_type() == "message/rfc822":
            self.content_type = "message/rfc822"
        disposition = self._first(raw, "content-disposition")
        disposition_params: dict[str, str] = {}
        if disposition is not None:
            header = _parse_header("content-disposition", disposition, problems)
            if header is not None:
                self.disposition = (getattr(header, "content_disposition", "") or "").lower()
                disposition_params = self._params(header)
        filename = disposition_params.get("filename") or self.params.get("name")
        if filename:
            self.filename = _decode_plain(filename) if "=?" in filename else filename
        self.charset = (self.params.get("charset") or "").strip().strip("\"'").lower() or None
        self.maintype, _, self.subtype = self.content_type.partition("/")

    @staticmethod
    def _first(raw: dict[str, list[str]], name: str) -> str | None:
        values = raw.get(name)
        return values[0] if values else None

    @staticmethod
    def _params(header: BaseHeader | None) -> dict[str, str]:
        try:
            params = getattr(header, "params", None) or {}
            return {str(key).lower(): _clean(str(value)) for key, value in params.items()}
        except Exception:  # broken RFC 2231 continuations: no parameters then
            return {}


def _payload_bytes(part: Message, problems: _Problems) -> bytes:
    """The decoded body of a leaf part (or a message/* part serialized back to bytes)."""
    try:
        payload = part.get_payload()
        if isinstance(payload, list):
            chunks = []
            for inner in payload:
                if isinstance(inner, Message):
                    try:
                        chunks.append(inner.as_bytes(policy=policy.compat32))
                    except Exception:  # fall back to the lenient serializer
                        chunks.append(
                            inner.as_string(policy=policy.compat32).encode("utf-8", "replace")
                        )
            return b"\n".join(chunks)
        data = part.get_payload(decode=True)
        return data if isinstance(data, bytes) else b""
    except Exception as exc:  # transfer encoding garbage: keep nothing, say so
        problems.add(f"part body undecodable ({_describe(exc)})")
        return b""


def _decode_text(
    data: bytes, charset: str | None, problems: _Problems, hint: str | None = None
) -> str:
    """Bytes of a text part as str, tolerating missing, wrong and unknown charsets.

    `hint` is a charset the message declares elsewhere, tried for undeclared 8-bit text.
    """
    text, problem = charsets.decode(data, charset, hint)
    if problem:
        problems.add(problem)
    return _clean(text)


# --- HTML -------------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "ul", "ol", "table", "blockquote", "section", "article",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "hr", "header", "footer", "dd", "dt",
}  # fmt: skip
# Elements that start a new line but do not end a paragraph.
_LINE_TAGS = {"br", "li", "tr"}
_SANITIZE_DROPPED_CONTENT = {"script", "style", "title"}
_SKIPPED_TAGS = {"script", "style", "head", "title", "noscript", "template"}


class _TextRenderer(HTMLParser):
    """Renders HTML as plain text: block elements become line breaks, scripts and styles vanish."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS or tag in _LINE_TAGS:
            self.chunks.append("\n")
            if tag == "li":
                self.chunks.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.chunks.append(data)

    def text(self) -> str:
        lines = [" ".join(line.split()) for line in "".join(self.chunks).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """A plain-text rendering of an HTML body, for messages that have no text part."""
    renderer = _TextRenderer()
    try:
        renderer.feed(html)
        renderer.close()
    except (AssertionError, ValueError):
        # Very broken markup: let nh3 drop every tag instead.
        return " ".join(nh3.clean(html, tags=set()).split())
    return renderer.text()


def sanitize_html(html: str) -> str:
    """HTML safe to show an agent: nh3's defaults (no scripts, no event handlers)."""
    # nh3 keeps the text of <title> by default; in a mail body it is noise.
    return nh3.clean(html, clean_content_tags=_SANITIZE_DROPPED_CONTENT).strip()


# --- walking the MIME tree -------------------------------------------------------------------


class _Walk:
    """State collected while walking the MIME tree of one message."""

    def __init__(self, blobs: BlobStore, max_attachment_bytes: int, problems: _Problems):
        self.blobs = blobs
        self.max_attachment_bytes = max_attachment_bytes
        self.problems = problems
        self.parts = 0
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[AttachmentRef] = []
        self.is_report = False
        self.delivery_status: list[Message] = []
        self.delivery_status_text: str | None = None
        self.original_headers: Message | None = None
        self.depth_noted = False
        self.parts_noted = False
        self.charset_hint: str | None = None  # what the headers' encoded words declare
        self.declared_charsets: list[str] = []

    def defects(self, part: Message) -> None:
        for defect in getattr(part, "defects", ()):
            name = type(defect).__name__
            self.problems.add(_DEFECT_TEXT.get(name, f"{name}: {str(defect)[:120]}"))

    def visit(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            if not self.depth_noted:
                self.problems.add(
                    f"MIME nesting deeper than {MAX_DEPTH} levels; deeper parts skipped"
                )
                self.depth_noted = True
            return
        if self.parts >= MAX_PARTS:
            if not self.parts_noted:
                self.problems.add(f"more than {MAX_PARTS} MIME parts; the rest skipped")
                self.parts_noted = True
            return
        self.parts += 1
        self.defects(part)
        info = _PartInfo(part, self.problems)
        payload = part.get_payload()
        if info.maintype == "multipart":
            if (
                info.subtype == "report"
                and "delivery-status" in info.params.get("report-type", "").lower()
            ):
                self.is_report = True
            if isinstance(payload, list):
                for child in payload:
                    if isinstance(child, Message):
                        self.visit(child, depth + 1)
                return
            recovered = _recover_multipart(part, info, self.problems)
            if recovered is not None:
                self.visit(recovered, depth + 1)
                return
            # Nothing to split on: the content is shown as text rather than lost.
            self.leaf_text(_payload_bytes(part, self.problems), info, "plain")
            return
        if info.content_type == "message/delivery-status":
            self.read_delivery_status(part, payload)
            self.attach(part, info)
            return
        if (
            info.content_type in ("text/rfc822-headers", "message/rfc822")
            and self.original_headers is None
        ):
            self.read_original_headers(part, payload, info)
        if (
            info.maintype == "text"
            and info.subtype in ("plain", "html")
            and not (info.disposition == "attachment" or info.filename)
        ):
            self.leaf_text(_payload_bytes(part, self.problems), info, info.subtype)
            return
        self.attach(part, info)

    def leaf_text(self, data: bytes, info: _PartInfo, subtype: str) -> None:
        if info.charset and info.charset not in self.declared_charsets:
            self.declared_charsets.append(info.charset)
        text = _decode_text(data, info.charset, self.problems, self.charset_hint)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if b"\x00" in data:
            self.problems.add("NUL bytes removed from the text")
        if subtype == "html":
            if self.html is None:
                self.html = text
            else:
                self.html += "\n<hr>\n" + text
        elif self.text is None:
            self.text = text
        else:
            # Clients that put text around inline images send several text parts in a row.
            self.text += "\n" + text

    def attach(self, part: Message, info: _PartInfo) -> None:
        data = _payload_bytes(part, self.problems)
        filename = _safe_filename(info.filename, info.content_type)
        if len(data) > self.max_attachment_bytes:
            reason = f"too large: {len(data)} bytes > limit {self.max_attachment_bytes}"
            self.problems.add(f"attachment {filename} dropped: {reason}")
            self.attachments.append(
                AttachmentRef(filename, info.content_type, len(data), sha256="", dropped=reason)
            )
            return
        digest = self.blobs.put(data)
        self.attachments.append(
            AttachmentRef(filename, info.content_type, len(data), sha256=digest)
        )

    def read_delivery_status(self, part: Message, payload: object) -> None:
        if isinstance(payload, list) and payload:
            self.delivery_status = [block for block in payload if isinstance(block, Message)]
        else:
            self.delivery_status_text = _decode_text(
                _payload_bytes(part, self.problems), None, _Problems()
            )

    def read_original_headers(self, part: Message, payload: object, info: _PartInfo) -> None:
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            self.original_headers = payload[0]
            return
        text = _decode_text(_payload_bytes(part, self.problems), info.charset, _Problems())
        self.original_headers = HeaderParser(policy=policy.compat32).parsestr(
            text, headersonly=True
        )


def _recover_multipart(part: Message, info: _PartInfo, problems: _Problems) -> Message | None:
    """A multipart without a usable boundary, re-parsed with the boundary its body shows."""
    body = part.get_payload()
    if not isinstance(body, str):
        return None
    match = re.search(r"^--([^\s\"]{1,70}?)[ \t]*\r?$", body, re.MULTILINE)
    if match is None or body.count("--" + match.group(1)) < 2:
        return None
    boundary = match.group(1)
    problems.add(f"multipart boundary recovered from the body ({boundary!r})")
    head = f'Content-Type: {info.content_type}; boundary="{boundary}"\r\n\r\n'
    data = head.encode("ascii", "replace") + body.encode("utf-8", "surrogateescape")
    try:
        recovered = BytesParser(policy=policy.default).parsebytes(data)
    except (RecursionError, email_errors.MessageError):
        return None
    if not isinstance(recovered.get_payload(), list):
        return None
    return recovered


_DEFAULT_NAMES = {
    "message/rfc822": "message.eml",
    "text/rfc822-headers": "original-headers.txt",
    "message/delivery-status": "delivery-status.txt",
}


def _safe_filename(name: str | None, content_type: str) -> str:
    """A filename with no path, no control characters and a sensible length."""
    cleaned = _clean(name or "")
    cleaned = re.split(r"[/\\]", cleaned)[-1]
    cleaned = "".join(char for char in cleaned if not unicodedata.category(char).startswith("C"))
    cleaned = " ".join(cleaned.split()).strip(" .")
    if len(cleaned) > MAX_FILENAME_CHARS:
        stem, dot, extension = cleaned.rpartition(".")
        if dot and 0 < len(extension) <= 10:
            cleaned = stem[: MAX_FILENAME_CHARS - len(extension) - 1].rstrip() + "." + extension
        else:
            cleaned = cleaned[:MAX_FILENAME_CHARS]
    if not cleaned:
        cleaned = _DEFAULT_NAMES.get(content_type) or (
            "attachment" + (mimetypes.guess_extension(content_type) or ".bin")
        )
    return cleaned


# --- delivery status ---------------------------------------------------------------------------


def _dsn_field(block: Message, name: str) -> str:
    try:
        value = block.get(name)
    except Exception:  # a broken field reads as absent
        return ""
    if value is None:
        return ""
    return _clean(" ".join(_undo_surrogates(str(value)).split()))


def _dsn_blocks(walk: _Walk) -> list[Message]:
    if walk.delivery_status:
        return walk.delivery_status
    if walk.delivery_status_text:
        parser = HeaderParser(policy=policy.compat32)
        return [parser.parsestr(chunk) for chunk in re.split(r"\n\s*\n", walk.delivery_status_text)]
    return []


def _dsn_meta(walk: _Walk, problems: _Problems) -> dict[str, str]:
    """dsn_* meta of a delivery-status report: the first failed recipient (or the first one)."""
    meta: dict[str, str] = {}
    recipients = [block for block in _dsn_blocks(walk) if _dsn_field(block, "action")]
    if not recipients:
        problems.add("delivery-status report without recipient fields")
    else:
        failed = [
            block
            for block in recipients
            if _dsn_field(block, "action").lower().startswith("failed")
        ]
        chosen = (failed or recipients)[0]
        meta["dsn_action"] = _dsn_field(chosen, "action").lower()
        meta["dsn_status"] = _dsn_field(chosen, "status")
        diagnostic = _dsn_field(chosen, "diagnostic-code")
        # "smtp; 550 5.1.1 ..." → the text after the diagnostic type.
        meta["dsn_diagnostic"] = (
            diagnostic.split(";", 1)[1].strip() if ";" in diagnostic else diagnostic
        )
        recipient = _dsn_field(chosen, "final-recipient") or _dsn_field(
            chosen, "original-recipient"
        )
        meta["dsn_recipient"] = (
            recipient.split(";", 1)[1].strip() if ";" in recipient else recipient
        )
    if walk.original_headers is not None:
        message_id = _dsn_field(walk.original_headers, "message-id")
        if message_id:
            meta["dsn_original_message_id"] = message_id
    if "dsn_original_message_id" not in meta:
        problems.add("delivery-status report without the original Message-ID")
    return meta


# --- parse -----------------------------------------------------------------------------------


def _received_at(date: str | None, problems: _Problems) -> float:
    if date:
        try:
            parsed = parsedate_to_datetime(date)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            stamp = parsed.timestamp()
            if math.isfinite(stamp):
                return stamp
        except (TypeError, ValueError, OverflowError, IndexError):
            pass
        problems.add(f"Date header {date[:80]!r} unparsable; using the time of receipt")
    return time.time()


def _usable_address(address: str) -> str | None:
    """The address, lower-cased, if a reply can go to it; None for empty or malformed ones."""
    candidate = address.strip().strip("<>").strip()
    if candidate.lower().startswith("mailto:"):
        candidate = candidate[len("mailto:") :]
    candidate = candidate.lower()
    if len(candidate) > 254 or not _USABLE_ADDRESS_RE.match(candidate):
        return None
    if any(unicodedata.category(char).startswith("C") for char in candidate):
        return None
    return candidate


def _sender(
    raw_headers: dict[str, list[str]], problems: _Problems, charset: str | None = None
) -> tuple[str, str | None]:
    """Address and display name to answer: From, else Reply-To, Sender, Return-Path; never made up.

    An empty address means no header holds a usable one: the caller cannot be answered by mail.
    """
    from_name: str | None = None
    rooted: str | None = None  # "name@example.com.": the same address, written with the root dot
    for name in _SENDER_HEADERS:
        for raw in raw_headers.get(name, [])[:5]:
            pairs = _addresses(name, raw, problems, charset)[:20]
            for display, address in pairs:
                usable = _usable_address(address)
                if name == "from":
                    from_name = from_name or display.strip() or None
                    if usable is None and rooted is None and address.strip().endswith("."):
                        rooted = _usable_address(address.strip().rstrip("."))
                if usable:
                    if name != "from":
                        problems.add(f"no usable From address; sender taken from {name.title()}")
                    return usable, (display.strip() or from_name)
            if name == "from":
                plain = _clean(_decode_plain(raw[:MAX_HEADER_CHARS], None, charset)).strip()
                if plain and "@" not in plain and "<" not in plain:
                    # "From: Budi Santoso": a name where the address belongs.
                    from_name = plain.strip("\"' ") or from_name
                problems.add(f"From {plain[:80]!r} holds no usable address")
    if rooted:
        problems.add("sender taken from From without the trailing dot of its domain")
        return rooted, from_name
    problems.add(NO_REPLY_ADDRESS)
    problems.add("no sender address in From, Reply-To, Sender or Return-Path")
    return "", from_name


def _headers(
    raw_headers: dict[str, list[str]], problems: _Problems, charset: str | None = None
) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name in KEPT_HEADERS:
        values = raw_headers.get(name)
        if not values:
            continue
        if name in _JOINED_HEADERS:
            headers[name] = ", ".join(
                _header_text(name, value, problems, charset) for value in values[:20]
            )
        else:
            headers[name] = _header_text(name, values[0], problems, charset)
    return headers


# What the stdlib parser takes for a header line (a field name and a colon) and, stricter,
# what a header line surely is.
_LENIENT_FIELD_RE = re.compile(rb"^(?:From |[\x21-\x39\x3b-\x7e]*:)")
_FIELD_RE = re.compile(rb"^[A-Za-z][A-Za-z0-9-]{0,75}:")
_HEADER_REPAIR_LINES = 2000
_LEADING_JUNK_LINES = 5


def _header_lines(data: bytes) -> tuple[list[bytes], int]:
    """The header block's lines (with line ends, up to the blank line) and where they end."""
    lines: list[bytes] = []
    position = 0
    while position < len(data) and len(lines) < _HEADER_REPAIR_LINES:
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline + 1
        line = data[position:end]
        if not line.strip(b"\r\n"):
            break
        lines.append(line)
        position = end
    return lines, position


def _repair_header_block(data: bytes, problems: _Problems) -> bytes:
    """The mail with its header block readable: lines before the headers dropped, and header
    continuation lines that lost their indentation joined to their header again."""
    lines, end = _header_lines(data)
    if not lines or all(
        _LENIENT_FIELD_RE.match(line) or line[:1] in (b" ", b"\t") for line in lines
    ):
        return data
    start = 0
    if not _LENIENT_FIELD_RE.match(lines[0]):
        # "---- Original email message ----" above the headers: skip to the header block.
        for index in range(1, min(len(lines) - 1, _LEADING_JUNK_LINES + 1)):
            if _FIELD_RE.match(lines[index]) and (
                _FIELD_RE.match(lines[index + 1]) or lines[index + 1][:1] in (b" ", b"\t")
            ):
                start = index
                break
        if start:
            skipped = b" / ".join(line.strip() for line in lines[:start])
            problems.add(
                f"{start} line(s) before the header block skipped: "
                f"{skipped[:80].decode('utf-8', 'replace')!r}"
            )
    last_field = max(
        (index for index in range(start, len(lines)) if _FIELD_RE.match(lines[index])),
        default=-1,
    )
    repaired = lines[start:]
    joined = 0
    for index in range(start + 1, last_field):
        line = lines[index]
        if not _LENIENT_FIELD_RE.match(line) and line[:1] not in (b" ", b"\t"):
            # A header follows, so this is not the body: a folded line without its indentation.
            repaired[index - start] = b" " + line
            joined += 1
    if joined:
        problems.add(f"{joined} header continuation line(s) without indentation joined")
    if not start and not joined:
        return data
    return b"".join(repaired) + data[end:]


def _message_charset(raw_headers: dict[str, list[str]], declared: list[str]) -> str | None:
    """The legacy charset the message uses, for header bytes sent without RFC 2047."""
    for label in declared + _WORD_CHARSET_RE.findall(" ".join(_flat(raw_headers))):
        codec = charsets.codec_for(label)
        if codec and codec not in ("ascii", "utf-8"):
            superset = charsets.superset_of(codec)
            # 8-bit bytes in a mail labelled ISO-2022-JP are Shift_JIS (or EUC-JP).
            return "cp932" if superset == charsets.ISO2022JP_CP932 else superset
    raw_bytes = b" ".join(
        value.encode("utf-8", "surrogateescape")
        for value in _flat(raw_headers)
        if _SURROGATES_RE.search(value)
    )
    if not raw_bytes:
        return None
    try:
        raw_bytes.decode("utf-8")
        return None
    except UnicodeDecodeError:
        # All of a message's raw header bytes together tell detection more than one header.
        return charsets.detect(raw_bytes)


def _flat(raw_headers: dict[str, list[str]]) -> list[str]:
    return [value[:MAX_HEADER_CHARS] for values in raw_headers.values() for value in values[:20]]


def _parse_tree(data: bytes, problems: _Problems) -> tuple[Message, bool]:
    """The parsed message, and whether its body was parsed too (not only its headers)."""
    try:
        return BytesParser(policy=policy.default).parsebytes(data), True
    except RecursionError:
        problems.add("MIME structure nested too deeply to parse; only the headers were read")
    except Exception as exc:  # any other parser failure: read the headers at least
        problems.add(f"MIME structure unparsable ({_describe(exc)}); only the headers were read")
    try:
        return BytesParser(policy=policy.default).parsebytes(data, headersonly=True), False
    except Exception as exc:  # keep an empty message rather than nothing
        problems.add(f"headers unparsable ({_describe(exc)})")
        return EmailMessage(), False


def parse_email(
    data: bytes,
    *,
    account: str,
    external_id: str,
    blobs: BlobStore,
    max_attachment_bytes: int = 10 * 1024 * 1024,
    channel: str = "email",
) -> RawInbound:
    """A `RawInbound` for one message as it came from the mailbox; never raises on bad input.

    The original bytes go to `blobs` (digest in `meta["original_sha256"]`); what could not be
    read is listed in `problems`.
    """
    problems = _Problems()
    meta = {"original_sha256": blobs.put(data)}
    if b"\x00" in data:
        problems.add("message contains NUL bytes")
    try:
        message, body_parsed = _parse_tree(_repair_header_block(data, problems), problems)
        raw_headers = _raw_headers(message, problems)
        walk = _Walk(blobs, max_attachment_bytes, problems)
        walk.charset_hint = _message_charset(raw_headers, [])
        if body_parsed:
            walk.visit(message, 0)
        charset = _message_charset(raw_headers, walk.declared_charsets)
        headers = _headers(raw_headers, problems, charset)
        sender, sender_name = _sender(raw_headers, problems, charset)
        if not sender and channel == "email":
            meta["no_reply_address"] = "1"
        if walk.is_report:
            meta.update(_dsn_meta(walk, problems))
        body_html = sanitize_html(walk.html) if walk.html is not None else None
        body_text = walk.text
        if body_text is None or (not body_text.strip() and walk.html):
            body_text = html_to_text(walk.html) if walk.html is not None else ""
        subject = headers.get("subject")
        return RawInbound(
            channel=channel,
            account=account,
            external_id=external_id,
            sender=sender,
            sender_name=sender_name,
            received_at=_received_at(headers.get("date"), problems),
            subject=subject,
            body_text=body_text,
            body_html=body_html,
            headers=headers,
            attachments=walk.attachments,
            meta=meta,
            problems=problems.items,
        )
    except RecursionError:
        problems.add("message structure too deep to read")
    except Exception as exc:  # the original is stored; the agent sees why it is empty
        problems.add(f"message could not be read ({_describe(exc)})")
    return RawInbound(
        channel=channel,
        account=account,
        external_id=external_id,
        sender="",
        meta=meta,
        problems=problems.items,
    )


# --- compose ---------------------------------------------------------------------------------


def _one_line(value: str) -> str:
    return " ".join(value.replace("\x00", "").split())


def reply_subject(subject: str | None, ticket_id: int, *, replying: bool) -> str:
    """`Re: <subject> [#id]`: reply prefixes and the ticket token each appear once."""
    token = subject_token(ticket_id)
    core = _one_line(subject or "")
    while True:
        before = core
        core = _REPLY_PREFIX_RE.sub("", core).replace(token, " ")
        core = _one_line(core)
        if core == before:
            break
    parts = (["Re:"] if replying else []) + ([core] if core else []) + [token]
    return " ".join(parts)


def compose_reply(
    reply: OutboundReply, *, from_address: str, from_name: str | None = None
) -> EmailMessage:
    """The MIME message for an agent's reply, carrying our threading markers."""
    recipient = _one_line(reply.recipient)
    try:
        to = Address(addr_spec=recipient)
        sender = Address(display_name=_one_line(from_name or ""), addr_spec=_one_line(from_address))
    except (ValueError, IndexError, email_errors.HeaderParseError) as exc:
        raise ChannelError(f"bad address: {exc}", permanent=True) from exc
    if not to.domain or not sender.domain:
        raise ChannelError(f"bad address: {recipient!r} or {from_address!r}", permanent=True)
    in_reply_to = _one_line(reply.headers.get("in-reply-to", ""))
    references = _one_line(reply.headers.get("references", ""))
    if in_reply_to and in_reply_to not in references:
        references = f"{references} {in_reply_to}".strip()

    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = reply_subject(reply.subject, reply.ticket_id, replying=bool(in_reply_to))
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_message_id(reply.message_id, reply.ticket_id, sender.domain)
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
    if references:
        message["References"] = references
    message["Reply-To"] = make_reply_address(sender.addr_spec, reply.ticket_id)
    # Lets us recognise our own mail coming back through an autoresponder.
    message["X-Loop"] = sender.addr_spec
    body = reply.body_text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    message.set_content(body, charset="utf-8")
    return message


def reply_bytes(message: EmailMessage) -> bytes:
    """The wire form of a composed reply (CRLF line ends)."""
    return message.as_bytes(policy=policy.SMTP)
