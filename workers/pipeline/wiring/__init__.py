"""Each wiring module contributes delivery senders and pollers (adapters: every provider in channels.registry); this gathers them."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable

from channels.types import DeliveryResult, OutboundReply

Sender = Callable[[OutboundReply], Awaitable[DeliveryResult]]
StageFactory = Callable[[asyncio.Event], Awaitable[None]]

# Each with `senders(rt)` and `pollers(rt)`: mail and fax (IMAP, SMTP, OCR), and the adapters.
WIRING_MODULES = (
    "workers.pipeline.wiring.email",
    "workers.pipeline.wiring.fax",
    "workers.pipeline.wiring.adapters",
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
