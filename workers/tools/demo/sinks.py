"""Where the demo's replies go: sinks inside loket that play the person at the other end.

With `--demo`, each channel has a demo account (`demo-email`, `demo-sms`, ...). A reply to it
never leaves the process: the sink takes it (`sent`), reports it `delivered` a moment later
through the receipts topic as a provider would, and a few seconds after that the person
answers on the same channel, through that channel's real inbound path, so the answer lands
on the same ticket. `loket up --demo` refuses a configuration with outbound accounts, so
every reply on these channels is the demo's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from channels.types import (
    ChannelError,
    DeliveryReceipt,
    DeliveryResult,
    OutboundReply,
    WebhookOutcome,
)
from workers.runtime.runtime import Runtime
from workers.tools.demo import inbound
from workers.tools.demo.content import ANSWERS
from workers.web.webhooks import publish_outcome

log = logging.getLogger(__name__)

Sender = Callable[[OutboundReply], Awaitable[DeliveryResult]]

DELIVERED_AFTER_SECONDS = 1.0
ANSWER_AFTER_SECONDS = 4.0


@dataclass
class DemoSinks:
    """The demo accounts of every outbound channel, and what happens to a reply sent on one."""

    rt: Runtime
    accounts: inbound.DemoAccounts = field(default_factory=inbound.DemoAccounts.create)
    _playing: set[asyncio.Task[None]] = field(default_factory=set)
    _played: set[int] = field(default_factory=set)  # a reply sent again is answered once

    def account_names(self) -> dict[str, list[str]]:
        return {channel: [name] for channel, name in inbound.ACCOUNT_NAMES.items()}

    def senders(self) -> dict[str, Sender]:
        """The sink of each demo channel, as its delivery stage's sender."""
        return {channel: self._sender(channel) for channel in inbound.ACCOUNT_NAMES}

    def _sender(self, channel: str) -> Sender:
        async def send(reply: OutboundReply) -> DeliveryResult:
            if reply.account != inbound.ACCOUNT_NAMES[channel]:
                raise ChannelError(f"no {channel} account named {reply.account!r}", permanent=True)
            return self.take(reply)

        return send

    def take(self, reply: OutboundReply) -> DeliveryResult:
        provider_id = f"demo-{reply.channel}-{reply.message_id}"
        log.info("demo: reply %s on %s kept by the demo sink; nothing leaves loket",
                 reply.message_id, reply.channel)  # fmt: skip
        if reply.message_id in self._played:
            return DeliveryResult(status="sent", provider_id=provider_id)
        self._played.add(reply.message_id)
        task = asyncio.create_task(self._play(reply, provider_id))
        self._playing.add(task)
        task.add_done_callback(self._playing.discard)
        return DeliveryResult(status="sent", provider_id=provider_id)

    async def _play(self, reply: OutboundReply, provider_id: str) -> None:
        try:
            await asyncio.sleep(DELIVERED_AFTER_SECONDS)
            receipt = DeliveryReceipt(channel=reply.channel, account=reply.account,
                                      provider_id=provider_id, status="delivered")  # fmt: skip
            await publish_outcome(self.rt, WebhookOutcome(receipts=[receipt]))
            await asyncio.sleep(ANSWER_AFTER_SECONDS)
            await inbound.answer(self.rt, self.accounts, reply, ANSWERS[reply.channel])
        except asyncio.CancelledError:
            raise
        except Exception:  # the demo never takes the running system down
            log.exception("demo: playing the answer to reply %s failed", reply.message_id)


def install(rt: Runtime) -> DemoSinks:
    """Give `rt` the demo accounts and their sinks; before the stages are built."""
    sinks = DemoSinks(rt)
    rt.demo = sinks
    return sinks
