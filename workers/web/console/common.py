"""The console's shared parts: sessions and CSRF, the role check, forms, rendering."""

from __future__ import annotations

import hmac
import logging
import secrets
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    RedirectResponse,
    Response,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import FormData

from ticketing import agents, roles
from workers.runtime.runtime import Runtime
from workers.web import idempotency
from workers.web.api.auth import SESSION_COOKIE
from workers.web.console.i18n import LANG_COOKIE, LANGUAGES, Translator

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
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

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
# `{{ idempotency_key() }}`: a fresh key each time a form that creates is rendered, so a
# double submit of that form is done once (workers/web/idempotency.py).
templates.globals["idempotency_key"] = idempotency.new_form_key


# --- helpers -------------------------------------------------------------------------------


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def zone_of(request: Request) -> ZoneInfo:
    return ZoneInfo(runtime_of(request).rules.calendar.tz)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "-"


def safe_next(target: str | None) -> str:
    """Only same-site paths: `next=//evil.example` or `https://...` become `/`."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def csrf_token(request: Request) -> str:
    token = request.cookies.get(CSRF_COOKIE)
    if not token:
        token = request.state.__dict__.setdefault("new_csrf", secrets.token_urlsafe(24))
    return token


def set_csrf(request: Request, response: Response) -> None:
    fresh = request.state.__dict__.get("new_csrf")
    if fresh and not request.cookies.get(CSRF_COOKIE):
        response.set_cookie(
            CSRF_COOKIE,
            fresh,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


async def read_form(request: Request) -> FormData:
    """The posted form, after the double-submit check: its `csrf` field must equal the cookie."""
    form = await request.form()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = str(form.get("csrf", ""))
    if not cookie or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise HTTPException(403, "CSRF token missing or wrong; reload the page and try again")
    return form


def form_field(form: FormData, name: str, limit: int = 10_000) -> str:
    value = form.get(name)
    text = value if isinstance(value, str) else ""
    return text.strip()[:limit]


async def session_of(request: Request) -> dict[str, Any] | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    async with runtime_of(request).pool.acquire() as conn:
        return await agents.agent_for_token(conn, token)


class Forbidden(Exception):
    """The agent's role may not do what the page does: answered with a 403 page."""

    def __init__(self, agent: dict[str, Any], permission: str):
        super().__init__(roles.refusal(permission))
        self.agent = agent
        self.permission = permission


# The console's own wording for a refusal, where it has one; otherwise the matrix's.
REFUSAL_KEYS = {"reports.read": "error.forbidden"}


async def forbidden_page(request: Request, exc: Exception) -> HTMLResponse:
    """The 403 page for Forbidden (registered on the app)."""
    assert isinstance(exc, Forbidden)
    t = translator_of(request)
    key = REFUSAL_KEYS.get(exc.permission)
    message = t(key) if key else str(exc)
    return render(request, "error.html", {"message": message}, status=403, agent=exc.agent)


async def login_required(request: Request, permission: str) -> dict[str, Any]:
    """The logged-in agent whose role may do `permission` (ticketing/roles.py); otherwise a
    redirect to the login page that comes back here, or the 403 page."""
    roles.permission(permission)
    agent = await session_of(request)
    if agent is None:
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = "/login?" + urllib.parse.urlencode({"next": here})
        raise HTTPException(303, "login required", headers={"Location": target})
    if not roles.allows(agent["role"], permission):
        raise Forbidden(agent, permission)
    return agent


async def session_agent(request: Request, permission: str) -> dict[str, Any]:
    """As login_required, for what a page fetches (streams, files): 401 and 403, no redirect."""
    agent = await session_of(request)
    if agent is None:
        raise HTTPException(401, "login required")
    if not roles.allows(agent["role"], permission):
        raise HTTPException(403, roles.refusal(permission))
    return agent


def translator_of(request: Request) -> Translator:
    return Translator(request.cookies.get(LANG_COOKIE, ""))


def has_route(request: Request, path: str) -> bool:
    """Whether this installation serves `path` (optional APIs: KB search, ops summary).

    Read from the OpenAPI document, which the app builds once and keeps: included routers
    are not flattened into `app.routes`.
    """
    return path in request.app.openapi().get("paths", {})


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int = 200,
    agent: dict[str, Any] | None = None,
) -> HTMLResponse:  # fmt: skip
    t = translator_of(request)
    zone = zone_of(request)

    def when(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        local = moment.astimezone(zone)
        return f"{local:%d-%m-%Y %H:%M} {local.tzname()}"

    def age(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        seconds = (datetime.now(UTC) - moment).total_seconds()
        return duration(t, seconds)

    def due(moment: datetime | None) -> str:
        if moment is None:
            return "–"
        seconds = (moment - datetime.now(UTC)).total_seconds()
        span = duration(t, abs(seconds))
        return t("due.late", span=span) if seconds < 0 else t("due.in", span=span)

    html = templates.get_template(template).render(
        request=request, t=t, lang=t.lang, languages=LANGUAGES, agent=agent,
        csrf=csrf_token(request), when=when, age=age, due=due,
        path=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        can_report=agent is not None and roles.allows(agent["role"], "reports.read"),
        **context,
    )  # fmt: skip
    response = HTMLResponse(html, status_code=status)
    response.headers["Content-Security-Policy"] = CONSOLE_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    set_csrf(request, response)
    return response


def duration(t: Translator, seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return t("span.minutes", n=max(minutes, 0))
    hours = minutes // 60
    if hours < 48:
        return t("span.hours", n=hours)
    return t("span.days", n=hours // 24)


def redirect_to(target: str) -> RedirectResponse:
    return RedirectResponse(target, status_code=303)
