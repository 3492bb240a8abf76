"""SMS text rules shared by the SMS adapters: GSM 03.38 vs UCS-2, segment limits, splitting."""

from __future__ import annotations

from typing import Literal

Encoding = Literal["gsm7", "ucs2"]

# GSM 03.38 default alphabet (one septet each). ESC (0x1B) is left out: it only
# introduces extension characters and is never text of its own.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each is sent as ESC + char, so it costs two septets.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

SINGLE_LIMIT: dict[str, int] = {"gsm7": 160, "ucs2": 70}
# A concatenated message loses room to the 6-octet UDH: 153 septets or 67 UCS-2 units.
PART_LIMIT: dict[str, int] = {"gsm7": 153, "ucs2": 67}


def encoding_for(text: str) -> Encoding:
    """ "gsm7" when every character is in the GSM default alphabet or its extension, else "ucs2"."""
    for char in text:
        if char not in GSM7_BASIC and char not in GSM7_EXTENSION:
            return "ucs2"
    return "gsm7"


def _cost(char: str, encoding: Encoding) -> int:
    """Septets (gsm7) or UTF-16 code units (ucs2) one character takes."""
    if encoding == "gsm7":
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def text_length(text: str, encoding: Encoding | None = None) -> int:
    """Length of `text` in septets (gsm7) or UTF-16 code units (ucs2)."""
    encoding = encoding or encoding_for(text)
    return sum(_cost(char, encoding) for char in text)


def split_parts(text: str) -> list[str]:
    """Split `text` into the parts a concatenated SMS carries; joining them gives `text` back.

    An extension character (ESC + char) or a surrogate pair is one Python character,
    so cutting between characters never separates the two halves.
    """
    encoding = encoding_for(text)
    if text_length(text, encoding) <= SINGLE_LIMIT[encoding]:
        return [text]
    limit = PART_LIMIT[encoding]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for char in text:
        cost = _cost(char, encoding)
        if used + cost > limit:
            parts.append("".join(current))
            current, used = [], 0
        current.append(char)
        used += cost
    if current:
        parts.append("".join(current))
    return parts


def segment_count(text: str) -> int:
    """How many SMS segments `text` is billed and sent as (an empty text is one segment)."""
    return len(split_parts(text))
