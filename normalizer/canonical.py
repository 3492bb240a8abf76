"""Turn a provider's raw message into the canonical inbound message."""

from __future__ import annotations

import msgspec

from channels.types import Identity, InboundMessage, RawInbound
from normalizer.email import bounce_info, email_identity, is_auto_reply, strip_quoted
from normalizer.identity import identity_for
from normalizer.phone import normalize_phone

MAIL_CHANNELS = ("email", "fax")


def _without_nul(raw: RawInbound) -> RawInbound:
    """PostgreSQL text cannot hold NUL; a provider that sends one must not cost the message."""
    fields = {}
    for name in ("sender", "sender_name", "subject", "body_text", "body_html"):
        value = getattr(raw, name)
        if value and "\x00" in value:
            fields[name] = value.replace("\x00", "")
    if not fields:
        return raw
    cleaned = msgspec.structs.replace(raw, **fields)
    cleaned.problems = [*raw.problems, "NUL characters removed"]
    return cleaned


def canonicalize(raw: RawInbound, own_addresses: frozenset[str] = frozenset()) -> InboundMessage:
    """Identity, display body, auto-reply and bounce flags for one raw message (pure)."""
    raw = _without_nul(raw)
    if raw.channel == "email":
        identity = email_identity(raw.sender, raw.sender_name)
    elif raw.channel == "fax":
        number = raw.meta.get("fax_number")
        identity = normalize_phone(number, kind="fax") if number else None
    else:
        identity = identity_for(raw.channel, raw.sender, raw.sender_name)

    extra: list[Identity] = []
    shared = raw.meta.get("shared_phone")
    if shared:
        extra.append(normalize_phone(shared))

    auto_reply = False
    bounce_of = bounce_reason = None
    body_display = raw.body_text
    if raw.channel == "email":
        body_display = strip_quoted(raw.body_text)
        bounce = bounce_info(raw)
        if bounce is not None:
            bounce_of, bounce_reason = bounce
        auto_reply = bounce is not None or is_auto_reply(raw.headers, raw.subject, own_addresses)
    return InboundMessage(
        raw=raw,
        identity=identity,
        extra_identities=extra,
        body_display=body_display,
        auto_reply=auto_reply,
        bounce_of=bounce_of,
        bounce_reason=bounce_reason,
    )
