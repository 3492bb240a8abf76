"""Our own threading markers (Message-ID, plus address, subject token): making and finding them."""

from __future__ import annotations

import re

from channels.types import RawInbound

# Ticket ids are PostgreSQL bigints; longer digit runs cannot be ours.
_ID = r"([1-9][0-9]{0,17})"
_MESSAGE_ID_RE = re.compile(r"<loket\.[0-9]{1,19}\.t" + _ID + r"@[^<>@\s]+>", re.IGNORECASE)
_PLUS_ADDRESS_RE = re.compile(
    r"([^\s<>,;:\"()@+]+)\+t" + _ID + r"@([^\s<>,;:\"()@]+)", re.IGNORECASE
)
_SUBJECT_TOKEN_RE = re.compile(r"\[#" + _ID + r"\]")


def make_message_id(message_id: int, ticket_id: int, domain: str) -> str:
    """The Message-ID of an outbound reply: `<loket.{message_id}.t{ticket_id}@{domain}>`."""
    return f"<loket.{message_id}.t{ticket_id}@{domain}>"


def make_reply_address(address: str, ticket_id: int) -> str:
    """`local+t{ticket_id}@domain`; an earlier ticket tag on `address` is replaced, not stacked."""
    local, sep, domain = address.strip().rpartition("@")
    if not sep:
        raise ValueError(f"not an e-mail address: {address!r}")
    local = re.sub(r"\+t[0-9]+$", "", local, flags=re.IGNORECASE)
    return f"{local}+t{ticket_id}@{domain}"


def subject_token(ticket_id: int) -> str:
    """The token that marks a ticket in a subject line: `[#123]`."""
    return f"[#{ticket_id}]"


def subject_ticket_ids(subject: str | None) -> list[int]:
    """Ticket ids named by subject tokens, in order of appearance."""
    return [int(found) for found in _SUBJECT_TOKEN_RE.findall(subject or "")]


def message_id_ticket_ids(value: str | None) -> list[int]:
    """Ticket ids named by our Message-IDs in a header value, in order of appearance."""
    return [int(found) for found in _MESSAGE_ID_RE.findall(value or "")]


def _base_address(local: str, domain: str) -> str:
    return f"{local}@{domain}".lower()


def ticket_hints(raw: RawInbound, own_addresses: frozenset[str] = frozenset()) -> list[int]:
    """Candidate ticket ids, best first: In-Reply-To, References (newest first), plus address, subject.

    When `own_addresses` is given, a plus address counts only if its base address is ours.
    """
    headers = raw.headers
    found: list[int] = []
    found += message_id_ticket_ids(headers.get("in-reply-to"))
    # References lists the thread oldest first; the newest parent is the better hint.
    found += reversed(message_id_ticket_ids(headers.get("references")))
    own = {address.lower() for address in own_addresses}
    for name in ("to", "cc", "delivered-to"):
        for local, ticket, domain in _PLUS_ADDRESS_RE.findall(headers.get(name) or ""):
            if not own or _base_address(local, domain) in own:
                found.append(int(ticket))
    found += subject_ticket_ids(raw.subject)
    return list(dict.fromkeys(found))
