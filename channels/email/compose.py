"""Replies as MIME: subject with the ticket's token, threading headers, the text."""

from __future__ import annotations

from datetime import UTC, datetime
from email import errors as email_errors
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from channels.email.base import _REPLY_PREFIX_RE
from channels.types import ChannelError, OutboundReply
from normalizer.threading import (
    make_message_id,
    make_reply_address,
    subject_token,
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
