"""Text from mail bytes whose charset is declared wrongly or not at all: supersets, then detection."""

from __future__ import annotations

import codecs
import re

import charset_normalizer

# ISO-2022-JP as Windows writes it (CP50220/50221): the JIS rows cp932 extends (NEC symbols,
# IBM kanji) and half-width katakana. A codec name of our own, decoded by this module.
ISO2022JP_CP932 = "iso2022_jp_cp932"
# What mail software really sends under a label: the label's common superset, so characters
# the label's strict table lacks (GBK hanzi under GB2312, NEC symbols under Shift_JIS, curly
# quotes under ISO-8859-1) still decode. Keys and values are Python codec names.
SUPERSETS = {
    "ascii": "cp1252",
    "iso8859-1": "cp1252",
    "iso8859-9": "cp1254",
    "iso8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "shift_jis": "cp932",
    "euc_kr": "cp949",
    "big5": "big5hkscs",
    "iso2022_jp": ISO2022JP_CP932,
}
# Labels seen in real mail that Python does not know.
_ALIASES = {
    "x-sjis": "cp932",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gbk",
    "x-big5": "big5",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso8859_8",
    "iso-8859-6-i": "iso8859_6",
    "x-mac-roman": "mac_roman",
    "ansi_x3.4-1968": "ascii",
    "unicode-1-1-utf-8": "utf-8",
    "utf8mb4": "utf-8",
}
# When the declared table (and its superset) does not fit: what the same senders use instead.
_ALTERNATIVES = {
    ISO2022JP_CP932: ("euc_jp", "cp932"),
    "cp932": ("euc_jp",),
    "euc_jp": ("cp932",),
    "gb18030": ("big5hkscs",),
    "big5hkscs": ("gb18030",),
}
# What detection chooses among: one Latin table (Latin text goes to windows-1252, whose
# letters the other Latin tables mostly share) and the tables of the other scripts.
_DETECTABLE = [
    "cp1252", "gb18030", "big5hkscs", "cp932", "euc_jp", "cp949",
    "cp1251", "koi8_r", "cp1253", "cp1255", "cp1256", "cp874",
]  # fmt: skip
_DETECTION_MAX_CHAOS = 0.2
_DETECTION_SAMPLE_BYTES = 64 * 1024
_SCRIPT_MIN_SHARE = 0.4

_SINGLE_BYTE_PREFIXES = ("iso8859", "cp125", "cp874", "koi8", "mac_", "tis-620", "latin")
_JIS_ESCAPE = re.compile(rb"\x1b(\$@|\$B|\$\(D|\$\(O|\$\(Q|\$\(P|\(B|\(J|\(I|\(H)")
_JIS_KANJI_START = re.compile(rb"\x1b\$[@B]")

NAMES = {
    "utf-8": "UTF-8",
    "cp1252": "windows-1252",
    "iso8859-1": "latin-1",
    ISO2022JP_CP932: "ISO-2022-JP",
    "iso2022_jp": "ISO-2022-JP",
    "iso2022_jp_2004": "ISO-2022-JP-2004",
    "iso2022_jp_2": "ISO-2022-JP-2",
    "iso2022_jp_ext": "ISO-2022-JP-EXT",
    "gb18030": "GB18030",
    "big5hkscs": "Big5-HKSCS",
    "cp932": "Shift_JIS (cp932)",
    "euc_jp": "EUC-JP",
    "cp949": "EUC-KR (cp949)",
}


def display_name(codec: str) -> str:
    """How a problem message names a codec."""
    return NAMES.get(codec, codec)


def codec_for(label: str | None) -> str | None:
    """The Python text codec for a charset label, or None when unknown (or not a text codec)."""
    if not label:
        return None
    cleaned = label.strip().strip("\"'").lower()
    cleaned = _ALIASES.get(cleaned, cleaned)
    if cleaned == ISO2022JP_CP932:
        return ISO2022JP_CP932
    try:
        info = codecs.lookup(cleaned)
    except LookupError:
        return None
    # Refuse bytes-to-bytes codecs (zlib, base64, ...) named as a charset.
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def superset_of(codec: str) -> str:
    """The codec to decode a label's bytes with: its common superset, or itself."""
    return SUPERSETS.get(codec, codec)


