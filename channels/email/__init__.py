"""MIME mail to `RawInbound` (tolerant of anything a mailbox can hold), and replies to MIME.

`parse` reads a mail, with `headers` (decoding and repairing header blocks), `mime` (the MIME
tree, payloads, delivery status) and `html` (HTML to text, sanitising); `compose` writes replies.
"""

from channels.email.base import MAX_DEPTH, MAX_PARTS, NO_REPLY_ADDRESS
from channels.email.compose import compose_reply, reply_bytes, reply_subject
from channels.email.html import html_to_text, sanitize_html
from channels.email.parse import parse_email

__all__ = [
    "MAX_DEPTH", "MAX_PARTS", "NO_REPLY_ADDRESS", "compose_reply", "html_to_text", "parse_email",
    "reply_bytes", "reply_subject", "sanitize_html",
]  # fmt: skip
