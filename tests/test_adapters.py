"""Every channel adapter through the one interface, each with its own fixture payloads.

A provider added to `channels.registry` without a case here fails the first test: the
contract is what the workers rely on (accounts parsed at start-up, a webhook that takes the
platform's documented call and refuses a forged one, a sender, a poller where there is one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from channels import registry
from channels.base import Adapter, Context, WebhookRequest
from channels.blobs import DiskBlobStore
from channels.sms import twilio
from channels.types import RawInbound, RejectedInput

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
PUBLIC = "https://loket.example.org"


@dataclass(frozen=True)
class Case:
    entry: dict[str, Any]  # the `[[channels.<channel>]]` entry
    request: Callable[[bool], WebhookRequest]  # a documented call; forged when False
    polls: bool = False


def _json_call(path: str, body: bytes, headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(method="POST", url=f"{PUBLIC}/webhooks/{path}", query={},
                          headers={"content-type": "application/json", **headers}, body=body)  # fmt: skip


def _facebook(genuine: bool) -> WebhookRequest:
    body = (FIXTURES / "messenger_text.json").read_bytes()
    secret = b"app-secret-1" if genuine else b"guessed"
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return _json_call("facebook", body, {"x-hub-signature-256": f"sha256={digest}"})


def _twitter(genuine: bool) -> WebhookRequest:
    body = (FIXTURES / "twitter_dm.json").read_bytes()
    secret = b"consumer-secret" if genuine else b"guessed"
    digest = base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest()).decode()
    return _json_call("twitter", body, {"x-twitter-webhooks-signature": f"sha256={digest}"})


def _telegram(genuine: bool) -> WebhookRequest:
    body = (FIXTURES / "telegram_text.json").read_bytes()
    token = "telegram-secret-token" if genuine else "guessed"
    return _json_call("telegram", body, {"x-telegram-bot-api-secret-token": token})


KANNEL_SECRET = "s3cret-token-0123456789"


def _kannel(genuine: bool) -> WebhookRequest:
    query = {"account": "kannel-main", "secret": KANNEL_SECRET if genuine else "guessed",
             "from": "+6281234567890", "to": "500005", "text": "Internet sekolah mati",
             "ts": "2026-01-05 08:30:00", "id": "5d56e782-f431-4a44-88cd-0712a9869844"}  # fmt: skip
    url = f"{PUBLIC}/webhooks/sms/kannel?{urllib.parse.urlencode(query)}"
    return WebhookRequest(method="GET", url=url, query=query, headers={}, body=b"",
                          remote_addr="127.0.0.1")  # fmt: skip


TWILIO_TOKEN = "a1b2c3d4e5f60718293a4b5c6d7e8f90"


def _twilio(genuine: bool) -> WebhookRequest:
    fields = {"MessageSid": "SM1f0e8ae6ade43cb3c0ce4525424e404f", "From": "+6281234567890",
              "To": "+15017122661", "Body": "Sekolah kami tidak bisa mengakses internet",
              "AccountSid": "AC7f0d1a4f2b9e4e6c8a0b1c2d3e4f5a6b", "NumMedia": "0"}  # fmt: skip
    url = f"{PUBLIC}/webhooks/sms/twilio?account=twilio-main"
    signature = twilio.compute_signature(
        TWILIO_TOKEN if genuine else "guessed", url, {k: [v] for k, v in fields.items()}
    )
    return WebhookRequest(method="POST", url=url, query={"account": "twilio-main"},
                          headers={"content-type": "application/x-www-form-urlencoded",
                                   "x-twilio-signature": signature},
                          body=urllib.parse.urlencode(fields).encode())  # fmt: skip


CASES: dict[str, Case] = {
    "facebook": Case({"name": "kemlu-page", "page_id": "1234567890", "app_secret": "app-secret-1",
                      "verify_token": "verify-me", "page_token": "page-token"}, _facebook),
    "twitter": Case({"name": "loket_help", "consumer_key": "ck", "consumer_secret": "consumer-secret",
                     "access_token": "at", "access_token_secret": "ats", "bearer_token": "bt"},
                    _twitter, polls=True),
    "telegram": Case({"name": "bot", "token": "123:abc", "secret_token": "telegram-secret-token"},
                     _telegram, polls=True),
    "kannel": Case({"name": "kannel-main", "provider": "kannel", "sender": "500005",
                    "sendsms_url": "http://127.0.0.1:9/cgi-bin/sendsms", "username": "loket",
                    "password": "pw", "inbound_secret": KANNEL_SECRET}, _kannel),
    "twilio": Case({"name": "twilio-main", "provider": "twilio", "sender": "+15017122661",
                    "account_sid": "AC7f0d1a4f2b9e4e6c8a0b1c2d3e4f5a6b", "auth_token": TWILIO_TOKEN},
                   _twilio),
}  # fmt: skip


def test_every_adapter_in_the_registry_has_a_case_and_a_unique_path() -> None:
    assert {a.name for a in registry.adapters()} == set(CASES)
    paths = [a.path for a in registry.adapters()]
    assert len(paths) == len(set(paths))


def test_every_provider_module_holds_the_adapter_its_registry_line_names() -> None:
    for provider in registry.PROVIDERS:
        adapter = registry.adapter(provider.name)
        assert (adapter.name, adapter.channel) == (provider.name, provider.channel.name)
        assert provider.channel in registry.CHANNEL_KINDS
    with pytest.raises(KeyError, match="carrier-pigeon"):
        registry.adapter("carrier-pigeon")


def test_the_channel_lists_and_console_labels_follow_from_the_registry() -> None:
    from channels import types
    from workers.web.console.i18n import LANGUAGES, catalog

    assert types.CHANNELS == tuple(k.name for k in registry.CHANNEL_KINDS)
    assert "telegram" in types.PLATFORM_CHANNELS and "telegram" in types.IDENTITY_KINDS
    assert types.REPLY_CHANNEL_OF_IDENTITY["phone"] == "sms"  # the first outbound phone channel
    assert "phone" not in types.OUTBOUND_CHANNELS
    for lang in LANGUAGES:
        for kind in registry.CHANNEL_KINDS:
            assert catalog(lang)[f"channel.{kind.name}"], (lang, kind.name)
    assert catalog("id")["channel.walk_in"] == "Datang langsung"  # a locale file translates
    assert catalog("en")["channel.walk_in"] == "Walk-in"  # else the registry's label


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    return Context(blobs=DiskBlobStore(tmp_path), public_url=PUBLIC)


@pytest.mark.parametrize("adapter", registry.adapters(), ids=lambda a: a.name)
async def test_an_adapter_takes_its_documented_call_and_refuses_a_forged_one(
    adapter: Adapter[Any], ctx: Context
) -> None:
    case = CASES[adapter.name]
    assert adapter.owns(case.entry)
    assert registry.of_entry(adapter.channel, case.entry) is adapter
    assert registry.by_path(adapter.path) is adapter
    account = adapter.account(case.entry)
    assert registry.accounts(adapter, {adapter.channel: [case.entry]}) == {
        case.entry["name"]: account
    }
    assert adapter.webhook is not None and adapter.send is not None
    assert (adapter.poll is not None) == case.polls

    genuine = case.request(True)
    assert genuine.method in adapter.webhook_methods
    outcome = await adapter.webhook(account, genuine, ctx)
    assert outcome.messages and outcome.status == 200
    for raw in outcome.messages:
        assert isinstance(raw, RawInbound)
        assert (raw.channel, raw.account) == (adapter.channel, case.entry["name"])
        assert raw.external_id and raw.sender

    with pytest.raises(RejectedInput) as refused:
        await adapter.webhook(account, case.request(False), ctx)
    assert refused.value.status in (401, 403)


def test_a_channel_with_several_providers_gives_each_entry_to_its_own() -> None:
    sms = [CASES["kannel"].entry, CASES["twilio"].entry, {"name": "old", "sender": "1"}]
    owners = [registry.of_entry("sms", entry) for entry in sms]
    assert [a.name if a else None for a in owners] == ["kannel", "twilio", "kannel"]
    assert registry.of_entry("sms", {"name": "x", "provider": "carrier-pigeon"}) is None
    assert registry.by_path("sms/unknown") is None


def test_delivery_reports_come_back_to_the_adapter_path() -> None:
    kannel = registry.by_path("sms/kannel")
    assert kannel is not None
    assert Context(public_url=f"{PUBLIC}/").webhook_url(kannel, "kannel-main") == (
        f"{PUBLIC}/webhooks/sms/kannel?account=kannel-main"
    )


def test_an_entry_no_provider_owns_stops_the_start_with_its_name() -> None:
    from types import SimpleNamespace

    from workers.pipeline.wiring.adapters import channel_accounts

    rt = SimpleNamespace(channels={"sms": [{"name": "x", "provider": "carrier-pigeon"}]})
    with pytest.raises(ValueError, match="'x': unknown provider 'carrier-pigeon'"):
        channel_accounts(rt, "sms")  # type: ignore[arg-type]
