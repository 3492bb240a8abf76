"""IMAP mailbox reader: new messages by UID, raw bytes, IDLE waiting; nothing is marked seen."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import aioimaplib

TlsMode = Literal["ssl", "starttls", "none"]

# aioimaplib parses a response recursively, one frame per line; one UID FETCH over a few
# thousand messages overflows the stack, so fetches go out in chunks of this size.
DEFAULT_CHUNK = 100
_FETCH_START = re.compile(rb"^\d+ FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_EMPTY_BODY = re.compile(rb'BODY\[\] (?:""|NIL)')
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_EXISTS = re.compile(rb"^(\d+) EXISTS")
_NEW_MAIL = re.compile(rb"^\d+ (?:EXISTS|RECENT)\b")

ErrorKind = Literal["connect", "tls", "auth", "folder", "timeout", "protocol", "closed"]


class ImapError(Exception):
    """An IMAP operation failed; `reason` says why in words fit for an operator."""

    def __init__(self, reason: str, kind: ErrorKind = "protocol") -> None:
        super().__init__(reason)
        self.reason = reason
        # Lets the caller tell a wrong password (retrying will not help) from an outage.
        self.kind: ErrorKind = kind


@dataclass(frozen=True)
class ImapAccount:
    """Where a mailbox lives and how to log in to it."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    tls: TlsMode = "ssl"
    folder: str = "INBOX"


def _text(lines: list[bytes]) -> str:
    """The printable part of a response, for error messages."""
    return " ".join(
        bytes(line).decode(errors="replace") for line in lines if not isinstance(line, bytearray)
    ).strip()


