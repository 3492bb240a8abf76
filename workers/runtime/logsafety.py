"""Log redaction: no configured secret, token or password reaches a log line, at any level."""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

MASK = "***"
# Shorter values are not treated as secrets: masking them would blank ordinary words.
MIN_SECRET_CHARS = 6

# Secrets recognised by their shape, whether or not they were configured.
_SHAPES: list[tuple[re.Pattern[str], str]] = [
    # user:password@ in a URL (database, SMTP, proxy URLs)
    (re.compile(r"(?<=://)([^/\s:@'\"]*):[^/\s@'\"]+@"), rf"\1:{MASK}@"),
    # Telegram's /bot<id>:<token>/ in Bot API URLs
    (re.compile(r"/bot\d+:[A-Za-z0-9_-]+"), f"/bot{MASK}"),
    # credentials in a query string or a form body (Kannel's sendsms, Graph's access_token)
    (
        re.compile(
            r"(?i)((?<![\w.])[\w.]*(?:password|passwd|pwd|secret|token|api_?key)=)[^&\s#'\"<>]+"
        ),
        rf"\1{MASK}",
    ),
    # Authorization header values
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), rf"\1 {MASK}"),
]

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register_secret(value: Any) -> None:
    """Mask `value` (and its URL-, JSON- and repr-escaped forms) in every later log line."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        json.dumps(value)[1:-1],
        repr(value)[1:-1],
        repr(value.encode())[2:-1],
    }
    with _lock:
        new = forms - _secrets
        if not new:
            return
        _secrets.update(new)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))


_SECRET_KEY = re.compile(r"(?i)(password|secret|token|(^|_)key)$")


def register_secret_fields(fields: dict[str, Any]) -> None:
    """The values of a config table's keys named like secrets (`password`, `page_token`, ...)."""
    for key, value in fields.items():
        if _SECRET_KEY.search(key):
            register_secret(value)


def register_url_password(url: str | None) -> None:
    """The password of a URL such as LOKET_DATABASE_URL."""
    if url:
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:
            return
        if password:
            register_secret(password)
            register_secret(urllib.parse.unquote(password))


def redact(text: str) -> str:
    """`text` with every registered secret and every credential-shaped value masked."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for shape, replacement in _SHAPES:
        text = shape.sub(replacement, text)
    return text


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
_formatter = logging.Formatter()


class RedactSecrets(logging.Filter):
    """Rewrites a record in place: message, arguments, exception and stack text, extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - logging would print the raw arguments instead
            message = f"{record.msg!s} [log arguments did not format]"
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.exc_text = _formatter.formatException(record.exc_info)
            record.exc_info = None  # formatters print exc_text; the traceback objects hold secrets
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in vars(record).items():
            if name not in _STANDARD and isinstance(value, str):
                setattr(record, name, redact(value))
        return True


_installed: Callable[..., logging.LogRecord] | None = None


def install() -> None:
    """Redact every record when it is made, whichever logger or handler it then goes to.

    A handler filter would miss handlers libraries configure themselves (loggers that do not
    propagate); the record factory sees every record of the process.
    """
    global _installed
    if _installed is not None:
        return
    base = logging.getLogRecordFactory()
    redactor = RedactSecrets()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        redactor.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = factory
    # httpx logs every request URL at INFO (Kannel's sendsms carries the password in it),
    # httpcore every connection step at DEBUG: neither says anything loket does not.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
