"""Phone and fax numbers to E.164 identities; short codes and unparseable input stay as typed."""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneNumber, PhoneNumberFormat, PhoneNumberType

from channels.types import Identity

PHONE_KINDS: tuple[str, ...] = ("phone", "fax")

# What a person types into a phone field: digits and the usual separators.
_PHONE_CHARS = re.compile(r"\(?\+?[\d\s().\-/]*")
_SEARCH_CHARS = re.compile(r"[\d\s+().\-]+")
_TEL_PREFIX = re.compile(r"^tel:", re.IGNORECASE)
# Types that a subscriber number typed without its trunk prefix can have: only a mobile
# number is unambiguous there (a fixed line needs its area code, and service numbers
# such as 1500-xxx or 500-xxx are dialled exactly as written).
_UNPREFIXED_TYPES = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)


# A help desk hears from the same numbers again and again, and parsing one costs about as
# much as the rest of normalizing a message: keep the recent answers (Identity is frozen).
@functools.lru_cache(maxsize=65536)
def normalize_phone(text: str, *, kind: str = "phone", region: str = "ID") -> Identity:
    """Turn a typed number into an identity: E.164 when valid, else the trimmed text, `valid=False`.

    Accepts national (`0812-3456-7890`, `(021) 7418780`), international (`+62 812…`,
    `+1 650…`) and Indonesian numbers written with `62` but no plus (`62812…`).
    Short codes (`112`, `14045`, `500-005`, `1500005`) are never rewritten.
    """
    if kind not in PHONE_KINDS:
        raise ValueError(f"phone identity kind must be one of {PHONE_KINDS}, not {kind!r}")
    typed = text.strip()
    number = _parse(typed, region)
    if number is None:
        return Identity(kind=kind, value=typed, display=None, valid=False)
    return Identity(
        kind=kind,
        value=phonenumbers.format_number(number, PhoneNumberFormat.E164),
        display=phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL),
        valid=True,
    )


def looks_like_phone(text: str) -> bool:
    """True when a search box entry is a number: digits, spaces, `+ ( ) - .`, at least 3 digits."""
    stripped = text.strip()
    if not _SEARCH_CHARS.fullmatch(stripped):
        return False
    return sum(ch.isdigit() for ch in stripped) >= 3


def _parse(typed: str, region: str) -> PhoneNumber | None:
    """The valid number `typed` stands for, or None when it is a short code or not a number."""
    core = _TEL_PREFIX.sub("", typed).strip()
    if not core or not _PHONE_CHARS.fullmatch(core):
        return None
    digits = re.sub(r"\D", "", core)
    if not digits:
        return None
    if "+" in core:
        return _valid(_try_parse("+" + digits, region))

    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata is None:
        raise ValueError(f"unknown phone region {region!r}")
    trunk_prefix = metadata.national_prefix or ""
    country_code = str(metadata.country_code)

    if trunk_prefix and digits.startswith(trunk_prefix):
        # National form (0812…, 021…) or an international call prefix (008…).
        return _valid(_try_parse(digits, region))
    if digits.startswith(country_code):
        # `62812…`: the country code typed without its plus. phonenumbers alone would read
        # it as a national number (and `6221…` happens to be valid as area code 0622).
        with_code = _valid(_try_parse("+" + digits, region))
        if with_code is not None:
            return with_code
    number = _valid(_try_parse(digits, region))
    if number is None:
        return None
    if not trunk_prefix:
        return number
    if phonenumbers.number_type(number) in _UNPREFIXED_TYPES:
        return number
    return None


def _try_parse(text: str, region: str) -> PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def _valid(number: PhoneNumber | None) -> PhoneNumber | None:
    if number is None or not phonenumbers.is_valid_number(number):
        return None
    return number
