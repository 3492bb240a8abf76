"""Helpers the Messenger, X and Telegram adapters share: signatures, JSON bodies, attachments."""

from __future__ import annotations

import hashlib
import hmac
import json
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


def json_object(body: bytes) -> dict[str, Any]:
    """Decode a webhook body that must be a JSON object, else refuse it with 400."""
    try:
        decoded = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RejectedInput(f"body is not JSON: {exc}", status=400) from exc
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
