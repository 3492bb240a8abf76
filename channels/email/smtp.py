"""Sending mail over SMTP with aiosmtplib: the e-mail account and the reply delivery."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import aiosmtplib

from channels.types import ChannelError, DeliveryResult


@dataclass(frozen=True)
class EmailAccount:
    """One `[[channels.email]]` account (also the IMAP/SMTP half of a fax account)."""

    name: str
    address: str
    imap_host: str
    imap_port: int = 993
    imap_user: str = ""
    imap_password: str = ""
    imap_tls: str = "ssl"
    imap_folder: str = "INBOX"
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_tls: str = "starttls"

    @classmethod
    def from_config(cls, entry: dict[str, Any]) -> EmailAccount:
        known = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}
        known.setdefault("address", entry.get("imap_user", ""))
        for key in ("imap_tls", "smtp_tls"):
            if key in known and known[key] not in ("ssl", "starttls", "none"):
                raise ValueError(f"{entry.get('name')}: {key} must be ssl, starttls or none")
        return cls(**known)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2] or "localhost"

    def __repr__(self) -> str:  # never show passwords in logs
        return f"EmailAccount(name={self.name!r}, address={self.address!r})"


def _classify(code: int, text: str) -> ChannelError:
    """SMTP 4xx means try again later; 5xx is permanent (RFC 5321 and its enhanced codes)."""
    return ChannelError(f"{code} {text}".strip(), permanent=500 <= code < 600)


async def send_message(
    account: EmailAccount,
    message: EmailMessage,
    *,
    timeout: float = 30,  # noqa: ASYNC109 - handed to the SMTP client
) -> None:
    """Hand a message to the account's SMTP server or raise ChannelError."""
    try:
        await aiosmtplib.send(
            message,
            hostname=account.smtp_host,
            port=account.smtp_port,
            username=account.smtp_user or None,
            password=account.smtp_password if account.smtp_user else None,
            use_tls=account.smtp_tls == "ssl",
            start_tls=True if account.smtp_tls == "starttls" else False,
            timeout=timeout,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        refused = exc.recipients[0] if exc.recipients else None
        raise (
            _classify(refused.code, refused.message)
            if refused
            else ChannelError("recipient refused", permanent=True)
        ) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise _classify(exc.code, exc.message) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        raise ChannelError(f"SMTP server unreachable: {exc}", permanent=False) from exc


async def deliver(account: EmailAccount, message: EmailMessage) -> DeliveryResult:
    await send_message(account, message)
    return DeliveryResult(status="sent", provider_id=message["Message-ID"])
