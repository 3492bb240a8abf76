"""The MIME tree: content types, payloads, parts and attachments, delivery status notifications."""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from email import errors as email_errors
from email import policy
from email.headerregistry import BaseHeader
from email.message import Message
from email.parser import BytesParser, HeaderParser

from channels.email.base import (
    _DEFECT_TEXT,
    _TOKEN_RE,
    MAX_DEPTH,
    MAX_FILENAME_CHARS,
    MAX_PARTS,
    _clean,
    _describe,
    _Problems,
    _undo_surrogates,
)
from channels.email.headers import _decode_plain, _decode_text, _parse_header, _raw_headers
from channels.types import AttachmentRef, BlobStore

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
