"""E-mail identity, quoted-reply stripping, auto-reply and bounce detection (pure functions)."""

from __future__ import annotations

import re
import unicodedata
from email.utils import getaddresses, parseaddr

from channels.types import Identity, RawInbound

_ADDRESS_RE = re.compile(
    r"^[^\s@<>()\[\],;:\"\\]{1,64}@[^\s@<>()\[\],;:\"\\]+\.[^\s@<>()\[\],;:\"\\.]+$"
)


def _clean_display(display_name: str | None) -> str | None:
    if not display_name:
        return None
    cleaned = "".join(
        " " if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") else char
        for char in display_name
    )
    cleaned = " ".join(cleaned.split()).strip("\"' ")
    return cleaned[:200] or None


def email_identity(address: str, display_name: str | None) -> Identity | None:
    """The `email` identity for an address (lower-cased, loosely validated); None for garbage."""
    candidate = (address or "").strip()
    if candidate.lower().startswith("mailto:"):
        candidate = candidate[len("mailto:") :]
    if "<" in candidate or " " in candidate:
        parsed_name, parsed_address = parseaddr(candidate)
        candidate = parsed_address
        display_name = display_name or parsed_name
    candidate = candidate.strip().strip("<>").rstrip(".").lower()
    if len(candidate) > 254 or not _ADDRESS_RE.match(candidate):
        return None
    if any(unicodedata.category(char).startswith("C") for char in candidate):
        return None
    return Identity(kind="email", value=candidate, display=_clean_display(display_name))


# --- quoted replies and signatures -------------------------------------------------------

