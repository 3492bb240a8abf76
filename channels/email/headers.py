"""Header fields: decoding by the declared charset's superset, addresses, and repairing broken header blocks."""

from __future__ import annotations

import re
import unicodedata
from email import errors as email_errors
from email import policy
from email.header import decode_header, make_header
from email.headerregistry import BaseHeader
from email.message import Message
from email.utils import getaddresses

from channels import charsets
from channels.email.base import (
    _SURROGATES_RE,
    _USABLE_ADDRESS_RE,
    _WORD_CHARSET_RE,
    MAX_HEADER_CHARS,
    _clean,
    _describe,
    _Problems,
    _undo_surrogates,
)

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
