"""Every channel and every provider, declared once: the one list the whole pipeline reads.

A new provider is a module in `channels/` whose `ADAPTER` implements `channels.base.Adapter`,
and one `Provider` line below; a provider of a new channel names the new `ChannelKind` in
that same line. The channel lists (`channels.types.CHANNELS` and the rest), the API's enums,
the outbound topics and the delivery stages, the console's channel filter and labels all
follow from it.

This module imports no adapter: `channels.types` reads the channel list from here, and
adapters import `channels.types`, so an adapter's module is imported the first time a
worker asks for it (a process that never takes a webhook or sends a reply loads no SDK).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from channels.base import Adapter


@dataclass(frozen=True)
class ChannelKind:
    """A channel as the pipeline knows it.

    `identity`: the kind of identity its senders have (`phone`, `fax`, `email`), `platform`
    for a platform's own user ids (the identity kind is then the channel's name), None when
    an agent types it (a walk-in). `outbound`: replies go out on it through a delivery stage;
    a call's or a visit's answer is logged, not sent. `label`: its name in the console where
    the locale files do not give one (a brand reads the same in every language).
    """

    name: str
    identity: str | None
    outbound: bool = True
    label: str = ""

    @property
    def identity_kind(self) -> str | None:
        return self.name if self.identity == "platform" else self.identity


@dataclass(frozen=True)
class Provider:
    """One adapter: its provider key, the module whose `ADAPTER` it is, and its channel."""

    name: str
    module: str
    channel: ChannelKind


# Channels whose messages arrive without a provider adapter: mail and fax through the IMAP
# poller, calls and visits typed by an agent.
EMAIL = ChannelKind("email", "email", label="E-mail")
SMS = ChannelKind("sms", "phone", label="SMS")
FAX = ChannelKind("fax", "fax", label="Fax")
PHONE = ChannelKind("phone", "phone", outbound=False, label="Phone")
WALK_IN = ChannelKind("walk_in", None, outbound=False, label="Walk-in")

PROVIDERS: tuple[Provider, ...] = (
    Provider("facebook", "channels.social.facebook", ChannelKind("facebook", "platform", label="Facebook")),
    Provider("twitter", "channels.social.twitter", ChannelKind("twitter", "platform", label="X/Twitter")),
    Provider("telegram", "channels.social.telegram", ChannelKind("telegram", "platform", label="Telegram")),
    Provider("kannel", "channels.sms.kannel", SMS),
    Provider("twilio", "channels.sms.twilio", SMS),
)  # fmt: skip

# Every channel once, in the order the console lists them. A reply to an identity goes out on
# the first outbound channel listed for its kind (a phone number: SMS).
CHANNEL_KINDS: tuple[ChannelKind, ...] = tuple(
    dict.fromkeys((EMAIL, SMS, FAX, *(p.channel for p in PROVIDERS), PHONE, WALK_IN))
)


def adapter(name: str) -> Adapter[Any]:
    """The adapter of provider `name` (its module imported on first use)."""
    for provider in PROVIDERS:
        if provider.name == name:
            return _load(provider)
    raise KeyError(f"unknown provider {name!r}")


def adapters(channel: str | None = None) -> tuple[Adapter[Any], ...]:
    """Every adapter, or those of one channel, in the order of `PROVIDERS`."""
    return tuple(_load(p) for p in PROVIDERS if channel is None or p.channel.name == channel)


def loaded() -> tuple[Adapter[Any], ...]:
    """The adapters this process has imported so far (the ones to close at shutdown)."""
    return tuple(_load(p) for p in PROVIDERS if p.name in _imported)


def by_path(path: str) -> Adapter[Any] | None:
    """The adapter whose webhook is `/webhooks/<path>`."""
    for found in adapters():
        if found.path == path and found.webhook is not None:
            return found
    return None


def of_entry(channel: str, entry: dict[str, Any]) -> Adapter[Any] | None:
    """The adapter of a `[[channels.<channel>]]` entry, or None when no adapter owns it."""
    for found in adapters(channel):
        if found.owns(entry):
            return found
    return None


def account_of(channel: str, entry: dict[str, Any]) -> tuple[Adapter[Any], Any]:
    """The adapter of a `[[channels.<channel>]]` entry and the account parsed from it;
    ValueError naming the entry when no adapter owns it or its adapter refuses it."""
    found = of_entry(channel, entry)
    if found is None:
        raise ValueError(
            f"channels.{channel} {entry.get('name')!r}: unknown provider {entry.get('provider')!r}"
        )
    return found, found.account(entry)


def accounts(adapter: Adapter[Any], channels: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The configured accounts of `adapter`, by name, parsed and checked."""
    entries = [e for e in channels.get(adapter.channel, []) if adapter.owns(e)]
    return {e["name"]: adapter.account(e) for e in entries}


_imported: set[str] = set()  # the providers `_load` has imported


@cache
def _load(provider: Provider) -> Adapter[Any]:
    found: Adapter[Any] = importlib.import_module(provider.module).ADAPTER
    if (found.name, found.channel) != (provider.name, provider.channel.name):
        raise RuntimeError(
            f"{provider.module}.ADAPTER is {found.name!r} on {found.channel!r}, but the "
            f"registry lists it as {provider.name!r} on {provider.channel.name!r}"
        )
    _imported.add(provider.name)
    return found
