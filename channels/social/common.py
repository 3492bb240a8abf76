"""Helpers the Messenger, X and Telegram adapters share: signatures, JSON bodies, attachments."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import mimetypes
import posixpath
from typing import Any
from urllib.parse import urlsplit

from channels.types import AttachmentRef, BlobStore, RejectedInput


def hmac_sha256(secret: str, body: bytes) -> bytes:
    """HMAC-SHA256 of `body` keyed with `secret`."""
    return hmac.new(secret.encode(), body, hashlib.sha256).digest()


def same_secret(expected: str, given: str | None) -> bool:
    """Constant-time comparison; an empty expectation never matches (unconfigured is not open)."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


# Platform payloads nest about ten levels; far deeper is an attack on the parser's recursion.
MAX_JSON_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _Unstorable(ValueError):
    """A JSON value the pipeline could never carry; its message is the refusal's reason."""


def _json_int(text: str) -> int:
    # The length test comes first: int() of thousands of digits is slow, then refused anyway.
    if len(text) > 20 or not INT64_MIN <= (value := int(text)) <= INT64_MAX:
        raise _Unstorable(f"integer {text[:30]}{'...' if len(text) > 30 else ''} is out of range")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Unstorable(f"number {text[:30]} is out of range")
    return value


def _json_constant(text: str) -> Any:
    raise _Unstorable(f"{text} is not a JSON number")


def _check_nesting(value: Any) -> None:
    """Refuse containers nested deeper than MAX_JSON_DEPTH and strings with lone surrogates."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, str):
            _check_text(node)
            continue
        if isinstance(node, dict):
            children: Any = node.values()
            strings: Any = node.keys()
        elif isinstance(node, list):
            children, strings = node, ()
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            raise _Unstorable(f"nested deeper than {MAX_JSON_DEPTH} levels")
        for text in strings:
            _check_text(text)
        for child in children:
            if isinstance(child, str):
                _check_text(child)
            elif isinstance(child, dict | list):
                pending.append((child, depth + 1))


def _check_text(text: str) -> None:
    # "\ud800" is valid JSON but no valid UTF-8: it could never be published or stored.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Unstorable("a string holds a lone UTF-16 surrogate") from None


def json_value(body: bytes) -> Any:
    """Decode a webhook body as JSON the pipeline can carry, else refuse it with 400.

    Integers must fit 64 bits, numbers be finite (no NaN, Infinity, 1e400), nesting stay
    within MAX_JSON_DEPTH, strings be valid Unicode.
    """
    try:
        decoded = json.loads(
            body, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant
        )
    except _Unstorable as exc:
        raise RejectedInput(f"body refused: {exc}", status=400) from exc
    except RecursionError:
        raise RejectedInput(f"body refused: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RejectedInput(f"body is not JSON: {exc}", status=400) from exc
    try:
        _check_nesting(decoded)
    except _Unstorable as exc:
        raise RejectedInput(f"body refused: {exc}", status=400) from exc
    return decoded


def json_object(body: bytes) -> dict[str, Any]:
    """Decode a webhook body that must be a JSON object (see `json_value`), else refuse it with 400."""
    decoded = json_value(body)
    if not isinstance(decoded, dict):
        raise RejectedInput("body is not a JSON object", status=400)
    return decoded


def filename_from_url(url: str, fallback: str) -> str:
    """The last path segment of a URL, or `fallback` when there is none."""
    name = posixpath.basename(urlsplit(url).path)
    return name or fallback


def stored_attachment(
    blobs: BlobStore, data: bytes, filename: str, content_type: str | None
) -> AttachmentRef:
    """Put downloaded bytes in the blob store and describe them."""
    kind = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    # Drop parameters such as "; charset=binary": the type alone is what consumers switch on.
    kind = kind.split(";", 1)[0].strip()
    return AttachmentRef(
        filename=filename, content_type=kind, size=len(data), sha256=blobs.put(data)
    )


def dropped_attachment(filename: str, content_type: str | None, reason: str) -> AttachmentRef:
    """An attachment we know of but could not store."""
    kind = content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return AttachmentRef(filename=filename, content_type=kind, size=0, dropped=reason)