_ATTRIBUTION_STARTS = re.compile(r"^\s*(on|pada|le|am|el)\s", re.IGNORECASE)
_ATTRIBUTION_ENDS = re.compile(r"(wrote|menulis|a écrit|schrieb|escribió)\s*:\s*$", re.IGNORECASE)
_ORIGINAL_MESSAGE = re.compile(
    r"^\s*-{2,}\s*(original message|pesan asli|forwarded message|pesan yang diteruskan)\s*-{2,}\s*$",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^\s*\*?(from|dari)\s*:\*?\s*\S", re.IGNORECASE)
_HEADER_SENT = re.compile(r"^\s*\*?(sent|date|dikirim|tanggal|terkirim)\s*:\*?\s*\S", re.IGNORECASE)
_HEADER_FROM_SENT_ONE_LINE = re.compile(
    r"^\s*\*?(from|dari)\s*:.*\b(sent|dikirim)\s*:", re.IGNORECASE
)
_RULE_LINE = re.compile(r"^\s*_{10,}\s*$")
_SIGNATURE_SEPARATOR = re.compile(r"^-- ?$")
_MOBILE_TRAILER = re.compile(
    r"^\s*(sent from my \w+|sent from (mail|outlook|yahoo mail)\b|get outlook for \w+|"
    r"dikirim dari \S+|sent via \w+)",
    re.IGNORECASE,
)


def _hard_cut(lines: list[str]) -> int:
    """Index of the first line from which everything is quoted material or signature."""
    for index, line in enumerate(lines):
        if _ORIGINAL_MESSAGE.match(line) or _SIGNATURE_SEPARATOR.match(line):
            return index
        if _MOBILE_TRAILER.match(line) or _HEADER_FROM_SENT_ONE_LINE.match(line):
            return index
        if _HEADER_FROM.match(line) and any(
            _HEADER_SENT.match(following) for following in lines[index + 1 : index + 4]
        ):
            # Outlook draws a rule line right above its header block.
            previous = index - 1
            while previous >= 0 and not lines[previous].strip():
                previous -= 1
            if previous >= 0 and _RULE_LINE.match(lines[previous]):
                return previous
            return index
    return len(lines)


def _attribution_span(lines: list[str], index: int) -> int:
    """How many lines (1 or 2) the attribution starting at `index` spans; 0 if none starts there."""
    line = lines[index]
    if not _ATTRIBUTION_STARTS.match(line):
        return 0
    if _ATTRIBUTION_ENDS.search(line) and len(line) <= 400:
        return 1
    # Gmail wraps long attributions onto a second line.
    if index + 1 < len(lines) and _ATTRIBUTION_ENDS.search(lines[index + 1]):
        if len(line) + len(lines[index + 1]) <= 400:
            return 2
    return 0


def strip_quoted(text: str) -> str:
    """The text without quoted replies, attributions and signatures; the original if nothing is left."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = lines[: _hard_cut(lines)]
    kept: list[str] = []
    index = 0
    while index < len(lines):
        span = _attribution_span(lines, index)
        if span:
            rest = lines[index + span :]
            if not any(line.lstrip().startswith(">") for line in rest):
                # An attribution followed by unmarked text: what follows is the quote itself.
                break
            index += span
            continue
        if not lines[index].lstrip().startswith(">"):
            kept.append(lines[index].rstrip())
        index += 1
    result = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip("\n")
    if not result.strip():
        return text
    return result


# --- auto-replies and bounces ------------------------------------------------------------

_AUTO_PRECEDENCE = {"bulk", "junk", "list", "auto_reply"}
_SUPPRESS_TOKENS = {"all", "oof", "autoreply"}
_DAEMON_LOCALS = {"mailer-daemon", "postmaster"}
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:(?:re|aw|fw|fwd)\s*:\s*)*(?:"
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[- ]?reply|auto[- ]?response|auto\s*:|"
    r"balasan otomatis|balas otomatis|di luar kantor|sedang cuti|"
    r"undeliverable\s*:|undelivered mail returned to sender|delivery status notification|"
    r"mail delivery failed"
    r")",
    re.IGNORECASE,
)


def _strip_plus(address: str) -> str:
    local, sep, domain = address.strip().strip("<>").lower().rpartition("@")
    if not sep:
        return address.strip().lower()
    return f"{local.split('+', 1)[0]}@{domain}"


def is_auto_reply(
    headers: dict[str, str], subject: str | None, own_addresses: frozenset[str] = frozenset()
) -> bool:
    """Whether a message was sent by a machine (RFC 3834 and the common vendor markers)."""
    value = {name.lower(): (text or "").strip() for name, text in headers.items()}
    auto_submitted = value.get("auto-submitted", "").split(";", 1)[0].strip().lower()
    if auto_submitted and auto_submitted != "no":
        return True
    if value.get("precedence", "").lower() in _AUTO_PRECEDENCE:
        return True
    if value.get("x-autoreply") or value.get("x-autorespond"):
        return True
    suppress = {
        token.strip().lower() for token in value.get("x-auto-response-suppress", "").split(",")
    }
    if suppress & _SUPPRESS_TOKENS:
        return True
    loop = value.get("x-loop", "")
    if loop and own_addresses:
        named = {_strip_plus(address) for _, address in getaddresses([loop]) if address}
        if named & {_strip_plus(address) for address in own_addresses}:
            return True
    if value.get("return-path", None) == "<>":
        return True
    for _, address in getaddresses([value.get("from", "")]):
        if address.split("@", 1)[0].lower() in _DAEMON_LOCALS:
            return True
    return bool(subject and _AUTO_SUBJECT.match(subject))


def bounce_info(raw: RawInbound) -> tuple[str, str] | None:
    """(original Message-ID, reason) for a delivery-status report whose action is failed."""
    action = raw.meta.get("dsn_action", "").strip().lower()
    original = raw.meta.get("dsn_original_message_id", "").strip()
    if not action.startswith("failed") or not original:
        return None
    status = raw.meta.get("dsn_status", "").strip()
    diagnostic = raw.meta.get("dsn_diagnostic", "").strip()
    recipient = raw.meta.get("dsn_recipient", "").strip()
    reason = "delivery failed"
    if recipient:
        reason += f" to {recipient}"
    if status:
        reason += f" (status {status})"
    if diagnostic:
        reason += f": {diagnostic}"
    return original, reason
