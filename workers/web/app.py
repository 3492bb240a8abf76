"""The HTTP app: agents' API, webhooks, health and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ticketing.db import migrations_current
from workers.runtime import metrics
from workers.runtime.runtime import Runtime
from workers.web import webhooks
from workers.web.api import auth, desk, kb, ops, tickets
from workers.web.console import common, pages

ReadyCheck = Callable[[], dict[str, bool]]


def create_app(rt: Runtime, stages_ready: ReadyCheck | None = None) -> FastAPI:
    """Assemble the app around a running process's runtime."""
    app = FastAPI(
        title="loket",
        summary="Multichannel contact-center pipeline: agents' API and channel webhooks",
        version="0.1.0",
        # The stock Swagger UI and ReDoc pages load their scripts from a CDN: off. The
        # OpenAPI document stays at /openapi.json for tools.
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = rt
    app.include_router(auth.router)
    app.include_router(tickets.router)
    app.include_router(desk.router)
    app.include_router(kb.router)
    app.include_router(webhooks.router)
    app.include_router(ops.router)
    for console_router in pages.ROUTERS:
        app.include_router(console_router)
    app.add_exception_handler(common.Forbidden, common.forbidden_page)

    @app.exception_handler(asyncpg.DataError)
    async def value_refused(request: Request, exc: asyncpg.DataError) -> JSONResponse:
        """PostgreSQL cannot hold a value the caller sent (a NUL character, say): the request's fault."""
        return JSONResponse({"detail": f"value not accepted: {exc}"}, status_code=422)

    @app.exception_handler(asyncpg.InterfaceError)
    async def database_client_error(request: Request, exc: asyncpg.InterfaceError) -> JSONResponse:
        # asyncpg reports an argument it cannot encode (an integer past int64) as a ValueError
        # among its interface errors; the others mean the database is out of reach.
        if isinstance(exc, ValueError):
            return JSONResponse({"detail": f"value not accepted: {exc}"}, status_code=422)
        return JSONResponse({"detail": "database unavailable, retry later"}, status_code=503)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """200 once migrations ran and the database, broker and stages are up."""
        checks: dict[str, bool] = {}
        try:
            async with rt.pool.acquire(timeout=2) as conn:
                checks["database"] = True
                checks["migrations"] = await migrations_current(conn)
        except Exception:  # noqa: BLE001 - whatever the failure, the answer is "not ready"
            checks["database"] = False
            checks["migrations"] = False
        try:
            await asyncio.wait_for(rt.producer.client.fetch_all_metadata(), timeout=2)
            checks["broker"] = True
        except Exception:  # noqa: BLE001 - any failure means the broker is not reachable
            checks["broker"] = False
        if stages_ready is not None:
            checks.update({f"stage:{name}": ok for name, ok in stages_ready().items()})
        # Records waiting and no commit for LOKET_STALL_SECONDS: the stage is stuck.
        stalled = metrics.stalled_stages(rt.settings.stall_seconds)
        checks.update({f"stalled:{name}": False for name in stalled})
        ready = all(checks.values())
        waited = {name: round(seconds) for name, seconds in stalled.items()}
        document = {"ready": ready, "checks": checks, "stalled": waited}
        return JSONResponse(document, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics_endpoint(request: Request) -> PlainTextResponse:
        """Prometheus exposition of this process's metrics."""
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