def needs_superset(label: str) -> bool:
    """Whether text under this label may hold characters the label's own table lacks."""
    codec = codec_for(label)
    return codec is None or superset_of(codec) != codec


def _is_single_byte(codec: str) -> bool:
    return codec == "ascii" or codec.startswith(_SINGLE_BYTE_PREFIXES)


def _jis_to_sjis(row: int, cell: int) -> bytes:
    """One JIS X 0208 code (row and cell bytes 0x21-0x7E) as its Shift_JIS bytes."""
    lead = ((row - 0x21) >> 1) + 0x81
    if lead > 0x9F:
        lead += 0x40
    if row % 2:
        trail = cell + 0x1F
        if trail >= 0x7F:
            trail += 1
    else:
        trail = cell + 0x7E
    return bytes((lead, trail))


def decode_iso2022jp_cp932(data: bytes) -> str:
    """ISO-2022-JP as Windows writes it, through cp932; ValueError on what cp932 cannot hold."""
    out = bytearray()
    mode = b"(B"
    position = 0
    for match in [*_JIS_ESCAPE.finditer(data), None]:
        end = match.start() if match else len(data)
        chunk = data[position:end]
        if mode in (b"$@", b"$B"):
            # A line end inside a kanji run: the sender forgot to shift back; RFC 1468 resets.
            for line in re.split(rb"(\r\n|\n|\r)", chunk):
                if line in (b"\r\n", b"\n", b"\r"):
                    out += line
                    continue
                if len(line) % 2:
                    raise ValueError("odd byte count in a JIS X 0208 run")
                for index in range(0, len(line), 2):
                    row, cell = line[index], line[index + 1]
                    if not (0x21 <= row <= 0x7E and 0x21 <= cell <= 0x7E):
                        raise ValueError("byte outside a JIS X 0208 run")
                    out += _jis_to_sjis(row, cell)
        elif mode == b"(I":
            if any(not 0x21 <= byte <= 0x5F for byte in chunk if byte not in b"\r\n"):
                raise ValueError("byte outside a JIS X 0201 katakana run")
            out += bytes(byte + 0x80 if byte not in b"\r\n" else byte for byte in chunk)
        elif mode in (b"(B", b"(J", b"(H"):
            if not chunk.isascii() or b"\x0e" in chunk or b"\x1b" in chunk:
                raise ValueError("8-bit byte, shift or unknown escape in ISO-2022-JP")
            out += chunk
        else:
            raise ValueError("JIS X 0212/0213 run: not in cp932")
        if match is None:
            break
        mode = match.group(1)
        position = match.end()
    return out.decode("cp932")


def _strict(data: bytes, codec: str) -> str | None:
    """The text if the bytes are valid in the codec, else None."""
    if codec == ISO2022JP_CP932:
        try:
            return decode_iso2022jp_cp932(data)
        except (ValueError, UnicodeDecodeError):
            for form in ("iso2022_jp_2004", "iso2022_jp_3", "iso2022_jp_2", "iso2022_jp_ext"):
                text = _strict(data, form)
                if text is not None:
                    return text
            return None
    try:
        return data.decode(codec)
    except (UnicodeDecodeError, UnicodeError, LookupError):
        return None


def looks_like_iso2022jp(data: bytes) -> bool:
    """7-bit bytes carrying ISO-2022-JP kanji escapes (undeclared, or declared as ASCII)."""
    return data.isascii() and _JIS_KANJI_START.search(data) is not None


def _western(data: bytes) -> tuple[str, str]:
    """windows-1252, or latin-1 where that table has holes; named latin-1 when both agree."""
    text = _strict(data, "cp1252")
    if text is None:
        return data.decode("latin-1"), "iso8859-1"
    if not re.search(rb"[\x80-\x9f]", data):
        return text, "iso8859-1"  # identical in both tables: name the one people know
    return text, "cp1252"


