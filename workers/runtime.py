"""What every stage of one process shares: settings, pool, producer, blob store, accounts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from channels.blobs import DiskBlobStore
from channels.smtp import EmailAccount
from ticketing.rules import TicketRules
from workers.settings import Settings, load_channels, other_sections


@dataclass
class Runtime:
    settings: Settings
    database_url: str
    bootstrap: str
    pool: asyncpg.Pool
    producer: AIOKafkaProducer
    blobs: DiskBlobStore
    channels: dict[str, list[dict[str, Any]]]
    rules: TicketRules
    started: dict[str, str] = field(default_factory=dict)  # what infrastructure this process started

    @property
    def email_accounts(self) -> dict[str, EmailAccount]:
        return {e["name"]: EmailAccount.from_config(e) for e in self.channels.get("email", [])}

    def account_names(self) -> dict[str, list[str]]:
        """Configured account names by outbound channel, for choosing where a reply goes."""
        return {kind: [a["name"] for a in entries] for kind, entries in self.channels.items()}

    def own_addresses(self) -> frozenset[str]:
        return frozenset(a.address.lower() for a in self.email_accounts.values())


def load_rules(settings: Settings) -> TicketRules:
    return TicketRules.from_config(settings.followup_days, other_sections(settings.config))


def load_accounts(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    return load_channels(settings.config)
