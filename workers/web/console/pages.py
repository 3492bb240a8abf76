"""The agent console: server-rendered pages for the queue, callers and tickets, with live updates."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData

from channels.types import CHANNELS, OUTBOUND_CHANNELS
from ticketing import agents, procedure, replies, roles
from ticketing.callers import IdentityTaken
from ticketing.states import CLOSE_REASONS, STATUSES, TIERS, TransitionError
from workers.pipeline import bus
from workers.runtime.runtime import Runtime
from workers.web import idempotency
from workers.web.api.auth import SESSION_COOKIE, LoginRefused, log_in
from workers.web.console.i18n import LANG_COOKIE, LANGUAGES, Translator

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

_HERE = Path(__file__).resolve().parent
STATIC_DIR = _HERE / "static"
CSRF_COOKIE = "loket_csrf"
PAGE_SIZE = 100
TIMELINE_LIMIT = 300
# An event stream ends after this long and the browser reconnects (EventSource does so by
# itself): a stopping server is never held up for longer by an open console.
STREAM_SECONDS = 15.0
STREAM_KEEPALIVE_SECONDS = 5.0
# The Kafka consumer of a process stops this long after its last console disconnected.
FANOUT_IDLE_SECONDS = 60.0

# What each role sees when it opens the queue without choosing a tier.
ROLE_TIERS: dict[str, str] = {"support": "support", "manager": "management"}
SAFE_INLINE_IMAGES: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}
# Pages render only what the server sent: no inline script, no foreign origin, no framing.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'"
)

_templates = Environment(
    loader=FileSystemLoader(_HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
# `{{ idempotency_key() }}`: a fresh key each time a form that creates is rendered, so a
# double submit of that form is done once (workers/web/idempotency.py).
_templates.globals["idempotency_key"] = idempotency.new_form_key


# --- helpers -------------------------------------------------------------------------------


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def _zone(request: Request) -> ZoneInfo:
    return ZoneInfo(_rt(request).rules.calendar.tz)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "-"


def _safe_next(target: str | None) -> str:
    """Only same-site paths: `next=//evil.example` or `https://...` become `/`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _csrf_token(request: Request) -> str:
    token = request.cookies.get(CSRF_COOKIE)
    if not token:
        token = request.state.__dict__.setdefault("new_csrf", secrets.token_urlsafe(24))
    return token


