"""The HTTP server under hostile clients: forged forwarded headers, slow clients, floods, hang-ups."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import db
from tests.support.broker import TansuBroker
from tests.support.stack import LoketStack, wait_until

pytestmark = pytest.mark.slow

KANNEL_SECRET = "kannel-inbound-" + uuid.uuid4().hex[:16]
KANNEL_SOURCE = "10.20.30.40"  # the only address allowed to call the Kannel webhook
HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.0, 2.0, 40

CONFIG = f"""
[[channels.sms]]
name = "kannel-main"
provider = "kannel"
sender = "1500123"
sendsms_url = "http://127.0.0.1:9/cgi-bin/sendsms"
username = "loket"
password = "kannel-password"
inbound_secret = "env:TEST_KANNEL_SECRET"
allowed_sources = ["{KANNEL_SOURCE}"]
"""


def start_stack(workdir: Path, extra_env: dict[str, str]) -> tuple[LoketStack, TansuBroker, str]:
    broker = TansuBroker.start(log_dir=workdir)
    pg_url = db.create_database("loket_http")
    stack = LoketStack(database_url=pg_url, bootstrap=broker.bootstrap, config_text=CONFIG,
                       workdir=workdir / "loket",
                       extra_env={"TEST_KANNEL_SECRET": KANNEL_SECRET, **extra_env})  # fmt: skip
    try:
        stack.up()
    except BaseException:
        stack.stop()
        broker.stop()
        db.drop_database(pg_url)
        raise
    return stack, broker, pg_url


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoketStack]:
    """No proxy configured, short timeouts and a small connection limit."""
    stack, broker, pg_url = start_stack(tmp_path_factory.mktemp("http-direct"), {
        "LOKET_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "LOKET_HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "LOKET_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    })  # fmt: skip
    yield stack
    stack.stop()
    broker.stop()
    db.drop_database(pg_url)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoketStack]:
    """Behind a reverse proxy on the same host: LOKET_TRUSTED_PROXIES=127.0.0.1."""
    stack, broker, pg_url = start_stack(
        tmp_path_factory.mktemp("http-proxied"), {"LOKET_TRUSTED_PROXIES": "127.0.0.1"}
    )
    yield stack
    stack.stop()
    broker.stop()
    db.drop_database(pg_url)


def kannel_mo(stack: LoketStack, forwarded_for: str) -> httpx.Response:
    query = urllib.parse.urlencode({
        "account": "kannel-main", "secret": KANNEL_SECRET, "from": "081234567890",
        "to": "1500123", "text": "Kartu KIP belum aktif", "id": str(uuid.uuid4()),
    })  # fmt: skip
    return httpx.get(f"{stack.url}/webhooks/sms/kannel?{query}", timeout=10,
                     headers={"X-Forwarded-For": forwarded_for})  # fmt: skip


def log_since(stack: LoketStack, offset: int) -> str:
    return stack.log_path("up").read_bytes()[offset:].decode(errors="replace")


def log_size(stack: LoketStack) -> int:
    return stack.log_path("up").stat().st_size


# --- forwarded headers ------------------------------------------------------------------------


def test_forwarded_for_from_an_untrusted_client_does_not_pass_allowed_sources(
    direct: LoketStack,
) -> None:
    refused = kannel_mo(direct, forwarded_for=KANNEL_SOURCE)
    assert refused.status_code == 403, refused.text
    assert "127.0.0.1" in refused.text  # the TCP peer was judged, not the header


def test_forwarded_for_from_a_trusted_proxy_is_honoured(proxied: LoketStack) -> None:
    accepted = kannel_mo(proxied, forwarded_for=KANNEL_SOURCE)
    assert accepted.status_code == 200, accepted.text
    # A proxy appends the address it saw: a forged entry before it does not help.
    forged = kannel_mo(proxied, forwarded_for=f"{KANNEL_SOURCE}, 192.0.2.7")
    assert forged.status_code == 403 and "192.0.2.7" in forged.text, forged.text


def fail_logins(stack: LoketStack, username: str, addresses: list[str]) -> list[int]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        return [
            client.post(
                "/api/login",
                json={"username": username, "password": f"salah-{n}"},
                headers={"X-Forwarded-For": address},
            ).status_code  # fmt: skip
            for n, address in enumerate(addresses)
        ]


def test_changing_forwarded_for_does_not_reset_the_login_throttle(direct: LoketStack) -> None:
    username = f"guessed-{uuid.uuid4().hex[:8]}"
    password = direct.add_agent(username)
    statuses = fail_logins(direct, username, [f"198.51.100.{n}" for n in range(1, 6)])
    assert statuses == [401] * 5
    blocked = httpx.post(f"{direct.url}/api/login", timeout=30,
                         json={"username": username, "password": password},
                         headers={"X-Forwarded-For": "203.0.113.99"})  # fmt: skip
    assert blocked.status_code == 429, blocked.text


def test_behind_a_trusted_proxy_the_throttle_counts_the_forwarded_address(
    proxied: LoketStack,
) -> None:
    username = f"shared-{uuid.uuid4().hex[:8]}"
    password = proxied.add_agent(username)
    assert fail_logins(proxied, username, ["198.51.100.1"] * 5) == [401] * 5
    login = {"username": username, "password": password}
    same = httpx.post(f"{proxied.url}/api/login", json=login, timeout=30,
                      headers={"X-Forwarded-For": "198.51.100.1"})  # fmt: skip
    assert same.status_code == 429, same.text
    # Another client behind the same proxy is another address.
    other = httpx.post(f"{proxied.url}/api/login", json=login, timeout=30,
                       headers={"X-Forwarded-For": "198.51.100.2"})  # fmt: skip
    assert other.status_code == 200, other.text


# --- slow clients and floods --------------------------------------------------------------------


async def held_for(port: int, head: bytes, trickle: bytes, limit: float) -> tuple[float, bytes]:
    """Send `head`, then `trickle` every 0.2 s; seconds until the server closed, and its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(head)
    answer = b""
    try:
        while time.monotonic() - started < limit:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), timeout=0.2)
            except TimeoutError:
                writer.write(trickle)
                continue
            if not chunk:
                break
            answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started, answer


