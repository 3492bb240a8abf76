"""The queue, and its live updates from the events topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
    StreamingResponse,
)

from channels.types import CHANNELS
from ticketing import views
from ticketing.states import STATUSES, TIERS
from workers.pipeline import bus
from workers.web.console.common import (
    FANOUT_IDLE_SECONDS,
    PAGE_SIZE,
    ROLE_TIERS,
    STREAM_KEEPALIVE_SECONDS,
    STREAM_SECONDS,
    login_required,
    render,
    runtime_of,
    session_agent,
)
from workers.web.console.ops import pipeline_alerts

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


# --- the queue -----------------------------------------------------------------------------


def queue_filters(params: dict[str, str], role: str) -> dict[str, str]:
    """The filters a queue request asks for, with the role's default tier when none is chosen."""
    status = params.get("status", "active")
    tier = params["tier"] if "tier" in params else ROLE_TIERS.get(role, "")
    return {
        "status": status if status in ("active", "all", *STATUSES) else "active",
        "tier": tier if tier in TIERS else "",
        "channel": params.get("channel", "") if params.get("channel") in CHANNELS else "",
        "overdue": "1" if params.get("overdue") in ("1", "on", "true") else "",
        "assignee": params.get("assignee", "") if params.get("assignee") in ("me", "none") else "",
        "demo": params.get("demo", "") if params.get("demo") in ("0", "1") else "",
        "q": params.get("q", "").strip()[:200],
    }


@router.get("/", response_class=HTMLResponse)
async def queue(request: Request, page: int = 0, partial: str = "") -> HTMLResponse:
    """Every ticket from every channel, filtered, most urgent first, 100 a page."""
    agent = await login_required(request, "tickets.read")
    params = dict(request.query_params)
    filters = queue_filters(params, agent["role"])
    page = max(page, 0)
    rt = runtime_of(request)
    async with rt.pool.acquire() as conn:
        total, tickets = await views.queue_page(conn, filters, page, agent["id"], PAGE_SIZE)
        alerts = [] if partial else await pipeline_alerts(rt, conn)
    # The tier is always carried, even empty: "all tiers" chosen must not fall back to the role's default.
    query = {k: v for k, v in filters.items() if v or k == "tier"}
    context = {
        "filters": filters, "tickets": tickets, "total": total, "page": page,
        "pages": max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1), "query": query,
        "statuses": ("active", *STATUSES, "all"), "tiers": TIERS, "channels": CHANNELS,
        "base_query": urllib.parse.urlencode(query), "alerts": alerts,
    }  # fmt: skip
    template = "_queue_table.html" if partial else "queue.html"
    return render(request, template, context, agent=agent)


# --- live updates --------------------------------------------------------------------------


# Put on every console's queue at shutdown: the stream ends.
CLOSING = bytes(bytearray(b"closing"))  # a new object: `is` tells it from any event


class EventFanout:
    """One Kafka consumer per process on `loket.events`, without a group, from the end,
    handing every event to each connected console."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.clients: set[asyncio.Queue[bytes]] = set()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.idle_since = time.monotonic()
        self.closed = False

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=200)
        self.clients.add(queue)
        if self.closed:
            queue.put_nowait(CLOSING)
        elif self.task is None or self.task.done():
            self.ready.clear()
            self.task = asyncio.create_task(self._run())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self.clients.discard(queue)
        if not self.clients:
            self.idle_since = time.monotonic()

    async def close(self) -> None:
        """At shutdown, before the broker goes: end every console's stream (the browser
        reconnects to whichever loket answers next) and stop the consumer."""
        self.closed = True
        for queue in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(CLOSING)
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def _idle(self) -> bool:
        return not self.clients and time.monotonic() - self.idle_since > FANOUT_IDLE_SECONDS

    async def _run(self) -> None:
        delay = 1.0
        while not self._idle():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="latest",
            )  # fmt: skip
            try:
                await consumer.start()
                partitions = await self._partitions(consumer)
                consumer.assign(partitions)
                for partition, offset in (await consumer.end_offsets(partitions)).items():
                    consumer.seek(partition, offset)
                self.ready.set()
                delay = 1.0
                while not self._idle():
                    batches = await consumer.getmany(timeout_ms=1000, max_records=500)
                    for records in batches.values():
                        for record in records:
                            self._fan_out(record.value or b"{}")
            except (bus.KafkaError, OSError) as exc:
                log.warning("console events: %s; retrying in %.0fs", exc, delay)
                self.ready.set()  # consoles still work, only without live updates
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            finally:
                await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        await consumer.topics()  # fetches the cluster metadata
        numbers = consumer.partitions_for_topic(bus.EVENTS) or set()
        if not numbers:
            raise bus.KafkaError(f"topic {bus.EVENTS} has no partitions yet")
        return [TopicPartition(bus.EVENTS, n) for n in sorted(numbers)]

    def _fan_out(self, value: bytes) -> None:
        for queue in list(self.clients):
            with contextlib.suppress(
                asyncio.QueueFull
            ):  # a stalled browser misses updates, no one else
                queue.put_nowait(value)


def _fanout(request: Request) -> EventFanout:
    fanout: EventFanout | None = getattr(request.app.state, "console_events", None)
    if fanout is None:
        fanout = EventFanout(runtime_of(request).bootstrap)
        request.app.state.console_events = fanout
    return fanout


def _sse(event: str, payload: bytes) -> bytes:
    # JSON has no raw newlines, so one data line carries the whole event.
    return b"event: " + event.encode() + b"\ndata: " + payload.replace(b"\n", b" ") + b"\n\n"


@router.get("/events/stream")
async def event_stream(request: Request) -> StreamingResponse:
    """Server-Sent Events: every new message as it is stored, for the queue and ticket pages."""
    await session_agent(request, "tickets.read")
    fanout = _fanout(request)
    queue = fanout.subscribe()

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fanout.ready.wait(), timeout=10)
            # Whatever arrived before this stream started is fetched by the page on "ready".
            yield _sse("ready", b"{}")
            deadline = time.monotonic() + STREAM_SECONDS
            while (left := deadline - time.monotonic()) > 0:
                try:
                    value = await asyncio.wait_for(
                        queue.get(), timeout=min(left, STREAM_KEEPALIVE_SECONDS)
                    )
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if value is CLOSING:
                    return
                yield _sse("message", _event_summary(value))
        finally:
            fanout.unsubscribe(queue)

    return StreamingResponse(
        stream(), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )  # fmt: skip


def _event_summary(value: bytes) -> bytes:
    """Only the ids a page needs, so nothing a caller wrote travels on the stream."""
    try:
        event = json.loads(value)
    except ValueError:
        return b"{}"
    if not isinstance(event, dict):
        return b"{}"
    keep = {
        k: event[k] for k in ("type", "ticket_id", "caller_id", "channel", "outcome") if k in event
    }
    return json.dumps(keep).encode()
