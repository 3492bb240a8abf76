"""Each channel's wiring module contributes delivery senders and pollers; this gathers them."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable

from channels.types import DeliveryResult, OutboundReply

Sender = Callable[[OutboundReply], Awaitable[DeliveryResult]]
StageFactory = Callable[[asyncio.Event], Awaitable[None]]

# One module per channel family, each with `senders(rt)` and `pollers(rt)`.
WIRING_MODULES = (
    "workers.pipeline.wiring.email",
    "workers.pipeline.wiring.sms",
    "workers.pipeline.wiring.fax",
    "workers.pipeline.wiring.social",
)


def _modules():  # type: ignore[no-untyped-def]
    return [importlib.import_module(name) for name in WIRING_MODULES]


def all_senders(rt) -> dict[str, Sender]:  # type: ignore[no-untyped-def]
    """Delivery function per outbound channel with configured accounts."""
    found: dict[str, Sender] = {}
    for module in _modules():
        found.update(module.senders(rt))
    return found


def all_pollers(rt) -> dict[str, StageFactory]:  # type: ignore[no-untyped-def]
    """Pull-channel tasks (IMAP mailboxes, Telegram getUpdates, X polling) by name."""
    found: dict[str, StageFactory] = {}
    for module in _modules():
        found.update(module.pollers(rt))
    return found