def detect(data: bytes) -> str | None:
    """The codec detection finds for non-UTF-8 bytes; None for Latin text or no clear answer."""
    results = charset_normalizer.from_bytes(
        data[:_DETECTION_SAMPLE_BYTES], cp_isolation=_DETECTABLE
    )
    best = results.best()
    if best is None or best.chaos > _DETECTION_MAX_CHAOS or best.encoding == "cp1252":
        return None
    codec = codec_for(best.encoding)
    if codec is None or _strict(data, codec) is None:
        return None
    if _is_single_byte(codec):
        # Cyrillic, Greek, Hebrew, Arabic, Thai: most letters are 8-bit. A few 8-bit bytes
        # among ASCII words are accents of a Latin text, whatever the statistics say.
        letters = re.findall(rb"[A-Za-z\x80-\xff]", data[:_DETECTION_SAMPLE_BYTES])
        high = sum(1 for letter in letters if letter[0] >= 0x80)
        if high < _SCRIPT_MIN_SHARE * len(letters):
            return None
    return codec


def _not_ascii_compatible(codec: str) -> bool:
    """Codecs whose 7-bit bytes are not plain ASCII text (shift sequences, UTF-7, UTF-16)."""
    return codec.startswith(("iso2022", "utf-7", "utf-16", "utf-32", "hz"))


def decode(data: bytes, label: str | None, hint: str | None = None) -> tuple[str, str | None]:
    """Text of mail bytes under a declared charset label (None: undeclared), and what went wrong.

    The second value is a problem to report, or None when the bytes fit their label (or its
    superset). `hint` is a charset the rest of the message declares, tried before detection.
    """
    codec = codec_for(label)
    if label and codec is None:
        return _fallback(data, f"charset {label} unknown, decoded as", hint)
    if data.isascii():
        if looks_like_iso2022jp(data) and (codec in (None, "ascii", "utf-8") or "2022_jp" in codec):
            text = _strict(data, ISO2022JP_CP932)
            if text is not None:
                if codec is not None and "2022_jp" in codec:
                    return text, None
                named = f"declared charset {label}" if label else "no charset declared"
                return text, f"{named}; ISO-2022-JP escape sequences decoded"
        if codec is None or not _not_ascii_compatible(codec):
            return data.decode("ascii"), None
        text = _strict(data, superset_of(codec)) or _strict(data, codec)
        if text is not None:
            return text, None
        return data.decode("ascii"), f"invalid {label} shift sequences left as they are"
    if codec is None or codec in ("ascii", "utf-8"):
        text = _strict(data, "utf-8")
        if text is not None:
            if codec == "ascii":
                return text, f"declared charset {label} does not fit the text; decoded as UTF-8"
            return text, None  # undeclared 8-bit text: UTF-8 is what current software means
        prefix = (
            f"declared charset {label} does not fit the text; decoded as"
            if label
            else "no charset declared; decoded as"
        )
        return _fallback(data, prefix, hint, utf8_tried=True)
    superset = superset_of(codec)
    mismatch = f"declared charset {label} does not fit the text; decoded as"
    if _is_single_byte(codec) and not data.isascii():
        # UTF-8 under a Latin label: valid UTF-8 is almost never meant as Latin mojibake.
        text = _strict(data, "utf-8")
        if text is not None:
            return text, f"{mismatch} UTF-8"
    text = _strict(data, superset)
    if text is not None:
        return text, None
    for alternative in _ALTERNATIVES.get(superset, ()):
        text = _strict(data, alternative)
        if text is not None:
            return text, f"{mismatch} {display_name(alternative)}"
    text = _strict(data, "utf-8")
    if text is not None:
        return text, f"{mismatch} UTF-8"
    detected = detect(data)
    if detected is not None:
        return data.decode(detected), f"{mismatch} {display_name(detected)} (detected)"
    replacing = "cp932" if superset == ISO2022JP_CP932 else superset
    return data.decode(replacing, "replace"), f"invalid {label} bytes replaced"


def _fallback(
    data: bytes, prefix: str, hint: str | None, utf8_tried: bool = False
) -> tuple[str, str]:
    """Bytes without a usable label: UTF-8, the message's other charset, detection, Western."""
    if not utf8_tried:
        text = _strict(data, "utf-8")
        if text is not None:
            return text, f"{prefix} UTF-8"
    hinted = codec_for(hint)
    if hinted is not None and hinted not in ("ascii", "utf-8"):
        text = _strict(data, superset_of(hinted))
        if text is not None:
            return text, f"{prefix} {display_name(superset_of(hinted))} (as the message declares)"
    detected = detect(data)
    if detected is not None:
        return data.decode(detected), f"{prefix} {display_name(detected)} (detected)"
    text, codec = _western(data)
    return text, f"{prefix} {display_name(codec)}"