def test_slow_headers_and_slow_bodies_are_closed_after_their_timeouts(direct: LoketStack) -> None:
    offset = log_size(direct)
    slow_header = b"GET /healthz HTTP/1.1\r\nHost: loket\r\n"
    slow_body = (b"POST /webhooks/sms/kannel?account=kannel-main HTTP/1.1\r\nHost: loket\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n")  # fmt: skip

    async def attack() -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]], int]:
        headers = [held_for(direct.port, slow_header, b"X-Slow: 1\r\n", 10) for _ in range(15)]
        bodies = [held_for(direct.port, slow_body, b"text=x&", 10) for _ in range(15)]
        probe = asyncio.create_task(asyncio.sleep(0.5))
        results = asyncio.gather(asyncio.gather(*headers), asyncio.gather(*bodies))
        await probe
        async with httpx.AsyncClient(base_url=direct.url) as client:
            health = (await client.get("/healthz", timeout=5)).status_code
        by_header, by_body = await results
        return by_header, by_body, health

    by_header, by_body, health = asyncio.run(attack())
    assert health == 200  # the server answers others meanwhile
    for seconds, answer in by_header:
        assert HEADER_TIMEOUT - 0.2 < seconds < HEADER_TIMEOUT + 1.5, seconds
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    for seconds, answer in by_body:
        assert BODY_TIMEOUT - 0.2 < seconds < BODY_TIMEOUT + 1.5, seconds
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    time.sleep(0.5)
    log = log_since(direct, offset)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    assert log.count("request headers not complete within") == 15, log[-3000:]
    assert log.count("request body of POST /webhooks/sms/kannel not complete within") == 15


def refused(sock: socket.socket) -> bytes:
    """What the server sent at once on a connection that has asked nothing yet."""
    sock.settimeout(0.3)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b""


def test_connections_over_the_limit_are_refused_at_once(direct: LoketStack) -> None:
    held = [socket.create_connection(("127.0.0.1", direct.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has taken them all in
        with socket.create_connection(("127.0.0.1", direct.port)) as extra:
            answer = refused(extra)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert (
            refused(held[0]) == b""
        )  # those within the limit are kept (until their headers are due)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: httpx.get(f"{direct.url}/healthz", timeout=5).status_code == 200,
               timeout=5, what="served again")  # fmt: skip


def test_idle_connections_are_closed_and_free_their_place(direct: LoketStack) -> None:
    held = [socket.create_connection(("127.0.0.1", direct.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert all(sock.recv(1) == b"" for sock in held)  # closed by the server, no answer owed
        assert httpx.get(f"{direct.url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()


# --- a client that hangs up -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/webhooks/sms/kannel?account=kannel-main", "/login", "/api/login"],
    ids=["webhook", "console-form", "api-json"],
)
def test_a_client_hanging_up_mid_body_costs_one_log_line(direct: LoketStack, path: str) -> None:
    offset = log_size(direct)
    with socket.create_connection(("127.0.0.1", direct.port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: loket\r\nContent-Length: 5000\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\ntext=half".encode()
        )
        time.sleep(0.3)
    time.sleep(0.7)
    log = log_since(direct, offset)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    lines = [line for line in log.splitlines() if path.split("?")[0] in line]
    assert len(lines) == 1 and "disconnected before sending the whole request" in lines[0], lines
