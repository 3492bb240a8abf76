"""The example configuration loads, every account in it is accepted, secrets come from the environment."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from channels.email.smtp import EmailAccount
from channels.fax import FaxAccount
from channels.sms import kannel, twilio
from channels.social import facebook, telegram, twitter
from ticketing.rules import TicketRules
from workers.runtime.settings import ConfigError, Settings, load_channels, other_sections

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "loket.example.toml"


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    names = set(re.findall(r'"env:([A-Z0-9_]+)"', EXAMPLE.read_text()))
    values = {name: f"value-of-{name.lower().replace('_', '-')}-0123456789" for name in names}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_example_config_loads_every_account(example_env: dict[str, str]) -> None:
    channels = load_channels(EXAMPLE)
    assert set(channels) == {"email", "sms", "fax", "facebook", "twitter", "telegram"}
    email = EmailAccount.from_config(channels["email"][0])
    assert email.imap_password == example_env["HELPDESK_IMAP_PASSWORD"]
    assert "value-of" not in repr(email)  # secrets never in a repr that may reach a log
    providers = {entry["provider"]: entry for entry in channels["sms"]}
    assert kannel.KannelAccount.from_config(providers["kannel"]).sendsms_url.endswith("/sendsms")
    assert (
        twilio.TwilioAccount.from_config(providers["twilio"]).account_sid
        == example_env["TWILIO_ACCOUNT_SID"]
    )
    assert FaxAccount.from_config(channels["fax"][0]).gateway_address == "{number}@fax.example.net"
    assert (
        facebook.FacebookAccount.from_config(channels["facebook"][0]).page_id == "123456789012345"
    )
    assert (
        twitter.TwitterAccount.from_config(channels["twitter"][0]).api_url
        == "https://api.twitter.com"
    )
    assert telegram.TelegramAccount.from_config(channels["telegram"][0]).secret_token


def test_example_service_levels(example_env: dict[str, str]) -> None:
    rules = TicketRules.from_config(7, other_sections(EXAMPLE))
    assert rules.policies["agent"].first_response == timedelta(hours=4)
    assert rules.policies["management"].resolution == timedelta(hours=40)  # five 8-hour days
    assert rules.calendar.tz == "Asia/Jakarta"
    assert rules.auto_escalate is False


def test_missing_secret_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_PASSWORD", raising=False)
    path = tmp_path / "loket.toml"
    path.write_text(
        '[[channels.email]]\nname = "a"\nimap_host = "h"\nimap_password = "env:NOPE_PASSWORD"\n'
    )
    with pytest.raises(ConfigError, match="NOPE_PASSWORD is not set"):
        load_channels(path)


def test_unknown_email_key_and_duplicate_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "loket.toml"
    path.write_text('[[channels.email]]\nname = "a"\nimap_hots = "typo"\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_channels(path)
    path.write_text('[[channels.email]]\nname = "a"\n[[channels.email]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="used twice"):
        load_channels(path)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKET_HTTP_ADDR", "0.0.0.0:9000")
    monkeypatch.setenv("LOKET_PARTITIONS", "12")
    settings = Settings()
    assert settings.host_port() == ("0.0.0.0", 9000)
    assert settings.partitions == 12
