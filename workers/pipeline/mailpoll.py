"""IMAP pull channel: fetch new mail, publish it raw, advance the cursor only after the broker's ack.

The cursor per account and folder holds UIDVALIDITY, the last UID the broker acknowledged
(`acked`), and the last UID below which every published message is in the database
(`committed`). A restart resumes after `committed`: fetching a message twice is harmless
(natural key), losing one is not, and an in-memory broker may have lost what it acked.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from channels.blobs import DiskBlobStore
from channels.email import parse_email
from channels.email.imap import ImapAccount, ImapError, ImapMailbox
from channels.email.smtp import EmailAccount
from channels.types import RawInbound
from ticketing import cursors, health
from ticketing.db import is_transient
from workers.pipeline import bus, intake
from workers.runtime import metrics
from workers.runtime.runtime import Runtime

log = logging.getLogger(__name__)

# A message published this long ago and still not in the database was shunted or is
# stuck; stop holding the watermark back for it (the shunt replays it).
_GIVE_UP_SECONDS = 600.0
# Messages per UID FETCH (aioimaplib's recursive response parser limits it).
_FETCH_CHUNK = 100
# A fetched chunk at least this big is parsed in worker processes: a backlog then parses
# on every core, and the blob store's file writes (which stall while the disk's journal
# commits) stop holding up the event loop. A trickle of new mail parses inline.
_POOL_MIN_CHUNK = 16
# Chunks fetched, parsed and waiting to be published at once; publishing stays in UID order.
_PIPELINE_DEPTH = 4

_pools: dict[str, ProcessPoolExecutor] = {}
_worker_blobs: DiskBlobStore | None = None


def _worker_init(blob_root: str) -> None:
    global _worker_blobs
    _worker_blobs = DiskBlobStore(blob_root)


def _parse_chunk(
    datas: list[bytes], account: str, max_attachment_bytes: int, channel: str
) -> list[RawInbound]:
    """`parse_email` over a chunk, in a worker process (the blob store is a shared directory)."""
    assert _worker_blobs is not None
    return [
        parse_email(
            data,
            account=account,
            external_id="",
            blobs=_worker_blobs,
            max_attachment_bytes=max_attachment_bytes,
            channel=channel,
        )
        for data in datas
    ]


def _parse_pool(blob_root: str) -> ProcessPoolExecutor:
    """The worker processes that parse mail stored under `blob_root`, shared by all pollers."""
    pool = _pools.get(blob_root)
    if pool is None:
        # spawn, not fork: the poller's process runs threads (Kafka, asyncpg) whose locks a
        # forked child could inherit held.
        pool = ProcessPoolExecutor(
            max_workers=max(1, min(4, os.cpu_count() or 1)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(blob_root,),
        )
        _pools[blob_root] = pool
    return pool


def _drop_pool(blob_root: str, pool: ProcessPoolExecutor) -> None:
    if _pools.get(blob_root) is pool:
        del _pools[blob_root]
    pool.shutdown(wait=False, cancel_futures=True)


def external_id_for(message_id: str | None, folder: str, uidvalidity: int, uid: int) -> str:
    """The natural key of a mail: its Message-ID, else its place in the mailbox."""
    if message_id:
        cleaned = message_id.strip()
        if 3 <= len(cleaned) <= 250 and " " not in cleaned:
            return cleaned
    return f"uid:{folder}:{uidvalidity}:{uid}"


@dataclass
class MailCursor:
    uidvalidity: int
    acked: int = 0
    committed: int = 0
    pending: dict[int, tuple[str, float]] = field(
        default_factory=dict
    )  # uid -> (external id, published at)

    def as_json(self) -> dict[str, int]:
        return {"uidvalidity": self.uidvalidity, "acked": self.acked, "committed": self.committed}


RawHook = Callable[[RawInbound, dict[str, Any]], RawInbound]


class MailPoller:
    """One mailbox of one account (`channel` is "email" or "fax"), published to `topic`."""

    def __init__(
        self,
        rt: Runtime,
        account: EmailAccount,
        *,
        channel: str = "email",
        prepare: RawHook | None = None,
        poll_seconds: float | None = None,
        topic: str = bus.RAW,
    ):
        self.rt = rt
        self.account = account
        self.channel = channel
        self.topic = topic  # faxes go to bus.FAX for OCR first
        self.prepare = prepare  # channel-specific touches (fax number, OCR hand-off)
        self.poll_seconds = poll_seconds or rt.settings.imap_poll_seconds
        self.scope = account.imap_folder
        self.connected = False
        self.last_error: str | None = None

    def _imap_account(self) -> ImapAccount:
        a = self.account
        return ImapAccount(
            host=a.imap_host,
            port=a.imap_port,
            user=a.imap_user,
            password=a.imap_password,
            tls=a.imap_tls,
            folder=a.imap_folder,
        )

    async def _load_cursor(self, uidvalidity: int) -> MailCursor:
        async with self.rt.pool.acquire() as conn:
            stored = await cursors.load(conn, self.channel, self.account.name, self.scope)
        if not stored or stored.get("uidvalidity") != uidvalidity:
            if stored:
                log.warning(
                    "%s/%s: UIDVALIDITY changed (%s -> %s); reading the folder again",
                    self.channel,
                    self.account.name,
                    stored.get("uidvalidity"),
                    uidvalidity,
                )
            return MailCursor(uidvalidity)
        committed = int(stored.get("committed", 0))
        return MailCursor(uidvalidity, acked=committed, committed=committed)

    async def _save_cursor(self, cursor: MailCursor) -> None:
        async with self.rt.pool.acquire() as conn:
            await cursors.save(conn, self.channel, self.account.name, cursor.as_json(), self.scope)

    async def _advance_committed(self, cursor: MailCursor) -> None:
        """Move `committed` up to just below the oldest published message not yet in the database."""
        if cursor.pending:
            async with self.rt.pool.acquire() as conn:
                stored = await cursors.stored_ids(
                    conn, self.channel, self.account.name, [e for e, _ in cursor.pending.values()]
                )
            now = time.time()
            for uid, (ext, published) in list(cursor.pending.items()):
                if ext in stored or now - published > _GIVE_UP_SECONDS:
                    del cursor.pending[uid]
        cursor.committed = (min(cursor.pending) - 1) if cursor.pending else cursor.acked
        await self._save_cursor(cursor)

    def _parse_inline(self, chunk: list[tuple[int, bytes]]) -> list[RawInbound]:
        return [
            parse_email(
                data,
                account=self.account.name,
                external_id="",
                blobs=self.rt.blobs,
                max_attachment_bytes=self.rt.settings.max_attachment_bytes,
                channel=self.channel,
            )
            for _, data in chunk
        ]

    def _parse(self, chunk: list[tuple[int, bytes]]) -> asyncio.Future[list[RawInbound]]:
        """The chunk's parsed mails, from the worker processes when the chunk is big enough."""
        loop = asyncio.get_running_loop()
        if len(chunk) < _POOL_MIN_CHUNK or not isinstance(self.rt.blobs, DiskBlobStore):
            done: asyncio.Future[list[RawInbound]] = loop.create_future()
            done.set_result(self._parse_inline(chunk))
            return done
        root = str(self.rt.blobs.root)
        pool = _parse_pool(root)
        try:
            return loop.run_in_executor(
                pool,
                _parse_chunk,
                [data for _, data in chunk],
                self.account.name,
                self.rt.settings.max_attachment_bytes,
                self.channel,
            )
        except (BrokenProcessPool, RuntimeError):
            _drop_pool(root, pool)
            done = loop.create_future()
            done.set_result(self._parse_inline(chunk))
            return done

    async def _parsed(
        self, chunk: list[tuple[int, bytes]], parsing: Awaitable[list[RawInbound]]
    ) -> list[RawInbound]:
        try:
            return await parsing
        except BrokenProcessPool:
            # A worker died (killed, out of memory): parse here, as without workers.
            log.warning(
                "%s/%s: a mail parser process died; parsing in the poller",
                self.channel,
                self.account.name,
            )
            if isinstance(self.rt.blobs, DiskBlobStore):
                root = str(self.rt.blobs.root)
                pool = _pools.get(root)
                if pool is not None:
                    _drop_pool(root, pool)
            return self._parse_inline(chunk)

    def _to_raw(self, uid: int, raw: RawInbound, cursor: MailCursor) -> RawInbound:
        raw.external_id = external_id_for(
            raw.headers.get("message-id"), self.scope, cursor.uidvalidity, uid
        )
        raw.meta["imap_uid"] = str(uid)
        if self.prepare is not None:
            raw = self.prepare(raw, {"uid": uid})
        return raw

    async def sync(self, mailbox: ImapMailbox, cursor: MailCursor) -> int:
        """Fetch and publish everything after the cursor; returns how many were published.

        Fetching and parsing run ahead of publishing by a few chunks; chunks are published
        and acknowledged one after the other in UID order, so `acked` only ever covers
        messages the broker acknowledged.
        """
        published = 0
        ahead: deque[tuple[list[tuple[int, bytes]], asyncio.Future[list[RawInbound]]]] = deque()
        try:
            async for chunk in mailbox.fetch_new(cursor.acked, chunk=_FETCH_CHUNK):
                ahead.append((chunk, self._parse(chunk)))
                if len(ahead) >= _PIPELINE_DEPTH:
                    published += await self._publish(*ahead.popleft(), cursor)
            while ahead:
                published += await self._publish(*ahead.popleft(), cursor)
        finally:
            for _, parsing in ahead:
                if parsing.done() and not parsing.cancelled():
                    parsing.exception()  # retrieved: these chunks are fetched again next time
                parsing.cancel()
        return published

    async def _publish(
        self,
        chunk: list[tuple[int, bytes]],
        parsing: asyncio.Future[list[RawInbound]],
        cursor: MailCursor,
    ) -> int:
        parsed = await self._parsed(chunk, parsing)
        raws = [self._to_raw(uid, raw, cursor) for (uid, _), raw in zip(chunk, parsed, strict=True)]
        # Fitted to the text budget there: a huge body would make a record the broker
        # refuses, and the mailbox would stall on it.
        await intake.publish_inbound(self.rt, raws, topic=self.topic)
        now = time.time()
        for (uid, _), raw in zip(chunk, raws, strict=True):
            cursor.pending[uid] = (raw.external_id, now)
        cursor.acked = max(cursor.acked, chunk[-1][0])
        await self._save_cursor(cursor)
        return len(raws)

    async def run(self, stop: asyncio.Event) -> None:
        delay = 1.0
        while not stop.is_set():
            mailbox = ImapMailbox(self._imap_account())
            try:
                uidvalidity = await mailbox.connect()
                self.connected, self.last_error = True, None
                cursor = await self._load_cursor(uidvalidity)
                epoch = self.rt.broker_epoch
                delay = 1.0
                while not stop.is_set():
                    if self.rt.broker_epoch != epoch:
                        # The broker came back empty: what it acknowledged may be gone, so
                        # read again from what the database has (the cursor's `committed`).
                        log.warning(
                            "%s/%s: the broker was reset; resuming from the committed cursor",
                            self.channel,
                            self.account.name,
                        )
                        break
                    await self.sync(mailbox, cursor)
                    await self._advance_committed(cursor)
                    metrics.channel_ok(self.channel, self.account.name, time.time())
                    await health.note_channel_ok(self.rt.pool, self.channel, self.account.name)
                    if await mailbox.wait_for_new(
                        timeout=min(self.poll_seconds, 5.0) if not cursor.pending else 1.0
                    ):
                        continue
            except (ImapError, OSError, TimeoutError, bus.KafkaError) as exc:
                await self._down(exc)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                await self._down(exc)
            finally:
                await mailbox.close()
            if not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)

    async def _down(self, exc: BaseException) -> None:
        self.connected, self.last_error = False, f"{type(exc).__name__}: {exc}"
        metrics.channel_down(self.channel, self.account.name)
        log.warning("%s/%s: %s", self.channel, self.account.name, self.last_error)
        await health.note_channel_down(
            self.rt.pool, self.channel, self.account.name, self.last_error
        )
