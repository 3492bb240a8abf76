"""Fetching media from provider URLs: only from the platform's hosts, every redirect re-checked, size capped while reading."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from channels.types import ChannelError

DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # LOKET_MAX_ATTACHMENT_BYTES' default
MAX_REDIRECTS = 5
TIMEOUT = httpx.Timeout(15.0, connect=5.0)
# A server that trickles bytes keeps every read under TIMEOUT; this bounds the whole download.
TOTAL_SECONDS = 60.0
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class MediaRefused(Exception):
    """The media will not be fetched, now or later: the attachment is dropped with `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HostRule:
    """One `media_hosts` entry: a host name (it and its subdomains) or an exact host[:port]."""

    host: str  # lower case, without brackets or a trailing dot
    port: int | None = None

    @property
    def is_address(self) -> bool:
        return _address(self.host) is not None


def parse_hosts(entries: Iterable[Any], where: str) -> tuple[HostRule, ...]:
    """Read `media_hosts` entries such as "fbcdn.net", "127.0.0.1:8443", "[::1]:9000".

    Raises ValueError naming `where` for an entry that is not a host, so a typo fails at
    start-up instead of silently dropping every attachment.
    """
    rules = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{where}: media_hosts entries must be non-empty strings")
        text = entry.strip().lower()
        try:
            url = httpx.URL(f"http://{text}/")
        except httpx.InvalidURL as exc:
            raise ValueError(f"{where}: media_hosts entry {entry!r} is not a host: {exc}") from exc
        host = url.host.rstrip(".")
        if url.userinfo or not (_address(host) is not None or _HOST_NAME.fullmatch(host)):
            raise ValueError(f"{where}: media_hosts entry {entry!r} is not a host[:port]")
        rules.append(HostRule(host=host, port=url.port))
    return tuple(rules)


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how large it may be."""

    hosts: tuple[HostRule, ...]
    max_bytes: int = DEFAULT_MAX_BYTES


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _exact_rules(host: str, port: int, hosts: Iterable[HostRule]) -> list[HostRule]:
    """The entries that name exactly this host (and this port, if the entry gives one)."""
    host = host.lower().rstrip(".")
    return [rule for rule in hosts if rule.host == host and rule.port in (None, port)]


def listed_exactly(host: str, port: int, hosts: Iterable[HostRule]) -> bool:
    """Whether an entry names exactly this host (and this port, if the entry gives one)."""
    return bool(_exact_rules(host, port, hosts))


def url_problem(url: httpx.URL, hosts: Iterable[HostRule]) -> str | None:
    """Why `url` may not be fetched under `hosts`, or None when it may (addresses are checked later).

    A host matches an entry exactly, or is a subdomain of a name entry; a subdomain match
    must use https, so media from the platform's CDN cannot be swapped on the way.
    """
    scheme = url.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        return f"scheme {scheme or '(none)'!r} is not http or https"
    host = url.host.lower().rstrip(".")
    if not host:
        return "the URL has no host"
    port = url.port or DEFAULT_PORTS[scheme]
    hosts = tuple(hosts)
    if listed_exactly(host, port, hosts):
        return None
    shown = f"[{host}]" if ":" in host else host
    shown += f":{url.port}" if url.port else ""
    under = [
        rule
        for rule in hosts
        if rule.port is None and not rule.is_address and host.endswith("." + rule.host)
    ]
    if not under:
        return f"host {shown} is not one of the platform's media hosts"
    if scheme != "https":
        return f"host {shown} must be fetched over https"
    return None


# IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it through a
# translator: NAT64 (RFC 6052, RFC 8215) and the deprecated IPv4-compatible form.
_NAT64_PREFIXES = tuple(ipaddress.IPv6Network(p) for p in ("64:ff9b::/96", "64:ff9b:1::/48"))
_IPV4_TAIL_PREFIXES = (*_NAT64_PREFIXES, ipaddress.IPv6Network("::/96"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: mapped, 6to4, Teredo, NAT64, compatible."""
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if int(address) > 1 and any(address in prefix for prefix in _IPV4_TAIL_PREFIXES):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def address_problem(address: Address) -> str | None:
    """Why a resolved address is no place to fetch media from, or None for a public one.

    An IPv6 address that tunnels or translates to an IPv4 one is judged by that one too:
    2002:7f00:1:: (6to4) leads to 127.0.0.1 as surely as 127.0.0.1 does.
    """
    if isinstance(address, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(address):
            problem = address_problem(inner)
            if problem:
                return f"{address} leads to {inner}, and {problem}"
        if any(address in prefix for prefix in _NAT64_PREFIXES):
            return None  # a DNS64 answer for a public address (an IPv6-only network)
        if address.is_site_local:
            return f"{address} is a site-local address"
    if address.is_loopback:
        return f"{address} is a loopback address"
    if address.is_link_local:
        return f"{address} is a link-local address"
    if address.is_private:
        return f"{address} is a private address"
    # 224.0.0.0/4 counts as global to `ipaddress`; it is still nowhere to fetch from.
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return f"{address} is not a unicast address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def trusted_exactly(host: str, port: int, hosts: Iterable[HostRule]) -> bool:
    """Whether an entry names this exact address, or this host with this port.

    Such an entry is the operator pointing at one place (a local platform, an internal
    mirror on its port) and is connected to as written. A bare name entry ("fbcdn.net")
    only says whose media to take: what it resolves to is checked like any other name, so
    a name that starts resolving to 127.0.0.1 reaches nothing inside.
    """
    return any(rule.is_address or rule.port for rule in _exact_rules(host, port, hosts))


async def vetted_address(host: str, port: int, hosts: tuple[HostRule, ...]) -> str:
    """The address to connect to for `host`: resolved once and checked, so what is checked is what is used.

    An exactly listed address or host:port is taken as the operator wrote it
    (`trusted_exactly`); any other host must resolve to public addresses only.
    """
    if trusted_exactly(host, port, hosts):
        return host
    literal = _address(host)
    if literal is not None:
        problem = address_problem(literal)
        if problem:
            raise MediaRefused(f"host {host}: {problem}")
        return host
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise MediaRefused(f"host {host} resolves to {address}, and {problem}")
    if not addresses:
        raise httpcore.ConnectError(f"{host} has no address")
    return str(addresses[0])


class _VettedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to vetted addresses; the pool calls it for every new connection."""

    def __init__(self, hosts: tuple[HostRule, ...]):
        self._hosts = hosts
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await vetted_address(host, port, self._hosts)
        # TLS still verifies the certificate against the URL's host name (httpcore passes it
        # as server_hostname), so connecting by address changes nothing there.
        return await self._inner.connect_tcp(
            address,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise MediaRefused("media is never fetched over a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _VettedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with a connection pool that connects through `_VettedBackend`."""

    def __init__(self, hosts: tuple[HostRule, ...]):
        super().__init__(trust_env=False)
        # httpx takes no network backend, its pool does: a proxy from the environment would
        # make the address checks meaningless, so neither proxies nor env settings apply.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=4,
            keepalive_expiry=5.0,
            network_backend=_VettedBackend(hosts),
        )


@dataclass(frozen=True)
class Media:
    """Downloaded bytes and the type the server gave them."""

    data: bytes
    content_type: str | None


async def fetch(url: str, policy: MediaPolicy) -> Media:
    """GET `url` under `policy`, following at most MAX_REDIRECTS redirects, each checked anew.

    Raises MediaRefused when the media is not to be had (host not allowed, too large,
    HTTP 4xx) and ChannelError (not permanent) when trying again later can help.
    """
    try:
        start = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaRefused(f"not a usable URL: {exc}") from exc
    host = start.host or "?"
    async with httpx.AsyncClient(
        transport=_VettedTransport(policy.hosts), timeout=TIMEOUT, trust_env=False
    ) as client:
        try:
            async with asyncio.timeout(TOTAL_SECONDS):
                return await _follow(client, start, policy)
        except TimeoutError:
            raise ChannelError(
                f"download from {host} took longer than {TOTAL_SECONDS:.0f}s", permanent=False
            ) from None
        except httpx.HTTPError as exc:
            # The URL may carry a token (Telegram) or a signature (CDNs): name the host only.
            raise ChannelError(
                f"download from {host} failed: {type(exc).__name__}", permanent=False
            ) from None


async def _follow(client: httpx.AsyncClient, url: httpx.URL, policy: MediaPolicy) -> Media:
    for hop in range(MAX_REDIRECTS + 1):
        problem = url_problem(url, policy.hosts)
        if problem:
            raise MediaRefused(problem if hop == 0 else f"redirected: {problem}")
        # Identity only: a compressed answer could inflate far past the cap in one chunk.
        request = client.build_request("GET", url, headers={"Accept-Encoding": "identity"})
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise MediaRefused(f"HTTP {status} redirect without a Location")
                try:
                    url = url.join(location)
                except httpx.InvalidURL as exc:
                    raise MediaRefused(f"redirected to an unusable URL: {exc}") from exc
                continue
            if status >= 500 or status == 429:
                raise ChannelError(f"download failed: HTTP {status}", permanent=False)
            if not response.is_success:
                # CDN links expire; the message is kept and the loss noted.
                raise MediaRefused(f"download failed: HTTP {status}")
            return Media(
                await _read_capped(response, policy.max_bytes), response.headers.get("content-type")
            )
        finally:
            await response.aclose()
    raise MediaRefused(f"more than {MAX_REDIRECTS} redirects")


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaRefused(f"answered with Content-Encoding {encoding} although identity was asked")
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise MediaRefused(f"too large: {int(declared)} bytes > limit {max_bytes}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > max_bytes:
            # Stop reading: closing the response drops the rest unread.
            raise MediaRefused(f"too large: over the limit of {max_bytes} bytes, stopped reading")
        chunks.append(chunk)
    return b"".join(chunks)