def _set_csrf(request: Request, response: Response) -> None:
    fresh = request.state.__dict__.get("new_csrf")
    if fresh and not request.cookies.get(CSRF_COOKIE):
        response.set_cookie(
            CSRF_COOKIE,
            fresh,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


async def _form(request: Request) -> FormData:
    """The posted form, after the double-submit check: its `csrf` field must equal the cookie."""
    form = await request.form()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = str(form.get("csrf", ""))
    if not cookie or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    return form


def _field(form: FormData, name: str, limit: int = 10_000) -> str:
    value = form.get(name)
    text = value if isinstance(value, str) else ""
    return text.strip()[:limit]


async def _agent(request: Request) -> dict[str, Any] | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    async with _rt(request).pool.acquire() as conn:
        return await agents.agent_for_token(conn, token)


class Forbidden(Exception):
    """The agent's role may not do what the page does: answered with a 403 page."""

    def __init__(self, agent: dict[str, Any], permission: str):
        super().__init__(roles.refusal(permission))
        self.agent = agent
        self.permission = permission


# The console's own wording for a refusal, where it has one; otherwise the matrix's.
_REFUSAL_KEYS = {"reports.read": "error.forbidden"}


async def forbidden_page(request: Request, exc: Exception) -> HTMLResponse:
    """The 403 page for Forbidden (registered on the app)."""
    assert isinstance(exc, Forbidden)
    t = _translator(request)
    key = _REFUSAL_KEYS.get(exc.permission)
    message = t(key) if key else str(exc)
    return _render(request, "error.html", {"message": message}, status=403, agent=exc.agent)


async def _login_required(request: Request, permission: str) -> dict[str, Any]:
    """The logged-in agent whose role may do `permission` (ticketing/roles.py); otherwise a
    redirect to the login page that comes back here, or the 403 page."""
    roles.permission(permission)
    agent = await _agent(request)
    if agent is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = "/login?" + urllib.parse.urlencode({"next": here})
        raise HTTPException(303, "login required", headers={"Location": target})
    if not roles.allows(agent["role"], permission):
        raise Forbidden(agent, permission)
    return agent


async def _session_agent(request: Request, permission: str) -> dict[str, Any]:
    """As _login_required, for what a page fetches (streams, files): 401 and 403, no redirect."""
    agent = await _agent(request)
    if agent is None:
        raise HTTPException(401, "login required")
    if not roles.allows(agent["role"], permission):
        raise HTTPException(403, roles.refusal(permission))
    return agent


def _translator(request: Request) -> Translator:
    return Translator(request.cookies.get(LANG_COOKIE, ""))


def _has_route(request: Request, path: str) -> bool:
    """Whether this installation serves `path` (optional APIs: KB search, ops summary).

    Read from the OpenAPI document, which the app builds once and keeps: included routers
    are not flattened into `app.routes`.
    """
    return path in request.app.openapi().get("paths", {})


def _render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200,
    agent: dict[str, Any] | None = None,
) -> HTMLResponse:  # fmt: skip
    t = _translator(request)
    zone = _zone(request)

    def when(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        local = moment.astimezone(zone)
        return f"{local:%d-%m-%Y %H:%M} {local.tzname()}"

    def age(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        seconds = (datetime.now(UTC) - moment).total_seconds()
        return _duration(t, seconds)

    def due(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        seconds = (moment - datetime.now(UTC)).total_seconds()
        span = _duration(t, abs(seconds))
        return t("due.late", span=span) if seconds < 0 else t("due.in", span=span)

    html = _templates.get_template(template).render(
        request=request, t=t, lang=t.lang, languages=LANGUAGES, agent=agent,
        csrf=_csrf_token(request), when=when, age=age, due=due,
        path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        has_ops_summary=_has_route(request, "/api/ops/summary"),
        can_report=agent is not None and roles.allows(agent["role"], "reports.read"),
        **context,
    )  # fmt: skip
    response = HTMLResponse(html, status_code=status)
    response.headers["Content-Security-Policy"] = CONSOLE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    _set_csrf(request, response)
    return response


def _duration(t: Translator, seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return t("span.minutes", n=max(minutes, 0))
    hours = minutes // 60
    if hours < 48:
        return t("span.hours", n=hours)
    return t("span.days", n=hours // 24)


def _redirect(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=303)


# --- static files --------------------------------------------------------------------------

_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    """The console's own CSS and JavaScript (no CDN): only files that exist in static/."""
    path = STATIC_DIR / name
    if (
        "/" in name
        or name.startswith(".")
        or not path.is_file()
        or path.suffix not in _STATIC_TYPES
    ):
        raise HTTPException(404, "no such file")
    return FileResponse(
        path, media_type=_STATIC_TYPES[path.suffix],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )  # fmt: skip


# --- login, logout, language ----------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return _render(request, "login.html", {"next": _safe_next(next), "error": None, "username": ""})


@router.post("/login", response_class=HTMLResponse)
async def login_submit(request: Request) -> Response:
    form = await _form(request)
    username = _field(form, "username", 200)
    password = str(form.get("password", ""))[:1000]
    target = _safe_next(_field(form, "next", 2000))
    t = _translator(request)
    address = _client_ip(request)
    context = {"next": target, "username": username}
    rt = _rt(request)
    try:
        _, token = await log_in(rt, username, password, address)
    except LoginRefused as refused:
        if refused.status == 429:
            minutes = max(int((refused.retry_after or 60) // 60) + 1, 1)
            error = t("login.throttled", minutes=minutes)
        elif refused.status == 503:
            error = t("login.busy") if t.has("login.busy") else refused.message
        else:
            error = t("login.wrong")
        response = _render(
            request, "login.html", {**context, "error": error}, status=refused.status
        )
        if refused.retry_after:
            response.headers["Retry-After"] = str(refused.retry_after)
        return response
    redirect = _redirect(target)
    redirect.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="lax", secure=request.url.scheme == "https",
        max_age=int(rt.settings.session_hours * 3600),
    )  # fmt: skip
    return redirect


@router.post("/logout")
async def logout(request: Request) -> Response:
    await _form(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        async with _rt(request).pool.acquire() as conn:
            await agents.end_session(conn, token)
    response = _redirect("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.post("/lang")
async def switch_language(request: Request) -> Response:
    form = await _form(request)
    lang = _field(form, "lang", 10)
    response = _redirect(_safe_next(_field(form, "next", 2000)))
    if lang in LANGUAGES:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 24 * 3600, samesite="lax")
    return response


# --- the queue -----------------------------------------------------------------------------

_OVERDUE = (
    "(t.status <> 'closed' AND (t.resolution_due < now()"
    " OR (t.first_response_at IS NULL AND t.first_response_due < now())))"
)
_NEXT_DUE = (
    "LEAST(CASE WHEN t.first_response_at IS NULL THEN t.first_response_due END, t.resolution_due)"
)


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


async def queue_page(
    conn: asyncpg.Connection, filters: dict[str, str], page: int, agent_id: int
) -> tuple[int, list[dict[str, Any]]]:
    """One page of the queue, most urgent first: overdue, then the nearest deadline."""
    where: list[str] = []
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if filters["status"] == "active":
        where.append("t.status <> 'closed'")
    elif filters["status"] != "all":
        where.append(f"t.status = {arg(filters['status'])}")
    if filters["tier"]:
        where.append(f"t.tier = {arg(filters['tier'])}")
    if filters["channel"]:
        where.append(f"t.channel = {arg(filters['channel'])}")
    if filters["overdue"]:
        where.append(_OVERDUE)
    if filters["assignee"] == "me":
        where.append(f"t.assignee_id = {arg(agent_id)}")
    elif filters["assignee"] == "none":
        where.append("t.assignee_id IS NULL")
    if filters["demo"]:
        where.append(f"t.is_demo = {arg(filters['demo'] == '1')}")
    if filters["q"]:
        pattern = arg(
            "%" + filters["q"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        where.append(
            f"(t.subject ILIKE {pattern} OR EXISTS (SELECT 1 FROM callers qc"
            f" WHERE qc.id = t.caller_id AND qc.name ILIKE {pattern}))"
        )
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    total = await conn.fetchval(f"SELECT count(*) FROM tickets t{clause}", *args)
    order = f"(t.status = 'closed'), {_OVERDUE} DESC, {_NEXT_DUE} NULLS LAST, t.id"
    rows = await conn.fetch(
        f"WITH page AS (SELECT t.*, {_OVERDUE} AS overdue, {_NEXT_DUE} AS next_due,"
        f" row_number() OVER (ORDER BY {order}) AS rank FROM tickets t{clause}"
        f" ORDER BY {order} LIMIT {PAGE_SIZE} OFFSET {arg(page * PAGE_SIZE)})"
        " SELECT p.id, p.caller_id, p.subject, p.status, p.tier, p.channel, p.created_at,"
        " p.last_activity_at, p.next_due, p.overdue, p.is_demo, c.name AS caller_name,"
        " i.contact, m.snippet, ag.username AS assignee"
        " FROM page p JOIN callers c ON c.id = p.caller_id"
        " LEFT JOIN agents ag ON ag.id = p.assignee_id"
        " LEFT JOIN LATERAL (SELECT CASE WHEN kind = 'email' THEN value"
        "   ELSE coalesce(display, value) END AS contact FROM identities"
        "   WHERE caller_id = p.caller_id ORDER BY valid DESC, id LIMIT 1) i ON true"
        " LEFT JOIN LATERAL (SELECT left(coalesce(nullif(body_display, ''), body_text), 160) AS snippet"
        "   FROM messages WHERE ticket_id = p.id AND direction = 'in' ORDER BY id DESC LIMIT 1) m ON true"
        " ORDER BY p.rank",
        *args,
    )
    return int(total), [dict(r) for r in rows]


@router.get("/", response_class=HTMLResponse)
async def queue(request: Request, page: int = 0, partial: str = "") -> HTMLResponse:
    """Every ticket from every channel, filtered, most urgent first, 100 a page."""
    agent = await _login_required(request, "tickets.read")
    params = dict(request.query_params)
    filters = queue_filters(params, agent["role"])
    page = max(page, 0)
    async with _rt(request).pool.acquire() as conn:
        total, tickets = await queue_page(conn, filters, page, agent["id"])
    # The tier is always carried, even empty: "all tiers" chosen must not fall back to the role's default.
    query = {k: v for k, v in filters.items() if v or k == "tier"}
    context = {
        "filters": filters, "tickets": tickets, "total": total, "page": page,
        "pages": max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1), "query": query,
        "statuses": ("active", *STATUSES, "all"), "tiers": TIERS, "channels": CHANNELS,
        "base_query": urllib.parse.urlencode(query),
    }  # fmt: skip
    template = "_queue_table.html" if partial else "queue.html"
    return _render(request, template, context, agent=agent)


# --- live updates --------------------------------------------------------------------------


class EventFanout:
    """One Kafka consumer per process on `loket.events`, without a group, from the end,
    handing every event to each connected console."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.clients: set[asyncio.Queue[bytes]] = set()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.idle_since = time.monotonic()

    def subscribe(self) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=200)
        self.clients.add(queue)
        if self.task is None or self.task.done():
            self.ready.clear()
            self.task = asyncio.create_task(self._run())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes]) -> None:
        self.clients.discard(queue)
        if not self.clients:
            self.idle_since = time.monotonic()

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
        fanout = EventFanout(_rt(request).bootstrap)
        request.app.state.console_events = fanout
    return fanout


def _sse(event: str, payload: bytes) -> bytes:
    # JSON has no raw newlines, so one data line carries the whole event.
    return b"event: " + event.encode() + b"\ndata: " + payload.replace(b"\n", b" ") + b"\n\n"


@router.get("/events/stream")
async def event_stream(request: Request) -> StreamingResponse:
    """Server-Sent Events: every new message as it is stored, for the queue and ticket pages."""
    await _session_agent(request, "tickets.read")
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


# --- callers -------------------------------------------------------------------------------


@router.get("/callers", response_class=HTMLResponse)
async def caller_lookup(request: Request, phone: str = "", q: str = "") -> HTMLResponse:
    """Type a number in any form: the caller's card, or a registration form with it filled in."""
    agent = await _login_required(request, "callers.read")
    phone, q = phone.strip()[:64], q.strip()[:200]
    found: list[dict[str, Any]] | None = None
    normalized = None
    if phone or q:
        async with _rt(request).pool.acquire() as conn:
            found = await procedure.search_callers(conn, phone=phone or None, q=q or None)
        if phone:
            with contextlib.suppress(ValueError):
                normalized = procedure.identity_from_input("phone", phone)
    context = {
        "phone": phone, "q": q, "found": found, "error": None,
        "normalized": normalized.display or normalized.value if normalized else None,
        "form": {"phone": phone, "name": "", "organization": "", "organization_code": "",
                 "region": "", "email": "", "notes": ""},
    }  # fmt: skip
    return _render(request, "callers.html", context, agent=agent)


@router.post("/callers", response_class=HTMLResponse)
async def caller_register(request: Request) -> Response:
    agent = await _login_required(request, "callers.write")
    form = await _form(request)
    t = _translator(request)
    values = {
        name: _field(form, name, limit)
        for name, limit in (("name", 200), ("organization", 300), ("organization_code", 100),
                            ("region", 200), ("phone", 64), ("email", 320), ("notes", 10_000))
    }  # fmt: skip
    error = None
    status = 422
    if not values["name"]:
        error = t("register.need_name")
    else:
        try:
            identities = []
            if values["phone"]:
                identities.append(procedure.identity_from_input("phone", values["phone"]))
            if values["email"]:
                identities.append(procedure.identity_from_input("email", values["email"]))
        except ValueError as exc:
            error = str(exc)
        else:
            fields = procedure.CallerFields(
                name=values["name"], organization=values["organization"] or None,
                organization_code=values["organization_code"] or None,
                region=values["region"] or None, notes=values["notes"] or None,
            )  # fmt: skip
            once = idempotency.from_form(request, agent["id"], form)

            async def work(conn: asyncpg.Connection) -> Response:
                caller_id = await procedure.register_caller(
                    conn, fields, identities, actor=agent["username"], agent_id=agent["id"]
                )
                return _redirect(f"/callers/{caller_id}")

            try:
                return await once.run(_rt(request).pool, work)
            except IdentityTaken as exc:
                error = t("register.taken", value=exc.identity.value, caller_id=exc.caller_id)
            except idempotency.KeyRefused as exc:
                error, status = idempotency.console_message(exc, t.lang), exc.status_code
    context: dict[str, Any] = {"phone": values["phone"], "q": "", "found": [], "error": error,
                               "normalized": None, "form": values}  # fmt: skip
    return _render(request, "callers.html", context, status=status, agent=agent)


@router.get("/callers/{caller_id}", response_class=HTMLResponse)
async def caller_card(request: Request, caller_id: int) -> HTMLResponse:
    agent = await _login_required(request, "callers.read")
    async with _rt(request).pool.acquire() as conn:
        try:
            caller = await procedure.caller_detail(conn, caller_id)
        except procedure.CallerNotFound:
            return _render(request, "error.html", {"message": _translator(request)("error.no_caller")},
                           status=404, agent=agent)  # fmt: skip
    return _render(request, "caller.html", {"caller": caller, "error": None}, agent=agent)


@router.post("/callers/{caller_id}/tickets", response_class=HTMLResponse)
async def caller_new_ticket(request: Request, caller_id: int) -> Response:
    """Open a ticket for the call being taken: the problem as told is its first message."""
    agent = await _login_required(request, "tickets.create")
    form = await _form(request)
    body = _field(form, "body", 100_000)
    channel = _field(form, "channel", 20)
    rt = _rt(request)
    t = _translator(request)
    error, status = t("call.need_body"), 422
    if body and channel in ("phone", "walk_in"):
        once = idempotency.from_form(request, agent["id"], form)

        async def work(conn: asyncpg.Connection) -> Response:
            ticket_id = await procedure.log_contact(
                conn, caller_id=caller_id, channel=channel, subject=_field(form, "subject", 200),
                body=body, actor=agent["username"], agent_id=agent["id"], rules=rt.rules,
            )  # fmt: skip
            return _redirect(f"/tickets/{ticket_id}")

        try:
            return await once.run(rt.pool, work)
        except procedure.CallerNotFound:
            pass  # answered below, as for a form with nothing in it
        except idempotency.KeyRefused as exc:
            error, status = idempotency.console_message(exc, t.lang), exc.status_code
    async with rt.pool.acquire() as conn:
        try:
            caller = await procedure.caller_detail(conn, caller_id)
        except procedure.CallerNotFound:
            return _render(
                request, "error.html", {"message": t("error.no_caller")}, status=404, agent=agent
            )
    return _render(request, "caller.html", {"caller": caller, "error": error}, status=status,
                   agent=agent)  # fmt: skip


# --- tickets -------------------------------------------------------------------------------


async def _timeline(conn: asyncpg.Connection, ticket: dict[str, Any]) -> list[dict[str, Any]]:
    """The caller's messages on every ticket and channel, and this ticket's own events, in order."""
    messages = [
        dict(r)
        for r in await conn.fetch(
            "SELECT * FROM (SELECT m.id, m.ticket_id, m.direction, m.channel, m.account, m.sender,"
            " m.recipient, m.subject, m.body_text, m.body_display, m.body_html, m.status,"
            " m.status_reason, m.auto_reply, m.problems, m.meta, m.created_at, m.received_at, m.sent_at,"
            " t.subject AS ticket_subject FROM messages m JOIN tickets t ON t.id = m.ticket_id"
            " WHERE t.caller_id = $1 ORDER BY m.id DESC LIMIT $2) recent ORDER BY id",
            ticket["caller_id"], TIMELINE_LIMIT,
        )
    ]  # fmt: skip
    files = await conn.fetch(
        "SELECT id, message_id, filename, content_type, size, dropped FROM attachments"
        " WHERE message_id = ANY($1::bigint[]) ORDER BY id",
        [m["id"] for m in messages],
    )
    for message in messages:
        message["kind"] = "message"
        message["at"] = message["received_at"] or message["created_at"]
        message["attachments"] = [dict(f) for f in files if f["message_id"] == message["id"]]
    events = [
        {**dict(r), "kind": "event"}
        for r in await conn.fetch(
            "SELECT id, at, actor, kind AS event_kind, from_status, to_status, from_tier, to_tier,"
            " note, data FROM ticket_events WHERE ticket_id = $1"
            " AND kind NOT IN ('message', 'reply', 'delivery') ORDER BY id",
            ticket["id"],
        )
    ]  # fmt: skip
    return sorted(
        messages + events, key=lambda item: (item["at"], item["kind"] == "event", item["id"])
    )


async def _ticket_context(
    request: Request, ticket_id: int, reply_to: int | None = None
) -> dict[str, Any] | None:
    async with _rt(request).pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT t.*, {_OVERDUE} AS overdue, c.name AS caller_name, c.organization,"
            " ag.username AS assignee FROM tickets t JOIN callers c ON c.id = t.caller_id"
            " LEFT JOIN agents ag ON ag.id = t.assignee_id WHERE t.id = $1",
            ticket_id,
        )
        if row is None:
            return None
        ticket = dict(row)
        agents_list = await conn.fetch(
            "SELECT id, username, display_name FROM agents WHERE active ORDER BY username"
        )
        timeline = await _timeline(conn, ticket)
        identities = await conn.fetch(
            "SELECT kind, value, display FROM identities WHERE caller_id = $1 ORDER BY kind, id",
            ticket["caller_id"],
        )
    inbound = [m for m in timeline if m["kind"] == "message" and m["direction"] == "in"
               and m["ticket_id"] == ticket_id and not m["auto_reply"]]  # fmt: skip
    reply_channels = list(
        dict.fromkeys(m["channel"] for m in reversed(inbound) if m["channel"] in OUTBOUND_CHANNELS)
    )
    answered = next((m for m in inbound if m["id"] == reply_to), None)
    default_channel = (answered or (inbound[-1] if inbound else {})).get("channel") or "phone"
    if default_channel not in reply_channels and default_channel not in ("phone", "walk_in"):
        reply_channels.insert(0, default_channel)
    choices = [*reply_channels, *[c for c in ("phone",) if c not in reply_channels]]
    kb_query = ticket["subject"] if _has_route(request, "/api/kb") else None
    return {
        "ticket": ticket, "timeline": timeline, "identities": [dict(i) for i in identities],
        "agents": [dict(a) for a in agents_list],
        "reply_channels": choices, "reply_channel": default_channel, "close_reasons": CLOSE_REASONS,
        "kb_url": "/api/kb?" + urllib.parse.urlencode({"q": kb_query}) if kb_query else None,
        "error": None, "draft": "",
    }  # fmt: skip


@router.get("/tickets/{ticket_id}", response_class=HTMLResponse)
async def ticket_page(
    request: Request, ticket_id: int, reply_to: int | None = None
) -> HTMLResponse:
    agent = await _login_required(request, "tickets.read")
    context = await _ticket_context(request, ticket_id, reply_to)
    if context is None:
        return _render(request, "error.html", {"message": _translator(request)("error.no_ticket")},
                       status=404, agent=agent)  # fmt: skip
    return _render(request, "ticket.html", context, agent=agent)


async def _ticket_error(
    request: Request,
    agent: dict[str, Any],
    ticket_id: int,
    error: str,
    status: int,
    draft: str = "",
) -> HTMLResponse:
    context = await _ticket_context(request, ticket_id)
    if context is None:
        return _render(request, "error.html", {"message": _translator(request)("error.no_ticket")},
                       status=404, agent=agent)  # fmt: skip
    return _render(
        request,
        "ticket.html",
        {**context, "error": error, "draft": draft},
        status=status,
        agent=agent,
    )


@router.post("/tickets/{ticket_id}/reply", response_class=HTMLResponse)
async def ticket_reply(request: Request, ticket_id: int) -> Response:
    """Answer on the channel of the message being answered, through the API's own function."""
    agent = await _login_required(request, "tickets.reply")
    form = await _form(request)
    body = _field(form, "body", 100_000)
    channel = _field(form, "channel", 20) or None
    if not body:
        return await _ticket_error(
            request, agent, ticket_id, _translator(request)("reply.empty"), 422
        )
    rt = _rt(request)
    once = idempotency.from_form(request, agent["id"], form)

    async def work(conn: asyncpg.Connection) -> Response:
        await replies.create_reply(
            conn, ticket_id, body, agent_id=agent["id"], actor=agent["username"],
            accounts=rt.account_names(), channel=channel,
        )  # fmt: skip
        return _redirect(f"/tickets/{ticket_id}#reply")

    try:
        return await once.run(rt.pool, work)
    except LookupError:
        return await _ticket_error(
            request, agent, ticket_id, _translator(request)("error.no_ticket"), 404
        )
    except replies.ReplyError as exc:
        return await _ticket_error(request, agent, ticket_id, str(exc), 422, draft=body)
    except idempotency.KeyRefused as exc:
        message = idempotency.console_message(exc, _translator(request).lang)
        return await _ticket_error(request, agent, ticket_id, message, exc.status_code, draft=body)


@router.post("/tickets/{ticket_id}/notes", response_class=HTMLResponse)
async def ticket_note(request: Request, ticket_id: int) -> Response:
    """An internal note: on the ticket's event log, never sent to the caller."""
    agent = await _login_required(request, "tickets.note")
    form = await _form(request)
    note = _field(form, "note", 10_000)
    if not note:
        return await _ticket_error(
            request, agent, ticket_id, _translator(request)("note.empty"), 422
        )
    async with _rt(request).pool.acquire() as conn:
        inserted = await conn.fetchval(
            "INSERT INTO ticket_events (ticket_id, actor, agent_id, kind, note)"
            " SELECT id, $2, $3, 'note', $4 FROM tickets WHERE id = $1 RETURNING id",
            ticket_id, agent["username"], agent["id"], note,
        )  # fmt: skip
    if inserted is None:
        return await _ticket_error(
            request, agent, ticket_id, _translator(request)("error.no_ticket"), 404
        )
    return _redirect(f"/tickets/{ticket_id}#notes")


@router.post("/tickets/{ticket_id}/transition", response_class=HTMLResponse)
async def ticket_transition(request: Request, ticket_id: int) -> Response:
    """pend, resume, escalate, close (reason; resolved needs the solution) or reopen."""
    agent = await _login_required(request, "tickets.transition")
    form = await _form(request)
    action = _field(form, "action", 20)
    reason = _field(form, "reason", 20) if action == "close" else ""
    solution = _field(form, "solution", 100_000) if action == "close" else ""
    if reason == "spam" and not roles.allows(agent["role"], "tickets.close_spam"):
        return await _ticket_error(
            request, agent, ticket_id, roles.refusal("tickets.close_spam"), 403
        )
    rt = _rt(request)
    once = idempotency.from_form(request, agent["id"], form)

    async def work(conn: asyncpg.Connection) -> Response:
        await procedure.transition(
            conn, ticket_id, action, actor=agent["username"], agent_id=agent["id"],
            rules=rt.rules, note=_field(form, "note", 10_000) or None,
            solution=solution or None, reason=reason or None,
        )  # fmt: skip
        return _redirect(f"/tickets/{ticket_id}")

    try:
        return await once.run(rt.pool, work)
    except procedure.TicketNotFound:
        return await _ticket_error(
            request, agent, ticket_id, _translator(request)("error.no_ticket"), 404
        )
    except TransitionError as exc:
        return await _ticket_error(request, agent, ticket_id, exc.message, 409)
    except idempotency.KeyRefused as exc:
        message = idempotency.console_message(exc, _translator(request).lang)
        return await _ticket_error(request, agent, ticket_id, message, exc.status_code)


@router.post("/tickets/{ticket_id}/assign", response_class=HTMLResponse)
async def ticket_assign(request: Request, ticket_id: int) -> Response:
    """Give the ticket to an agent: `me`, an agent id, or empty for nobody."""
    agent = await _login_required(request, "tickets.assign")
    form = await _form(request)
    choice = _field(form, "agent_id", 20)
    t = _translator(request)
    if choice == "me":
        assignee: int | None = agent["id"]
    elif choice.isdigit():
        assignee = int(choice)
    elif not choice:
        assignee = None
    else:
        return await _ticket_error(request, agent, ticket_id, t("error.no_agent"), 422)
    async with _rt(request).pool.acquire() as conn:
        try:
            async with conn.transaction():
                await procedure.assign(
                    conn, ticket_id, assignee, actor=agent["username"], agent_id=agent["id"]
                )
        except procedure.TicketNotFound:
            return await _ticket_error(request, agent, ticket_id, t("error.no_ticket"), 404)
        except procedure.AgentNotFound:
            return await _ticket_error(request, agent, ticket_id, t("error.no_agent"), 422)
    return _redirect(f"/tickets/{ticket_id}")


# --- attachments ---------------------------------------------------------------------------


def sniff_image(data: bytes) -> str | None:
    """A raster image type recognized by its first bytes (never SVG, which can carry script)."""
    for magic, content_type in SAFE_INLINE_IMAGES.items():
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _disposition(kind: str, filename: str) -> str:
    ascii_name = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename
    )
    quoted = urllib.parse.quote(filename, safe="")
    return f"{kind}; filename=\"{ascii_name or 'attachment'}\"; filename*=UTF-8''{quoted}"


@router.get("/attachments/{attachment_id}")
async def attachment(request: Request, attachment_id: int, inline: int = 0) -> Response:
    """An attachment as a download; raster images recognized by their bytes may be shown inline."""
    await _session_agent(request, "tickets.read")
    rt = _rt(request)
    async with rt.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT filename, sha256, dropped FROM attachments WHERE id = $1", attachment_id
        )
    if row is None or row["dropped"] or not row["sha256"]:
        raise HTTPException(404, "no such attachment, or it was not kept")
    try:
        data = await asyncio.to_thread(rt.blobs.get, row["sha256"])
    except (FileNotFoundError, ValueError) as exc:
        raise HTTPException(404, "the attachment's content is missing from the blob store") from exc
    image = sniff_image(data)
    show_inline = bool(inline) and image is not None
    return Response(
        data,
        media_type=image if show_inline else "application/octet-stream",
        headers={
            "Content-Disposition": _disposition(
                "inline" if show_inline else "attachment", row["filename"]
            ),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, no-store",
        },
    )


# --- ops and reports -----------------------------------------------------------------------


@router.get("/ops", response_class=HTMLResponse)
async def ops_page(request: Request) -> HTMLResponse:
    """Ops view: shows `GET /api/ops/summary` when this installation has it."""
    agent = await _login_required(request, "ops.read")
    return _render(request, "ops.html", {}, agent=agent)


@router.get("/reports", response_class=HTMLResponse)
async def reports_page(request: Request) -> HTMLResponse:
    """The open report: every ticket not closed, by tier and status (managers and admins)."""
    agent = await _login_required(request, "reports.read")
    async with _rt(request).pool.acquire() as conn:
        report = await procedure.open_report(conn)
    return _render(request, "reports.html", {"report": report}, agent=agent)
