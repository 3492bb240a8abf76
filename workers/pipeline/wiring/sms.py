"""SMS wiring: the delivery sender for Kannel and Twilio-style accounts (SMS has no pollers)."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec

from channels import kannel, twilio
from channels.sms import account_from_config
from channels.types import ChannelError, DeliveryResult, OutboundReply
from normalizer.phone import normalize_phone
from workers.pipeline.wiring import Sender, StageFactory
from workers.runtime.runtime import Runtime


def sms_recipient(recipient: str) -> str:
    """The caller's number in E.164 when it is a valid number, else as the gateway gave it.

    An MO's sender may arrive national (`0812…`) or without its plus (`62812…`); gateways
    route an MT reliably only in international form. Short codes stay as they are.
    """
    identity = normalize_phone(recipient)
    return identity.value if identity.valid else recipient.strip()


def senders(rt: Runtime) -> dict[str, Sender]:
    entries = rt.channels.get("sms") or []
    if not entries:
        return {}
    accounts: dict[str, Any] = {e["name"]: account_from_config(e) for e in entries}
    public = rt.settings.public_url.rstrip("/")
    # One connection pool per process: replies to one gateway reuse its connections.
    client = httpx.AsyncClient()

    async def send(reply: OutboundReply) -> DeliveryResult:
        account = accounts.get(reply.account)
        if account is None:
            raise ChannelError(
                f"no SMS account named {reply.account!r} is configured", permanent=True
            )
        addressed = msgspec.structs.replace(reply, recipient=sms_recipient(reply.recipient))
        if isinstance(account, kannel.KannelAccount):
            dlr_url = f"{public}/webhooks/sms/kannel?account={account.name}"
            return await kannel.send(account, addressed, dlr_url=dlr_url, client=client)
        if isinstance(account, twilio.TwilioAccount):
            callback = f"{public}/webhooks/sms/twilio?account={account.name}"
            return await twilio.send(account, addressed, status_callback=callback, client=client)
        raise ChannelError(
            f"SMS account {reply.account!r} has no sender for its provider", permanent=True
        )

    return {"sms": send}


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    return {}
