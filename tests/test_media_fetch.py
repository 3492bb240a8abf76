"""The media fetcher: host rules, address checks, redirects and the size cap, against a local server."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from channels import media
from channels.blobs import DiskBlobStore
from channels.social import telegram
from channels.types import ChannelError
from tests.support.platforms import GraphServer, TelegramServer
from tests.support.ports import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "platforms"
FB_HOSTS = media.parse_hosts(["fbcdn.net", "fbsbx.com", "facebook.com"], "test")


# --- pure checks --------------------------------------------------------------------------------


def test_parse_hosts_reads_names_and_exact_host_ports() -> None:
    rules = media.parse_hosts(["FbCdn.net", "127.0.0.1:8443", "[::1]:9000", "media.internal."], "t")
    assert rules == (
        media.HostRule("fbcdn.net"),
        media.HostRule("127.0.0.1", 8443),
        media.HostRule("::1", 9000),
        media.HostRule("media.internal"),
    )


@pytest.mark.parametrize(
    "entry", ["", "  ", ".fbcdn.net", "user@fbcdn.net", "a b", 42, "host:port"]
)
def test_parse_hosts_refuses_what_is_not_a_host(entry: Any) -> None:
    with pytest.raises(ValueError):
        media.parse_hosts([entry], "channels.facebook 'p'")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://scontent.xx.fbcdn.net/v/t1/ktp.jpg?oh=1", None),
        ("https://cdn.fbsbx.com/v/file.pdf", None),
        ("https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1", None),
        ("https://fbcdn.net/x", None),  # the entry itself, exactly
        ("http://scontent.xx.fbcdn.net/x", "must be fetched over https"),
        ("https://evilfbcdn.net/x", "not one of the platform's media hosts"),
        ("https://fbcdn.net.evil.example/x", "not one of the platform's media hosts"),
        ("https://fbcdn.net@127.0.0.1/x", "host 127.0.0.1 is not one"),
        ("http://127.0.0.1:8080/readyz", "host 127.0.0.1:8080 is not one"),
        ("http://169.254.169.254/latest/meta-data/", "host 169.254.169.254 is not one"),
        ("http://[::1]/x", "host [::1] is not one"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("/etc/passwd", "scheme '(none)'"),
        ("gopher://fbcdn.net/x", "scheme 'gopher'"),
    ],
)
def test_url_problem(url: str, problem: str | None) -> None:
    found = media.url_problem(httpx.URL(url), FB_HOSTS)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_exact_entries_allow_loopback_only_on_their_port() -> None:
    rules = media.parse_hosts(["127.0.0.1:5000", "localhost"], "t")
    assert media.url_problem(httpx.URL("http://127.0.0.1:5000/cdn/a"), rules) is None
    assert media.url_problem(httpx.URL("http://127.0.0.1:8080/readyz"), rules) is not None
    assert media.url_problem(httpx.URL("http://localhost:8080/x"), rules) is None  # any port
    # An address entry never matches by suffix, and a name entry with a port never does either.
    assert media.url_problem(httpx.URL("https://x.127.0.0.1/"), rules) is not None
    assert media.url_problem(httpx.URL("https://a.localhost/"), rules) is None


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("157.240.1.1", True),
        ("2a03:2880:f10c::1", True),
        ("127.0.0.1", False),
        ("127.1.2.3", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", False),  # 6to4 of 169.254.169.254
        ("2002:9df0:101::1", True),  # 6to4 of a public address
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo to 127.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a00:5", False),  # NAT64 of 10.0.0.5
        ("64:ff9b::9df0:101", True),  # NAT64 of a public address
        ("::127.0.0.1", False),  # IPv4-compatible
        ("fec0::1", False),  # site-local
    ],
)
def test_address_problem(address: str, public: bool) -> None:
    assert (media.address_problem(ipaddress.ip_address(address)) is None) is public


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]) -> None:
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [
            (family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


async def test_vetted_address_checks_every_resolved_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_dns(
        monkeypatch,
        {
            "scontent.fbcdn.net": ["157.240.1.1"],
            "rebind.fbcdn.net": ["157.240.1.1", "127.0.0.1"],
            "meta.fbcdn.net": ["169.254.169.254"],
            "media.internal": ["10.0.0.5"],
            "mirror.internal": ["10.0.0.6"],
            "tunnel.fbcdn.net": ["2002:7f00:1::1"],
        },
    )
    rules = (*FB_HOSTS, media.HostRule("media.internal"), media.HostRule("mirror.internal", 443))
    assert await media.vetted_address("scontent.fbcdn.net", 443, rules) == "157.240.1.1"
    with pytest.raises(media.MediaRefused, match="127.0.0.1, and 127.0.0.1 is a loopback"):
        await media.vetted_address("rebind.fbcdn.net", 443, rules)
    with pytest.raises(media.MediaRefused, match="link-local"):
        await media.vetted_address("meta.fbcdn.net", 443, rules)
    with pytest.raises(media.MediaRefused, match="leads to 127.0.0.1, and 127.0.0.1 is a loopback"):
        await media.vetted_address("tunnel.fbcdn.net", 443, rules)
    # A bare name says whose media to take, not where: what it resolves to is checked.
    with pytest.raises(media.MediaRefused, match="10.0.0.5 is a private address"):
        await media.vetted_address("media.internal", 443, rules)
    # Host and port listed: the operator's word, resolved by the connection itself.
    assert await media.vetted_address("mirror.internal", 443, rules) == "mirror.internal"
    with pytest.raises(media.MediaRefused, match="private"):
        await media.vetted_address("mirror.internal", 8443, rules)


async def test_a_cdn_name_resolving_to_loopback_is_never_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_dns(monkeypatch, {"scontent.xx.fbcdn.net": ["127.0.0.1"]})
    with pytest.raises(media.MediaRefused, match="loopback"):
        await media.fetch("https://scontent.xx.fbcdn.net/v/ktp.jpg", media.MediaPolicy(FB_HOSTS))


# --- against a local server ---------------------------------------------------------------------


@pytest.fixture
async def cdn() -> AsyncIterator[GraphServer]:
    server = GraphServer()
    await server.start()
    yield server
    await server.stop()


def policy(server: GraphServer, max_bytes: int = media.DEFAULT_MAX_BYTES) -> media.MediaPolicy:
    return media.MediaPolicy(media.parse_hosts([f"127.0.0.1:{server.port}"], "t"), max_bytes)


async def test_fetch_from_an_exactly_listed_host(cdn: GraphServer) -> None:
    cdn.files["ktp.jpg"] = (b"\xff\xd8jpeg", "image/jpeg")
    fetched = await media.fetch(f"{cdn.url}/cdn/ktp.jpg", policy(cdn))
    assert fetched == media.Media(b"\xff\xd8jpeg", "image/jpeg")
    assert cdn.calls("/cdn/ktp.jpg")[0].headers["accept-encoding"] == "identity"


async def test_redirects_are_checked_hop_by_hop(cdn: GraphServer) -> None:
    cdn.files["a.png"] = (b"png", "image/png")
    other = f"http://127.0.0.1:{free_port()}"
    cdn.redirects |= {
        "inside": "/cdn/a.png",
        "outside": f"{other}/readyz",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "loop": "/cdn-redirect/loop",
    }
    assert (await media.fetch(f"{cdn.url}/cdn-redirect/inside", policy(cdn))).data == b"png"
    for name in ("outside", "metadata"):
        with pytest.raises(media.MediaRefused, match="redirected: host .* is not one"):
            await media.fetch(f"{cdn.url}/cdn-redirect/{name}", policy(cdn))
    with pytest.raises(media.MediaRefused, match="more than 5 redirects"):
        await media.fetch(f"{cdn.url}/cdn-redirect/loop", policy(cdn))


async def test_chunked_body_over_the_cap_stops_reading(cdn: GraphServer) -> None:
    cdn.streams["big.mp4"] = 30 * 1024 * 1024
    with pytest.raises(media.MediaRefused, match="over the limit of 1048576 bytes"):
        await media.fetch(f"{cdn.url}/cdn-stream/big.mp4", policy(cdn, max_bytes=1024 * 1024))
    await asyncio.sleep(0.2)  # let the server notice the closed connection
    assert cdn.streamed["big.mp4"] < 10 * 1024 * 1024, cdn.streamed


async def test_declared_length_over_the_cap_is_refused_before_reading(cdn: GraphServer) -> None:
    cdn.files["big.bin"] = (b"x" * 200_000, "application/octet-stream")
    with pytest.raises(media.MediaRefused, match="too large: 200000 bytes > limit 100000"):
        await media.fetch(f"{cdn.url}/cdn/big.bin", policy(cdn, max_bytes=100_000))
    cdn.files["fits.bin"] = (b"x" * 100_000, "application/octet-stream")
    assert len((await media.fetch(f"{cdn.url}/cdn/fits.bin", policy(cdn, 100_000))).data) == 100_000


async def test_http_errors_split_into_dropped_and_retry_later(cdn: GraphServer) -> None:
    with pytest.raises(media.MediaRefused, match="HTTP 404"):
        await media.fetch(f"{cdn.url}/cdn/missing.jpg", policy(cdn))
    cdn.fail_next(1, "server_error", path_contains="/cdn/")
    with pytest.raises(ChannelError) as transient:
        await media.fetch(f"{cdn.url}/cdn/missing.jpg", policy(cdn))
    assert not transient.value.permanent
    closed = free_port()
    rules = media.MediaPolicy(media.parse_hosts([f"127.0.0.1:{closed}"], "t"))
    with pytest.raises(ChannelError) as down:
        await media.fetch(f"http://127.0.0.1:{closed}/x", rules)
    assert not down.value.permanent and "127.0.0.1" in down.value.reason


# --- Telegram files go through the fetcher too ---------------------------------------------------


@pytest.fixture
async def bot_api() -> AsyncIterator[TelegramServer]:
    server = TelegramServer(token="555:media-token")
    await server.start()
    yield server
    await server.stop()
    await telegram.close_bots()


def document_update(file_id: str, size: int) -> bytes:
    update = json.loads((FIXTURES / "telegram_document.json").read_text())
    update["message"]["document"]["file_id"] = file_id
    update["message"]["document"]["file_size"] = size
    update["message"]["date"] = 1_767_000_000
    return json.dumps(update).encode()


async def test_telegram_file_path_naming_a_local_file_is_not_read(
    bot_api: TelegramServer, tmp_path: Path
) -> None:
    account = telegram.TelegramAccount("tg", bot_api.token, "s" * 20, bot_api.url)
    local = tmp_path / "secret.txt"
    local.write_text("not for the help desk")
    # The Bot API names where the file is; PTB would read an existing local path from disk.
    bot_api.files["doc-local"] = (str(local), b"")
    headers = {"x-telegram-bot-api-secret-token": "s" * 20}
    body = document_update("doc-local", 10)
    outcome = await telegram.handle_webhook(
        account, "POST", {}, headers, body, blobs=DiskBlobStore(tmp_path / "blobs")
    )
    [ref] = outcome.messages[0].attachments
    assert not ref.sha256 and ref.dropped and "scheme" in ref.dropped, ref


async def test_telegram_file_over_the_cap_is_dropped(
    bot_api: TelegramServer, tmp_path: Path
) -> None:
    account = telegram.TelegramAccount("tg", bot_api.token, "s" * 20, bot_api.url)
    bot_api.files["doc-big"] = ("documents/big.pdf", b"%PDF" + b"x" * 300_000)
    headers = {"x-telegram-bot-api-secret-token": "s" * 20}
    blobs = DiskBlobStore(tmp_path / "blobs")
    # The Update understates the size: the cap is enforced on what is actually read.
    outcome = await telegram.handle_webhook(
        account, "POST", {}, headers, document_update("doc-big", 1000), blobs=blobs,
        max_attachment_bytes=100_000,
    )  # fmt: skip
    [ref] = outcome.messages[0].attachments
    assert ref.dropped and "limit 100000" in ref.dropped and not ref.sha256
    downloads = len(bot_api.calls("/file/"))
    declared = await telegram.handle_webhook(
        account, "POST", {}, headers, document_update("doc-big", 300_004), blobs=blobs,
        max_attachment_bytes=100_000,
    )  # fmt: skip
    [ref] = declared.messages[0].attachments
    assert ref.dropped == "too large: 300004 bytes > limit 100000"
    assert len(bot_api.calls("/file/")) == downloads, "a declared oversize file is not requested"
