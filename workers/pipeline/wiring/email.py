"""E-mail wiring: the SMTP sender of the delivery stage and one IMAP poller per account."""

from __future__ import annotations

from channels.email import compose_reply
from channels.email.smtp import deliver
from channels.types import ChannelError, DeliveryResult, OutboundReply
from workers.pipeline.mailpoll import MailPoller
from workers.pipeline.wiring import Sender, StageFactory
from workers.runtime.runtime import Runtime


def senders(rt: Runtime) -> dict[str, Sender]:
    if not rt.channels.get("email"):
        return {}
    accounts = rt.email_accounts

    async def send(reply: OutboundReply) -> DeliveryResult:
        account = accounts.get(reply.account)
        if account is None:
            raise ChannelError(
                f"no e-mail account named {reply.account!r} is configured", permanent=True
            )
        return await deliver(account, compose_reply(reply, from_address=account.address))

    return {"email": send}


def pollers(rt: Runtime) -> dict[str, StageFactory]:
    return {f"poll-email-{a.name}": MailPoller(rt, a).run for a in rt.email_accounts.values()}
