"""Offering the messages: to the raw topic, through the webhook from a client process, or as a mailbox backlog."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import httpx

from channels.types import RawInbound
from workers.pipeline import intake
from workers.runtime.embedded import free_port
from workers.runtime.runtime import Runtime
from workers.tools.bench.options import (
    BENCH_ACCOUNT,
    BenchError,
    BenchOptions,
    body_for,
    sender_for,
)

# -- offering messages -------------------------------------------------------------------


async def paced(count: int, rate: float | None, offer: Callable[[int], Awaitable[None]]) -> None:
    """Call `offer(i)` for every message, on schedule when a rate is given (open loop)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        if rate:
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await offer(i)


async def offer_raw(rt: Runtime, opts: BenchOptions, run_id: str) -> None:
    """Publish SMS messages to the raw topic, as an adapter does, keeping many sends in flight."""
    in_flight: list[asyncio.Future[Any]] = []

    async def offer(i: int) -> None:
        raw = RawInbound(
            channel="sms", account=BENCH_ACCOUNT, external_id=f"bench-{run_id}-{i}",
            sender=sender_for(i % opts.callers), body_text=body_for(i, opts.size),
            meta={"gateway": "bench"},
        )  # fmt: skip
        in_flight.append(await intake.send_inbound(rt, raw))
        if len(in_flight) >= 1000:
            await asyncio.gather(*in_flight)
            in_flight.clear()

    await paced(opts.messages, opts.rate, offer)
    await asyncio.gather(*in_flight)


def kannel_entry(secret: str) -> dict[str, Any]:
    """A Kannel account for the webhook path; its sendsms URL is never called by the bench."""
    return {
        "name": BENCH_ACCOUNT, "provider": "kannel", "sender": "1500123",
        "sendsms_url": "http://127.0.0.1:9/cgi-bin/sendsms", "username": "bench",
        "password": secret, "inbound_secret": secret,
    }  # fmt: skip


@contextlib.asynccontextmanager
async def webhook_server(rt: Runtime) -> AsyncIterator[str]:
    """The loket HTTP app on a free loopback port, served from this process."""
    import uvicorn

    from workers.web.app import create_app
    from workers.web.server import server_config

    port = free_port()
    config = server_config(create_app(rt), rt.settings, "127.0.0.1", port)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[attr-defined,method-assign]
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def offer_webhook(base_url: str, secret: str, opts: BenchOptions, run_id: str) -> None:
    """Kannel MO calls (form POSTs) to /webhooks/sms/kannel from `concurrency` lanes.

    Each lane has its own one-connection client: one shared pool of many connections costs
    httpx more CPU than the server spends, and the server shares this process.
    """
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=opts.concurrency * 4)
    failures: list[str] = []
    lanes = max(1, opts.concurrency)

    async def lane() -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
            while (i := await queue.get()) is not None:
                form = {
                    "secret": secret, "from": sender_for(i % opts.callers), "to": "1500123",
                    "text": body_for(i, opts.size), "id": f"bench-{run_id}-{i}",
                }  # fmt: skip
                for attempt in range(5):
                    response = await client.post("/webhooks/sms/kannel", data=form)
                    if response.status_code == 200:
                        break
                    if response.status_code != 503:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        break
                    await asyncio.sleep(0.1 * (attempt + 1))
                else:
                    failures.append("503 five times")

    workers = [asyncio.create_task(lane()) for _ in range(lanes)]
    await paced(opts.messages, opts.rate, queue.put)
    for _ in workers:
        await queue.put(None)
    await asyncio.gather(*workers)
    if failures:
        raise BenchError(f"{len(failures)} webhook calls failed, e.g. {failures[0]}")


async def run_webhook_client(base_url: str, secret: str, opts: BenchOptions, run_id: str) -> None:
    """`offer_webhook` in a child process, so the load generator does not share the server's loop."""
    spec = {
        "base_url": base_url, "secret": secret, "run_id": run_id,
        "options": {"messages": opts.messages, "callers": opts.callers, "size": opts.size,
                    "rate": opts.rate, "concurrency": opts.concurrency},
    }  # fmt: skip
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from workers.tools.bench.traffic import webhook_client_main; webhook_client_main()",
        stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    # The secret goes through stdin, never the command line.
    _, errors = await child.communicate(json.dumps(spec).encode())
    if child.returncode != 0:
        raise BenchError(f"the webhook client failed: {errors.decode(errors='replace')[-2000:]}")


def webhook_client_main() -> None:
    """Entry of the webhook load-generator process (spec as one JSON line on stdin)."""
    spec = json.loads(sys.stdin.readline())
    opts = BenchOptions(**spec["options"])
    asyncio.run(offer_webhook(spec["base_url"], spec["secret"], opts, spec["run_id"]))


# -- e-mail backlog ----------------------------------------------------------------------


def imap_connect(opts: BenchOptions) -> imaplib.IMAP4:
    client: imaplib.IMAP4
    if opts.imap_tls == "ssl":
        client = imaplib.IMAP4_SSL(opts.imap_host, opts.imap_port, timeout=30)
    else:
        client = imaplib.IMAP4(opts.imap_host, opts.imap_port, timeout=30)
        if opts.imap_tls == "starttls":
            client.starttls()
    client.login(opts.imap_user, opts.imap_password)
    return client


def mail_for(index: int, run_id: str, opts: BenchOptions) -> bytes:
    message = EmailMessage()
    caller = index % opts.callers
    message["From"] = f"Pelapor {caller} <pelapor{caller}@sekolah.example.id>"
    message["To"] = f"{opts.imap_user}@helpdesk.example.org"
    message["Subject"] = f"Laporan {index}"
    message["Message-ID"] = f"<bench.{run_id}.{index}@sekolah.example.id>"
    message.set_content(body_for(index, opts.size) + "\n")
    return message.as_bytes()


def fill_mailbox(opts: BenchOptions, run_id: str) -> tuple[int, int]:
    """Append messages until the folder holds at least `opts.email`; returns (appended, held)."""
    client = imap_connect(opts)
    try:
        folder = '"' + opts.imap_folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
        status, data = client.select(folder, readonly=True)
        if status != "OK":
            raise BenchError(f"cannot open IMAP folder {opts.imap_folder}: {data!r}")
        held = int(data[0] or 0)
        missing = max(0, opts.email - held)
        for i in range(missing):
            status, answer = client.append(folder, None, None, mail_for(i, run_id, opts))
            if status != "OK":
                raise BenchError(f"IMAP APPEND failed: {answer!r}")
        return missing, held + missing
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()
