"""Fax wiring: one mailbox poller per fax account, the OCR stage, and PDF replies through the gateway."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import msgspec
from aiokafka.structs import ConsumerRecord

from channels.budget import fit_raw
from channels.email import reply_subject
from channels.email.smtp import EmailAccount, send_message
from channels.fax import FaxAccount, fax_number, gateway_recipient, ocr_pages, render_reply_pdf
from channels.types import (
    AttachmentRef,
    ChannelError,
    DeliveryResult,
    OutboundReply,
    RawInbound,
    encoder,
    raw_decoder,
)
from normalizer.phone import normalize_phone
from normalizer.threading import make_message_id
from workers.pipeline import bus
from workers.pipeline.mailpoll import MailPoller, RawHook
from workers.pipeline.wiring import Sender, StageFactory
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

NO_NUMBER = "sender unknown: no fax number found"
DEFAULT_LANGUAGES = ("ind", "eng")
_FAX_TYPES = frozenset({"application/pdf", "image/tiff", "image/tif"})
_FAX_SUFFIXES = (".pdf", ".tif", ".tiff")
# Faxes are slow to recognise: one fax per core a batch, so a batch lasts as long as its
# longest fax (a commit, and progress to `loket status`, after each round) and a rebalance
# redoes little.
OCR_STAGE = "ocr"


@dataclass(frozen=True)
class FaxSetup:
    """A fax account with what the pipeline needs besides it: its mailbox as mail, OCR languages."""

    fax: FaxAccount
    mail: EmailAccount
    languages: tuple[str, ...]


_TLS_MODES = ("ssl", "starttls", "none")


def _tls_mode(value: Any, secure: str, where: str) -> str:
    """`ssl`, `starttls` or `none`; a boolean (the fax adapter's own form) means `secure` or none."""
    if isinstance(value, bool):
        return secure if value else "none"
    if value in _TLS_MODES:
        return str(value)
    raise ValueError(f"{where} must be one of {', '.join(_TLS_MODES)} (or true/false)")


def fax_setup(entry: dict[str, Any]) -> FaxSetup:
    """Build from a `[[channels.fax]]` table; `address` is the From of replies (default: the IMAP user)."""
    name = entry.get("name")
    smtp_port = int(entry.get("smtp_port", 587))
    imap_tls = _tls_mode(entry.get("imap_tls", True), "ssl", f"channels.fax {name!r}: imap_tls")
    smtp_tls = _tls_mode(
        entry.get("smtp_tls", True),
        "ssl" if smtp_port == 465 else "starttls",
        f"channels.fax {name!r}: smtp_tls",
    )
    # FaxAccount keeps TLS as a yes/no; the mail code below gets the exact mode.
    fax = FaxAccount.from_config(
        {**entry, "imap_tls": imap_tls != "none", "smtp_tls": smtp_tls != "none"}
    )
    address = str(entry.get("address") or fax.imap_user)
    if "@" not in address:
        raise ValueError(
            f"channels.fax {fax.name!r}: set `address`, the From address of fax replies"
        )
    mail = EmailAccount(
        name=fax.name,
        address=address,
        imap_host=fax.imap_host,
        imap_port=fax.imap_port,
        imap_user=fax.imap_user,
        imap_password=fax.imap_password,
        imap_tls=imap_tls,
        imap_folder=fax.imap_folder,
        smtp_host=fax.smtp_host,
        smtp_port=fax.smtp_port,
        smtp_user=fax.smtp_user or None,
        smtp_password=fax.smtp_password or None,
        smtp_tls=smtp_tls,
    )
    languages = tuple(str(lang) for lang in entry.get("ocr_languages") or DEFAULT_LANGUAGES)
    return FaxSetup(fax=fax, mail=mail, languages=languages)


def fax_setups(rt: Runtime) -> dict[str, FaxSetup]:
    return {e["name"]: fax_setup(e) for e in rt.channels.get("fax") or []}


# --- inbound: mailbox poller -----------------------------------------------------------------


def number_hook(fax: FaxAccount) -> RawHook:
    """The poller's `prepare` hook: the sending fax number into `meta["fax_number"]`."""

    def prepare(raw: RawInbound, _context: dict[str, Any]) -> RawInbound:
        number = fax_number(raw.headers, raw.subject, fax)
        if number:
            raw.meta["fax_number"] = number
        else:
            raw.problems.append(NO_NUMBER)
        return raw

    return prepare


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    return {
        f"poll-fax-{name}": MailPoller(
            rt, setup.mail, channel="fax", prepare=number_hook(setup.fax), topic=bus.FAX
        ).run
        for name, setup in fax_setups(rt).items()
    }


# --- the OCR stage: FAX -> RAW ---------------------------------------------------------------


def is_fax_document(ref: AttachmentRef) -> bool:
    """A stored PDF or TIFF attachment, by declared type or, for octet-streams, by file name."""
    declared = ref.content_type.split(";", 1)[0].strip().lower()
    return bool(ref.sha256) and (
        declared in _FAX_TYPES or ref.filename.lower().endswith(_FAX_SUFFIXES)
    )


async def recognize(rt: Runtime, raw: RawInbound, languages: Sequence[str]) -> RawInbound:
    """OCR every fax document of `raw` into its body; the documents stay attached as they came."""
    documents = [ref for ref in raw.attachments if is_fax_document(ref)]
    texts: list[str] = []
    pages = 0
    seconds = 0.0
    for ref in documents:
        try:
            data = rt.blobs.get(ref.sha256)
        except (OSError, ValueError) as exc:
            raw.problems.append(f"{ref.filename}: stored pages could not be read: {exc}")
            continue
        result = await asyncio.to_thread(ocr_pages, data, ref.content_type, languages=languages)
        raw.problems.extend(f"{ref.filename}: {problem}" for problem in result.problems)
        pages += result.pages
        seconds += result.seconds_per_page * result.pages
        if result.text:
            texts.append(f"[{ref.filename}]\n{result.text}" if len(documents) > 1 else result.text)
    if not documents:
        raw.problems.append("no fax pages: the mail has no PDF or TIFF attachment")
    cover = raw.body_text.strip()
    raw.body_text = "\n\n".join(part for part in [cover, *texts] if part)
    raw.meta["ocr_pages"] = str(pages)
    if pages:
        raw.meta["ocr_seconds_per_page"] = f"{seconds / pages:.3f}"
    # Recognised pages can be far longer than the mail was: the same budget as at the edge.
    fit_raw(raw, rt.blobs, rt.settings.max_text_chars)
    return raw


def ocr_handler(rt: Runtime, setups: dict[str, FaxSetup]) -> bus.BatchHandler:
    # Tesseract runs one thread per page (OMP_THREAD_LIMIT=1): one fax per core at a time.
    slots = asyncio.Semaphore(os.cpu_count() or 1)

    async def one(record: ConsumerRecord) -> bus.Publish:
        try:
            raw = raw_decoder.decode(record.value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise bus.PoisonMessage(f"cannot decode {record.topic}@{record.offset}: {exc}") from exc
        setup = setups.get(raw.account)
        languages = setup.languages if setup is not None else DEFAULT_LANGUAGES
        async with slots:
            raw = await recognize(rt, raw, languages)
        # A finished fax is the stage moving, though nothing is committed before the batch is.
        metrics.progress_of(OCR_STAGE).working()
        return bus.Publish(bus.RAW, encoder.encode(raw), raw.key())

    async def handle(records: list[ConsumerRecord]) -> list[bus.Publish]:
        # gather keeps the records' order, so a caller's faxes reach RAW in arrival order.
        return list(await asyncio.gather(*(one(record) for record in records)))

    return handle


def ocr_handler_for(rt: Runtime) -> bus.BatchHandler | None:
    """The OCR stage's handler: faxes are recognised there, off the hot path; None without fax."""
    setups = fax_setups(rt)
    return ocr_handler(rt, setups) if setups else None


# --- outbound: the reply as a PDF mailed to the gateway ----------------------------------------


def fax_target(reply: OutboundReply) -> str:
    """The E.164 number to fax: the number the caller's fax came from, else a fax identity."""
    typed = reply.meta.get("fax_number", "").strip()
    if not typed and "@" not in reply.recipient:
        typed = reply.recipient.strip()  # replying from a fax identity, not to a received fax
    if not typed:
        raise ChannelError("no fax number known for this caller", permanent=True)
    identity = normalize_phone(typed, kind="fax")
    if not identity.valid:
        raise ChannelError(
            f"fax number {typed!r} is not a number the gateway can dial", permanent=True
        )
    return identity.value


def compose_fax(setup: FaxSetup, reply: OutboundReply, pdf: bytes, recipient: str) -> EmailMessage:
    """The mail the fax gateway turns into a fax: the PDF is what gets transmitted."""
    domain = setup.mail.domain
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = setup.mail.address
    message["To"] = recipient
    message["Subject"] = reply_subject(reply.subject, reply.ticket_id, replying=False)
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_message_id(reply.message_id, reply.ticket_id, domain)
    message["X-Loop"] = setup.mail.address
    message.set_content(f"Tiket #{reply.ticket_id}\n", charset="utf-8")
    message.add_attachment(
        pdf,
        maintype="application",
        subtype="pdf",
        filename=f"tiket-{reply.ticket_id}-{reply.message_id}.pdf",
    )
    return message


def senders(rt: Runtime) -> dict[str, Sender]:
    setups = fax_setups(rt)
    if not setups:
        return {}

    async def send(reply: OutboundReply) -> DeliveryResult:
        setup = setups.get(reply.account)
        if setup is None:
            raise ChannelError(
                f"no fax account named {reply.account!r} is configured", permanent=True
            )
        recipient = gateway_recipient(setup.fax, fax_target(reply))
        title = reply.subject or f"Tiket #{reply.ticket_id}"
        pdf = await asyncio.to_thread(
            render_reply_pdf, reply.body_text, ticket_id=reply.ticket_id, title=title
        )
        message = compose_fax(setup, reply, pdf, recipient)
        await send_message(setup.mail, message)
        return DeliveryResult(status="sent", provider_id=message["Message-ID"])

    return {"fax": send}
