"""The knowledge base over HTTP: search, write and publish articles, usage, suggestions, the KB report."""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from ticketing import kb, views
from workers.web.api.auth import CurrentAgent, ensure_allowed, require, runtime

router = APIRouter(prefix="/api")


class Article(BaseModel):
    id: int
    problem: str
    solution: str
    tags: list[str]
    language: Literal["id", "en"]
    status: Literal["draft", "published", "retired"]
    source_ticket_id: int | None
    author_agent_id: int | None
    edited_agent_id: int | None
    usage_count: int
    created_at: datetime
    updated_at: datetime
    published_at: datetime | None
    retired_at: datetime | None


class SearchHit(BaseModel):
    id: int
    problem: str
    solution: str
    score: float
    snippet: str = Field(description="HTML-escaped text with the matching words in <mark> tags")
    tags: list[str]
    language: Literal["id", "en"]
    status: Literal["draft", "published", "retired"]
    usage_count: int
    source_ticket_id: int | None


class ArticleIn(BaseModel):
    problem: str = Field(min_length=1, max_length=kb.PROBLEM_MAX)
    solution: str = Field(min_length=1, max_length=kb.SOLUTION_MAX)
    tags: list[Annotated[str, Field(max_length=kb.TAG_MAX)]] = Field(
        default_factory=list, max_length=20
    )
    language: Literal["id", "en"] | None = None


class ArticlePatch(BaseModel):
    problem: str | None = Field(default=None, min_length=1, max_length=kb.PROBLEM_MAX)
    solution: str | None = Field(default=None, min_length=1, max_length=kb.SOLUTION_MAX)
    tags: list[Annotated[str, Field(max_length=kb.TAG_MAX)]] | None = Field(
        default=None, max_length=20
    )
    language: Literal["id", "en"] | None = None
    status: Literal["draft", "published", "retired"] | None = None


class UsedIn(BaseModel):
    ticket_id: int


class Usage(BaseModel):
    article_id: int
    ticket_id: int
    usage_count: int


class Suggestion(BaseModel):
    id: int
    problem: str
    solution: str
    tags: list[str]
    language: Literal["id", "en"]
    usage_count: int
    score: float
    rank: int
    suggested_at: datetime


class TagCount(BaseModel):
    tag: str
    tickets: int
    escalated: int


class ProblemCount(BaseModel):
    article_id: int
    problem: str
    tags: list[str]
    tickets: int
    escalated: int


class KbReport(BaseModel):
    period: Literal["week", "month"]
    since: datetime
    tickets: int = Field(description="tickets opened in the period")
    tickets_with_problem: int = Field(
        description="of which linked to an article (used, drafted or suggested)"
    )
    by_tag: list[TagCount]
    frequent: list[ProblemCount]
    escalated: list[ProblemCount]


@router.get("/kb", response_model=list[SearchHit], tags=["kb"], dependencies=[require("kb.read")])
async def search_kb(
    request: Request,
    agent: CurrentAgent,
    q: Annotated[str, Query(max_length=500)] = "",
    status: Literal["draft", "published", "retired"] = "published",
    limit: Annotated[int, Query(ge=1, le=kb.SEARCH_LIMIT)] = 10,
) -> list[SearchHit]:
    """Articles for what the agent typed, best first (typos and word forms forgiven);
    without `q`, the most recently changed articles of `status` (e.g. drafts to review)."""
    async with runtime(request).pool.acquire() as conn:
        if q.strip():
            hits = await kb.search(conn, q, limit=limit, status=status)
            return [SearchHit(**vars(hit)) for hit in hits]
        rows = await kb.latest(conn, status, limit)
    return [
        SearchHit(**dict(r), score=0.0, snippet=html.escape(" ".join(r["problem"].split())[:300]))
        for r in rows
    ]


