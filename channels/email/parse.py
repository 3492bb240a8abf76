"""A mail's bytes to `RawInbound`: sender, times, headers, text, attachments, problems."""

from __future__ import annotations

import math
import time
from datetime import UTC
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

from channels.email.base import (
    _JOINED_HEADERS,
    _SENDER_HEADERS,
    KEPT_HEADERS,
    MAX_HEADER_CHARS,
    NO_REPLY_ADDRESS,
    _clean,
    _describe,
    _Problems,
)
from channels.email.headers import (
    _addresses,
    _decode_plain,
    _header_text,
    _message_charset,
    _raw_headers,
    _repair_header_block,
    _usable_address,
)
from channels.email.html import html_to_text, sanitize_html
from channels.email.mime import _dsn_meta, _Walk
from channels.types import BlobStore, RawInbound

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
