"""Which articles helped, the suggestions on a ticket, and the knowledge-base report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from ticketing.kb.articles import SUGGESTION_MIN_SCORE, SUGGESTIONS
from ticketing.kb.search import Hit, search

# --- usage and suggestions -------------------------------------------------------------------


async def record_usage(
    conn: asyncpg.Connection, article_id: int, ticket_id: int, agent_id: int | None
) -> int:
    """Count that an article served a ticket (once per ticket); return the article's usage count."""
    inserted = await conn.fetchval(
        "INSERT INTO kb_usage (article_id, ticket_id, agent_id) VALUES ($1, $2, $3)"
        " ON CONFLICT (article_id, ticket_id) DO NOTHING RETURNING id",
        article_id, ticket_id, agent_id,
    )  # fmt: skip
    if inserted is not None:
        return int(await conn.fetchval(
            "UPDATE kb_articles SET usage_count = usage_count + 1 WHERE id = $1 RETURNING usage_count", article_id
        ))  # fmt: skip
    return int(await conn.fetchval("SELECT usage_count FROM kb_articles WHERE id = $1", article_id))


TICKET_TEXT_MAX = 2000


async def ticket_text(conn: asyncpg.Connection, ticket_id: int) -> str | None:
    """The words a ticket's problem is told in: its subject and the caller's first messages."""
    ticket = await conn.fetchrow("SELECT subject FROM tickets WHERE id = $1", ticket_id)
    if ticket is None:
        return None
    rows = await conn.fetch(
        "SELECT coalesce(nullif(body_display, ''), body_text) AS body FROM messages"
        " WHERE ticket_id = $1 AND direction = 'in' AND NOT auto_reply ORDER BY id LIMIT 5",
        ticket_id,
    )
    text = "\n".join([ticket["subject"], *(r["body"] for r in rows)])
    return text[:TICKET_TEXT_MAX]


async def suggest(conn: asyncpg.Connection, ticket_id: int, limit: int = SUGGESTIONS) -> list[Hit]:
    """The published articles most like the ticket's problem (never one drafted from the ticket itself)."""
    text = await ticket_text(conn, ticket_id)
    if not text:
        return []
    return await search(
        conn, text, limit=limit, exclude_source_ticket=ticket_id, min_score=SUGGESTION_MIN_SCORE
    )


async def store_suggestions(conn: asyncpg.Connection, ticket_id: int, hits: Sequence[Hit]) -> None:
    """Replace the ticket's stored suggestions; run inside a transaction."""
    await conn.execute("DELETE FROM ticket_suggestions WHERE ticket_id = $1", ticket_id)
    if hits:
        await conn.executemany(
            "INSERT INTO ticket_suggestions (ticket_id, article_id, rank, score) VALUES ($1, $2, $3, $4)",
            [(ticket_id, hit.id, rank, hit.score) for rank, hit in enumerate(hits, start=1)],
        )


async def suggestions(conn: asyncpg.Connection, ticket_id: int) -> list[dict[str, Any]]:
    """The stored suggestions of a ticket that are still published, best first."""
    rows = await conn.fetch(
        "SELECT a.id, a.problem, a.solution, a.tags, a.language, a.usage_count, s.score, s.rank,"
        " s.created_at AS suggested_at FROM ticket_suggestions s JOIN kb_articles a ON a.id = s.article_id"
        " WHERE s.ticket_id = $1 AND a.status = 'published' ORDER BY s.rank",
        ticket_id,
    )
    return [dict(r) for r in rows]


# --- report ----------------------------------------------------------------------------------

REPORT_TOP = 10


async def report(conn: asyncpg.Connection, since: datetime) -> dict[str, Any]:
    """Since a time: tickets per tag and per problem (article), and the problems most escalated.

    A ticket's problem is the article an agent used on it, else the article drafted from it,
    else its best suggestion.
    """
    rows = await conn.fetch(
        """
        WITH linked AS (
            SELECT t.id AS ticket_id,
                   coalesce(
                       (SELECT u.article_id FROM kb_usage u WHERE u.ticket_id = t.id ORDER BY u.id LIMIT 1),
                       (SELECT k.id FROM kb_articles k WHERE k.source_ticket_id = t.id
                          AND k.status <> 'retired' ORDER BY k.id LIMIT 1),
                       (SELECT s.article_id FROM ticket_suggestions s WHERE s.ticket_id = t.id ORDER BY s.rank LIMIT 1)
                   ) AS article_id,
                   EXISTS (SELECT 1 FROM ticket_events e WHERE e.ticket_id = t.id AND e.kind = 'escalated') AS escalated
            FROM tickets t
            WHERE t.created_at >= $1
        )
        SELECT l.ticket_id, l.escalated, a.id AS article_id, a.problem, a.tags
        FROM linked l JOIN kb_articles a ON a.id = l.article_id
        """,
        since,
    )
    per_tag: Counter[str] = Counter()
    per_tag_escalated: Counter[str] = Counter()
    per_article: Counter[int] = Counter()
    per_article_escalated: Counter[int] = Counter()
    problems: dict[int, dict[str, Any]] = {}
    for row in rows:
        tags = list(row["tags"]) or ["(untagged)"]
        per_tag.update(tags)
        per_article[row["article_id"]] += 1
        problems[row["article_id"]] = {
            "article_id": row["article_id"],
            "problem": row["problem"],
            "tags": list(row["tags"]),
        }
        if row["escalated"]:
            per_tag_escalated.update(tags)
            per_article_escalated[row["article_id"]] += 1
    tickets_total = await conn.fetchval(
        "SELECT count(*) FROM tickets WHERE created_at >= $1", since
    )
    return {
        "since": since,
        "tickets": tickets_total,
        "tickets_with_problem": len(rows),
        "by_tag": [
            {"tag": tag, "tickets": n, "escalated": per_tag_escalated[tag]}
            for tag, n in sorted(per_tag.items(), key=lambda kv: (-kv[1], kv[0]))[:REPORT_TOP * 2]
        ],
        "frequent": [
            {**problems[aid], "tickets": n, "escalated": per_article_escalated[aid]}
            for aid, n in sorted(per_article.items(), key=lambda kv: (-kv[1], kv[0]))[:REPORT_TOP]
        ],
        "escalated": [
            {**problems[aid], "tickets": per_article[aid], "escalated": n}
            for aid, n in sorted(per_article_escalated.items(), key=lambda kv: (-kv[1], kv[0]))[:REPORT_TOP]
        ],
    }  # fmt: skip