@router.post(
    "/kb", response_model=Article, status_code=201, tags=["kb"],
    dependencies=[require("kb.write")],
)  # fmt: skip
async def create_article(body: ArticleIn, request: Request, agent: CurrentAgent) -> Article:
    """Write an article; it is published at once."""
    async with runtime(request).pool.acquire() as conn:
        try:
            async with conn.transaction():
                article = await kb.create_article(
                    conn, problem=body.problem, solution=body.solution, tags=body.tags,
                    language=body.language, author_agent_id=agent.id,
                )  # fmt: skip
        except kb.ArticleInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
    return Article(**article)


@router.get(
    "/kb/{article_id}", response_model=Article, tags=["kb"], dependencies=[require("kb.read")]
)
async def get_article(article_id: int, request: Request, agent: CurrentAgent) -> Article:
    async with runtime(request).pool.acquire() as conn:
        try:
            return Article(**await kb.get_article(conn, article_id))
        except kb.ArticleNotFound as exc:
            raise HTTPException(404, str(exc)) from exc


@router.patch(
    "/kb/{article_id}", response_model=Article, tags=["kb"], dependencies=[require("kb.write")]
)
async def patch_article(
    article_id: int, body: ArticlePatch, request: Request, agent: CurrentAgent
) -> Article:
    """Edit an article or change its status: publish a reviewed draft (e.g. one drafted from a
    resolved ticket), back to draft, or retire (managers and admins only)."""
    async with runtime(request).pool.acquire() as conn:
        try:
            async with conn.transaction():
                current = await kb.get_article(conn, article_id)
                touches_retired = body.status == "retired" or (
                    current["status"] == "retired" and body.status not in (None, "retired")
                )
                if touches_retired:
                    ensure_allowed(agent, "kb.retire")
                article = await kb.update_article(
                    conn, article_id, agent_id=agent.id, problem=body.problem, solution=body.solution,
                    tags=body.tags, language=body.language, status=body.status,
                )  # fmt: skip
        except kb.ArticleNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except kb.ArticleInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
    return Article(**article)


@router.post(
    "/kb/{article_id}/used", response_model=Usage, tags=["kb"], dependencies=[require("kb.write")]
)
async def article_used(
    article_id: int, body: UsedIn, request: Request, agent: CurrentAgent
) -> Usage:
    """The article helped with a ticket: counted once per ticket."""
    async with runtime(request).pool.acquire() as conn:
        async with conn.transaction():
            status = await kb.status_of(conn, article_id)
            if status is None:
                raise HTTPException(404, f"article {article_id} does not exist")
            if status != "published":
                raise HTTPException(409, f"article {article_id} is {status}, not published")
            try:
                count = await kb.record_usage(conn, article_id, body.ticket_id, agent.id)
            except asyncpg.ForeignKeyViolationError as exc:
                raise HTTPException(404, f"ticket {body.ticket_id} does not exist") from exc
    return Usage(article_id=article_id, ticket_id=body.ticket_id, usage_count=count)


@router.get(
    "/tickets/{ticket_id}/suggestions", response_model=list[Suggestion], tags=["kb"],
    dependencies=[require("kb.read")],
)  # fmt: skip
async def ticket_suggestions(
    ticket_id: int, request: Request, agent: CurrentAgent
) -> list[Suggestion]:
    """The published articles most like the ticket's problem, as the kb-suggest stage found them."""
    async with runtime(request).pool.acquire() as conn:
        if not await views.ticket_exists(conn, ticket_id):
            raise HTTPException(404, f"ticket {ticket_id} does not exist")
        return [Suggestion(**s) for s in await kb.suggestions(conn, ticket_id)]


@router.get(
    "/reports/kb", response_model=KbReport, tags=["reports"],
    dependencies=[require("reports.read")],
)  # fmt: skip
async def kb_report(
    request: Request, agent: CurrentAgent, period: Literal["week", "month"] = "week"
) -> KbReport:
    """The most frequent problems by tag and by article, and the problems most often escalated."""
    since = datetime.now(UTC) - (timedelta(days=7) if period == "week" else timedelta(days=30))
    async with runtime(request).pool.acquire() as conn:
        report = await kb.report(conn, since)
    return KbReport(period=period, **report)
