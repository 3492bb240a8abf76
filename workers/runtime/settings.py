"""Settings from `LOKET_*` environment variables and channel accounts from the TOML file."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workers.runtime.logsafety import register_secret, register_secret_fields


class ConfigError(Exception):
    """The configuration cannot be used as written; the message says where."""


class Settings(BaseSettings):
    """Process-wide settings; every field is `LOKET_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LOKET_", extra="ignore")

    database_url: str | None = None
    kafka_bootstrap: str | None = None
    http_addr: str = "127.0.0.1:8080"
    config: Path | None = None
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("loket")))
    blob_dir: Path | None = None
    partitions: int = 6
    # Idempotent producing needs InitProducerId, which Tansu does not offer: a broker that
    # refuses it is used without (one warning at start, `bus.start_producer`); duplicates
    # from producer retries are absorbed by the natural keys either way.
    kafka_idempotence: bool = True
    # Replication of the topics loket creates (3 on a production Kafka cluster).
    kafka_replication: int = 1
    # Webhook records written to PostgreSQL before the 2xx (ticketing/journal.py): `auto` is
    # on with the embedded broker, which loses what it holds when it dies, and off with Kafka.
    inbound_journal: Literal["auto", "on", "off"] = "auto"
    # Where a worker process without the HTTP app serves /metrics, e.g. "0.0.0.0:9100".
    metrics_addr: str | None = None
    log_level: str = "INFO"
    log_json: bool = False
    # Where providers reach this installation (Kannel DLR callbacks, Twilio status callbacks);
    # unset: the address LOKET_HTTP_ADDR listens on (`public_base`).
    public_url: str | None = None
    max_attachment_bytes: int = 10 * 1024 * 1024
    # Longer message text is cut at the edge; the full original is attached (channels/budget.py).
    max_text_chars: int = Field(default=64_000, ge=1_000)
    # A stage with records waiting and no commit for this long is reported stalled.
    stall_seconds: float = Field(default=120.0, gt=0)
    # Attempts for a failing message before it goes to the shunt topic.
    max_attempts: int = 3
    # Delivery attempts for a reply before it is marked failed.
    max_delivery_attempts: int = 8
    followup_days: float = 7.0
    imap_poll_seconds: float = 30.0
    session_hours: float = 12.0
    # Proxies whose X-Forwarded-For/-Proto count (addresses or networks, comma-separated);
    # empty: the client address is the TCP peer's, whatever a header says.
    trusted_proxies: str = ""
    # A client gets this long for its request headers, then for its body, or is disconnected.
    http_header_timeout: float = Field(default=10.0, gt=0)
    http_body_timeout: float = Field(default=30.0, gt=0)
    # Connections the HTTP server holds at once; more are answered 503 and closed.
    http_max_connections: int = Field(default=1000, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_networks(cls, value: str) -> str:
        # Raised as ConfigError (pydantic passes it through): `loket` names the bad entry.
        for entry in filter(None, (e.strip() for e in value.split(","))):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ConfigError(
                    f"LOKET_TRUSTED_PROXIES: {entry!r} is not an address or a network"
                ) from exc
        return value

    def trusted_proxy_list(self) -> list[str]:
        return [e.strip() for e in self.trusted_proxies.split(",") if e.strip()]

    def journal_inbound(self) -> bool:
        """Whether webhooks journal what they accept (see `inbound_journal`)."""
        if self.inbound_journal == "auto":
            return not self.kafka_bootstrap
        return self.inbound_journal == "on"

    def blobs_path(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def public_base(self) -> str:
        """LOKET_PUBLIC_URL without its trailing slash, else this server's own address
        (127.0.0.1 when it listens on every interface)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host, port = self.host_port()
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.http_addr.rpartition(":")
        return host or "127.0.0.1", int(port)


def resolve_env(value: Any, where: str) -> Any:
    """Replace every string written `"env:NAME"` by the environment variable NAME."""
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        register_secret(os.environ[name])  # what the file keeps out of itself stays out of logs
        return os.environ[name]
    if isinstance(value, dict):
        resolved = {k: resolve_env(v, f"{where}.{k}") for k, v in value.items()}
        register_secret_fields(resolved)  # a secret written into the file itself, too
        return resolved
    if isinstance(value, list):
        return [resolve_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


EMAIL_KEYS = {
    "name", "address", "imap_host", "imap_port", "imap_user", "imap_password", "imap_tls",
    "imap_folder", "smtp_host", "smtp_port", "smtp_user", "smtp_password", "smtp_tls",
}  # fmt: skip


def load_channels(path: Path | None) -> dict[str, list[dict[str, Any]]]:
    """Channel accounts by kind (`email`, `sms`, `fax`, ...), secrets resolved from the environment."""
    if path is None:
        return {}
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"LOKET_CONFIG names {path}, which does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    channels = document.get("channels", {})
    if not isinstance(channels, dict):
        raise ConfigError(f"{path}: [channels] must be a table")
    accounts: dict[str, list[dict[str, Any]]] = {}
    for kind, entries in channels.items():
        if not isinstance(entries, list):
            raise ConfigError(
                f"{path}: channels.{kind} must be an array of tables ([[channels.{kind}]])"
            )
        names = set()
        for i, entry in enumerate(entries):
            where = f"channels.{kind}[{i}]"
            if "name" not in entry:
                raise ConfigError(f"{path}: {where} has no name")
            if entry["name"] in names:
                raise ConfigError(f"{path}: {where}: account name {entry['name']!r} used twice")
            names.add(entry["name"])
            if kind == "email":
                unknown = set(entry) - EMAIL_KEYS
                if unknown:
                    raise ConfigError(f"{path}: {where}: unknown keys {sorted(unknown)}")
        accounts[kind] = [
            resolve_env(entry, f"channels.{kind}[{i}]") for i, entry in enumerate(entries)
        ]
    return accounts


def other_sections(path: Path | None) -> dict[str, Any]:
    """Non-channel sections of the TOML file (sla, calendar, ...), env references resolved."""
    if path is None:
        return {}
    document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    return {k: resolve_env(v, k) for k, v in document.items() if k != "channels"}
