"""Map the sender of a raw inbound message to the identity a caller is matched by."""

from __future__ import annotations

import re

from channels.types import PLATFORM_CHANNELS, Identity
from normalizer.phone import looks_like_phone, normalize_phone

# Placeholders gateways and fax machines put where the number was withheld.
_WITHHELD = frozenset(
    {"unknown", "anonymous", "private", "withheld", "restricted", "unavailable", "none"}
)
# GSM alphanumeric originator: up to 11 characters, at least one letter (bank or operator names).
_ALPHANUMERIC_SENDER = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9 ._\-]{1,11}")
# One "@", something on each side, nothing that cannot stand in a bare address.
_EMAIL = re.compile(r"[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+")
_PLATFORM_ID = re.compile(r"\S+")


def identity_for(channel: str, sender: str, sender_name: str | None = None) -> Identity | None:
    """The identity behind `sender` on `channel`, or None when the sender is empty or unusable.

    sms/phone give a phone identity, fax a fax identity, email a lower-cased address,
    facebook/twitter/telegram the platform user id as given (display: `sender_name`).
    A walk-in visitor is identified by whatever the agent typed: a number or an address.
    """
    typed = sender.strip()
    if not typed or typed.lower() in _WITHHELD:
        return None
    if channel in ("sms", "phone", "fax"):
        return _phone_identity(typed, kind="fax" if channel == "fax" else "phone", channel=channel)
    if channel == "email":
        return _email_identity(typed)
    if channel in PLATFORM_CHANNELS:
        if not _PLATFORM_ID.fullmatch(typed):
            return None
        return Identity(kind=channel, value=typed, display=_clean_name(sender_name))
    if channel == "walk_in":
        if "@" in typed:
            return _email_identity(typed)
        if looks_like_phone(typed):
            return normalize_phone(typed)
        return None
    raise ValueError(f"unknown channel {channel!r}")


def _phone_identity(typed: str, *, kind: str, channel: str) -> Identity | None:
    if any(ch.isdigit() for ch in typed):
        return normalize_phone(typed, kind=kind)
    # An SMS from a named sender ("BANK-ABC") still groups its messages under one caller;
    # it stays as typed and invalid, so nothing is ever sent back to it.
    if channel == "sms" and _ALPHANUMERIC_SENDER.fullmatch(typed):
        return Identity(kind="phone", value=typed, display=None, valid=False)
    return None


def _email_identity(typed: str) -> Identity | None:
    address = typed.removeprefix("mailto:").strip().strip("<>").strip()
    if not _EMAIL.fullmatch(address):
        return None
    return Identity(kind="email", value=address.lower(), display=None)


def _clean_name(sender_name: str | None) -> str | None:
    if sender_name is None:
        return None
    name = " ".join(sender_name.split())
    return name or None