def _quote(mailbox: str) -> str:
    """An IMAP quoted string, so folder names with spaces survive."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_search(lines: list[bytes]) -> list[int]:
    """The numbers of a SEARCH answer.

    aioimaplib strips `* SEARCH` from the untagged line, so it arrives as `b"3 4 10"`;
    the last line is the tagged completion text and is ignored.
    """
    numbers: list[int] = []
    for line in lines[:-1]:
        if isinstance(line, bytearray):
            continue
        tokens = line.split()
        if tokens[:1] == [b"SEARCH"]:
            tokens = tokens[1:]
        if all(token.isdigit() for token in tokens):
            numbers.extend(int(token) for token in tokens)
    return numbers


def parse_fetch(lines: list[bytes | bytearray]) -> list[tuple[int, bytes]]:
    """Pair each `BODY[]` literal of a UID FETCH answer with its UID.

    aioimaplib hands literal data over as separate `bytearray` lines; the UID may come
    before the literal (`1 FETCH (UID 7 BODY[] {n}`) or after it (` UID 7)`). Untagged
    FETCH answers without a body (flag changes from other sessions) are skipped.
    """
    messages: list[tuple[int, bytes]] = []
    uid: int | None = None
    body: bytes | None = None

    def flush() -> None:
        if uid is not None and body is not None:
            messages.append((uid, body))

    for line in lines:
        if isinstance(line, bytearray):
            body = bytes(line)
            continue
        if _FETCH_START.match(line):
            flush()
            uid, body = None, None
        if uid is None and (match := _UID.search(line)):
            uid = int(match.group(1))
        if body is None and _EMPTY_BODY.search(line):
            body = b""
    flush()
    return messages


class ImapMailbox:
    """One logged-in, selected IMAP folder read by UID."""

    def __init__(
        self,
        account: ImapAccount,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        use_idle: bool = True,
        poll_interval: float = 5.0,
    ) -> None:
        self.account = account
        self.uidvalidity: int = 0
        self.uidnext: int = 0
        self.exists: int = 0
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._use_idle = use_idle
        self._poll_interval = poll_interval
        self._client: aioimaplib.IMAP4 | None = None
        self._lost: str | None = None
        self._highest_uid = 0

    # -- connection ------------------------------------------------------------------------

    async def connect(self) -> int:
        """Connect, log in and select the folder; returns its UIDVALIDITY."""
        account = self.account
        where = f"{account.host}:{account.port}"
        self._lost = None
        context = self._ssl_context or ssl.create_default_context()
        if account.tls == "ssl":
            client: aioimaplib.IMAP4 = aioimaplib.IMAP4_SSL(
                account.host, account.port, timeout=self._timeout, ssl_context=context
            )
        else:
            client = aioimaplib.IMAP4(account.host, account.port, timeout=self._timeout)
        # Bound to this client, so the late close of an earlier connection is ignored.
        client.protocol.conn_lost_cb = functools.partial(self._on_lost, client)
        self._client = client
        try:
            with self._errors(f"connect to {where}", "connect"):
                await client.wait_hello_from_server()
            if account.tls == "starttls":
                await self._starttls(client, context)
            with self._errors(f"log in to {where}", "auth"):
                response = await client.login(account.user, account.password)
            if response.result != "OK":
                raise ImapError(
                    f"login as {account.user} at {where} refused: {_text(response.lines)}", "auth"
                )
            await self._select(client)
        except BaseException:
            self._drop()
            raise
        return self.uidvalidity

    async def _starttls(self, client: aioimaplib.IMAP4, context: ssl.SSLContext) -> None:
        protocol = client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError(f"{self.account.host} does not offer STARTTLS", "tls")
        with self._errors("STARTTLS", "tls"):
            response = await asyncio.wait_for(
                protocol.execute(aioimaplib.Command("STARTTLS", protocol.new_tag())),
                self._timeout,
            )
            if response.result != "OK":
                raise ImapError(f"STARTTLS refused: {_text(response.lines)}", "tls")
            # aioimaplib has no STARTTLS of its own: upgrade the transport under its protocol.
            loop = asyncio.get_running_loop()
            protocol.transport = await asyncio.wait_for(
                loop.start_tls(
                    protocol.transport, protocol, context, server_hostname=self.account.host
                ),
                self._timeout,
            )
            # Capabilities seen before TLS must be discarded (RFC 3501 6.2.1).
            await asyncio.wait_for(protocol.capability(), self._timeout)

    async def _select(self, client: aioimaplib.IMAP4) -> None:
        folder = self.account.folder
        with self._errors(f"select {folder}", "folder"):
            response = await client.select(_quote(folder))
        if response.result != "OK":
            raise ImapError(
                f"folder {folder!r} cannot be selected: {_text(response.lines)}", "folder"
            )
        self.uidvalidity, self.uidnext, self.exists = 0, 0, 0
        for line in response.lines:
            if isinstance(line, bytearray):
                continue
            if match := _UIDVALIDITY.search(line):
                self.uidvalidity = int(match.group(1))
            elif match := _UIDNEXT.search(line):
                self.uidnext = int(match.group(1))
            elif match := _EXISTS.match(line):
                self.exists = int(match.group(1))
        if not self.uidvalidity:
            raise ImapError(f"server sent no UIDVALIDITY for {folder!r}", "protocol")

    def _on_lost(self, client: aioimaplib.IMAP4, exc: Exception | None) -> None:
        """Fail whatever waits on a connection that is gone, instead of waiting for timeouts."""
        if self._client is None or client is not self._client:
            return
        self._lost = f"connection to {self.account.host}:{self.account.port} lost" + (
            f": {exc}" if exc else ""
        )
        protocol = client.protocol
        pending = [protocol.pending_sync_command, *protocol.pending_async_commands.values()]
        for command in pending:
            if command is not None:
                command.close(self._lost.encode(), "BYE")
        protocol.idle_queue.put_nowait([b"connection lost"])

    @contextlib.contextmanager
    def _errors(self, action: str, kind: ErrorKind) -> Iterator[None]:
        """Turn socket, TLS and aioimaplib failures into ImapError."""
        try:
            yield
        except ImapError:
            raise
        except ssl.SSLError as exc:
            raise ImapError(f"{action}: TLS failed: {exc}", "tls") from exc
        except (TimeoutError, aioimaplib.CommandTimeout) as exc:
            raise ImapError(f"{action}: no answer within {self._timeout:.0f}s", "timeout") from exc
        except OSError as exc:
            raise ImapError(f"{action}: {exc.strerror or exc}", "connect") from exc
        except aioimaplib.AioImapException as exc:
            raise ImapError(f"{action}: {exc}", kind) from exc

    def _connected(self) -> aioimaplib.IMAP4:
        if self._lost is not None:
            raise ImapError(self._lost, "closed")
        if self._client is None:
            raise ImapError("mailbox is not connected", "closed")
        return self._client

    def _check(self, response: aioimaplib.Response, action: str) -> None:
        if response.result == "OK":
            return
        if self._lost is not None:
            raise ImapError(f"{action}: {self._lost}", "closed")
        raise ImapError(f"{action} failed: {response.result} {_text(response.lines)}", "protocol")

    # -- reading ---------------------------------------------------------------------------

    async def uids_after(self, last_uid: int) -> list[int]:
        """UIDs above `last_uid` in ascending order."""
        client = self._connected()
        with self._errors("UID SEARCH", "protocol"):
            response = await client.uid_search(f"UID {last_uid + 1}:*", charset=None)
        self._check(response, "UID SEARCH")
        # `n:*` always matches the highest UID, even when it is below n.
        uids = sorted({uid for uid in parse_search(response.lines) if uid > last_uid})
        # The caller has everything up to last_uid, so polling starts above it.
        self._highest_uid = max(self._highest_uid, last_uid, *uids[-1:])
        return uids

    async def fetch(self, uids: list[int]) -> list[tuple[int, bytes]]:
        """Raw RFC 822 bytes of these messages in UID order, leaving their flags alone.

        Messages expunged in the meantime are simply missing from the answer.
        """
        if not uids:
            return []
        client = self._connected()
        message_set = ",".join(str(uid) for uid in sorted(set(uids)))
        with self._errors("UID FETCH", "protocol"):
            # BODY.PEEK[] rather than RFC822/BODY[]: reading must not set \Seen.
            response = await client.uid("fetch", message_set, "(UID BODY.PEEK[])")
        self._check(response, "UID FETCH")
        wanted = set(uids)
        bodies = dict(parse_fetch(response.lines))
        return [(uid, bodies[uid]) for uid in sorted(bodies) if uid in wanted]

    async def fetch_new(
        self, last_uid: int, chunk: int = DEFAULT_CHUNK
    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        """Messages above `last_uid`, as lists of (uid, raw) of at most `chunk`, in UID order."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        uids = await self.uids_after(last_uid)
        for start in range(0, len(uids), chunk):
            batch = await self.fetch(uids[start : start + chunk])
            if batch:
                yield batch

    # -- waiting ---------------------------------------------------------------------------

    # The timeout is the IDLE duration and ends in False, not an error, so it stays a parameter.
    async def wait_for_new(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to `timeout` seconds for new mail; True when the server reported some.

        Uses IDLE when the server offers it, else polls with NOOP and UID SEARCH.
        """
        client = self._connected()
        if self._use_idle and client.has_capability("IDLE"):
            return await self._idle(client, timeout)
        return await self._poll(client, timeout)

    async def _idle(self, client: aioimaplib.IMAP4, seconds: float) -> bool:
        queue = client.protocol.idle_queue
        while not queue.empty():  # pushes left over from an earlier IDLE
            queue.get_nowait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        with self._errors("IDLE", "protocol"):
            idle = await client.idle_start(timeout=seconds)
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    pushed = await client.wait_server_push(timeout=remaining)
                except TimeoutError:
                    return False
                if self._lost is not None:
                    raise ImapError(self._lost, "closed")
                if pushed == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    return False
                if any(isinstance(line, bytes) and _NEW_MAIL.match(line) for line in pushed):
                    return True
        finally:
            if self._lost is None and client.has_pending_idle():
                client.idle_done()
                with self._errors("IDLE DONE", "protocol"):
                    await asyncio.wait_for(idle, self._timeout)

    async def _poll(self, client: aioimaplib.IMAP4, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            with self._errors("NOOP", "protocol"):
                response = await client.noop()
            self._check(response, "NOOP")
            # An EXISTS may have come with an earlier command, so ask by UID as well.
            if await self.uids_after(self._highest_uid):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(self._poll_interval, remaining))

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Log out (best effort) and drop the connection."""
        client = self._client
        if client is None:
            return
        if self._lost is None:
            if client.has_pending_idle():
                client.idle_done()
            # A server that is already gone cannot be logged out of; closing is all that is left.
            with contextlib.suppress(ImapError):
                with self._errors("LOGOUT", "protocol"):
                    await client.logout()
        self._drop()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.protocol.transport is not None:
            client.protocol.transport.close()

    async def __aenter__(self) -> ImapMailbox:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
