"""Static files, login, logout and the language switch."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    Response,
)

from ticketing import agents
from workers.web.api.auth import SESSION_COOKIE, LoginRefused, log_in
from workers.web.console.common import (
    STATIC_DIR,
    client_ip,
    form_field,
    read_form,
    redirect_to,
    render,
    runtime_of,
    safe_next,
    translator_of,
)
from workers.web.console.i18n import LANG_COOKIE, LANGUAGES

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)


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
    return render(request, "login.html", {"next": safe_next(next), "error": None, "username": ""})


@router.post("/login", response_class=HTMLResponse)
async def login_submit(request: Request) -> Response:
    form = await read_form(request)
    username = form_field(form, "username", 200)
    password = str(form.get("password", ""))[:1000]
    target = safe_next(form_field(form, "next", 2000))
    t = translator_of(request)
    address = client_ip(request)
    context = {"next": target, "username": username}
    rt = runtime_of(request)
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
        response = render(request, "login.html", {**context, "error": error}, status=refused.status)
        if refused.retry_after:
            response.headers["Retry-After"] = str(refused.retry_after)
        return response
    redirect = redirect_to(target)
    redirect.set_cookie(
        SESSION_COOKIE, token, httponly=True, samesite="lax", secure=request.url.scheme == "https",
        max_age=int(rt.settings.session_hours * 3600),
    )  # fmt: skip
    return redirect


@router.post("/logout")
async def logout(request: Request) -> Response:
    await read_form(request)
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        async with runtime_of(request).pool.acquire() as conn:
            await agents.end_session(conn, token)
    response = redirect_to("/login")
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.post("/lang")
async def switch_language(request: Request) -> Response:
    form = await read_form(request)
    lang = form_field(form, "lang", 10)
    response = redirect_to(safe_next(form_field(form, "next", 2000)))
    if lang in LANGUAGES:
        response.set_cookie(LANG_COOKIE, lang, max_age=365 * 24 * 3600, samesite="lax")
    return response
