"""Every channel adapter, by provider: the one list the workers read.

A new provider is a module in `channels/` with its `ADAPTER`, and one line here.
"""

from __future__ import annotations

from typing import Any

from channels import facebook, kannel, telegram, twilio, twitter
from channels.base import Adapter

ADAPTERS: tuple[Adapter[Any], ...] = (
    facebook.ADAPTER,
    twitter.ADAPTER,
    telegram.ADAPTER,
    kannel.ADAPTER,
    twilio.ADAPTER,
)


def by_path(path: str) -> Adapter[Any] | None:
    """The adapter whose webhook is `/webhooks/<path>`."""
    for adapter in ADAPTERS:
        if adapter.path == path and adapter.webhook is not None:
            return adapter
    return None


def of_entry(channel: str, entry: dict[str, Any]) -> Adapter[Any] | None:
    """The adapter of a `[[channels.<channel>]]` entry, or None when no adapter owns it."""
    for adapter in ADAPTERS:
        if adapter.channel == channel and adapter.owns(entry):
            return adapter
    return None


def accounts(adapter: Adapter[Any], channels: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The configured accounts of `adapter`, by name, parsed and checked."""
    entries = [e for e in channels.get(adapter.channel, []) if adapter.owns(e)]
    return {e["name"]: adapter.account(e) for e in entries}
