"""Knowledge-base articles: validated, written, published, and indexed for search."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from normalizer.stem import looks_english, normalize, stemmed_text, tokens

STATUSES = ("draft", "published", "retired")
LANGUAGES = ("id", "en")
PROBLEM_MAX = 4000
SOLUTION_MAX = 20000
TAG_MAX = 40
SEARCH_LIMIT = 50
# A query longer than this is a ticket's text rather than what an agent typed: it is matched
# by its words only, since trigrams of a whole message say little and cost a lot.
TRIGRAM_QUERY_MAX = 120
QUERY_GROUPS_MAX = 24
# A misspelt word is taken for a known one from this trigram similarity on.
FUZZY_MIN = 0.4
FUZZY_PER_WORD = 2
# A match through a synonym (another language, a near word) counts for less than the word itself.
SYNONYM_FACTOR = 0.6
# The weights of the score's parts (they add up to 1, so a score is between 0 and 1).
W_PROBLEM = 0.5  # share of the query's weighted words found in the problem or tags
W_ANYWHERE = 0.15  # ... found anywhere, solution included
W_RANK = 0.1  # ts_rank_cd: how close together the words are
W_TRIGRAM = 0.25  # word_similarity of the query as typed to the problem as written
SUGGESTIONS = 3
SUGGESTION_MIN_SCORE = 0.2
# The reserved kb_stems row that counts published articles (no stem is empty).
_ARTICLE_COUNT = ""

_WORD_ORIGINAL = re.compile(r"[0-9A-Za-z]+")


class ArticleNotFound(LookupError):
    """No article with that id."""


class ArticleInvalid(ValueError):
    """The article's fields do not make a valid article."""


def clean_tags(tags: Iterable[str]) -> list[str]:
    """Lower-case, trimmed, unique tags in the order given."""
    seen: dict[str, None] = {}
    for tag in tags:
        cleaned = " ".join(tag.lower().split())[:TAG_MAX]
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


def language_of(problem: str, solution: str) -> str:
    return "en" if looks_english(f"{problem}\n{solution}") else "id"


def search_columns(problem: str, solution: str, tags: Sequence[str]) -> tuple[str, str]:
    """The stemmed `search_text` (problem and tags) and `search_solution` columns."""
    return stemmed_text(" ".join([problem, *tags])), stemmed_text(solution)


def _stem_set(search_text: str, search_solution: str) -> set[str]:
    return set(search_text.split()) | set(search_solution.split())


def _vocabulary(*texts: str) -> dict[str, str]:
    """Every word of the texts as written, and every stem, mapped to its stem."""
    words: dict[str, str] = {}
    for text in texts:
        for token in tokens(normalize(text)):
            if not token.word.isalpha():
                continue  # numbers and codes are matched exactly, never as misspellings
            words.setdefault(token.word, token.stem)
            words.setdefault(token.stem, token.stem)
    return words


async def _count_stems(conn: asyncpg.Connection, counts: Counter[str]) -> None:
    """Add to the per-stem article counts; sorted, so concurrent writers lock rows in one order."""
    changes = sorted((stem, n) for stem, n in counts.items() if n)
    if changes:
        await conn.executemany(
            "INSERT INTO kb_stems (stem, df) VALUES ($1, $2)"
            " ON CONFLICT (stem) DO UPDATE SET df = kb_stems.df + excluded.df",
            changes,
        )


async def _add_words(conn: asyncpg.Connection, words: dict[str, str]) -> None:
    if words:
        await conn.execute(
            "INSERT INTO kb_words (word, stem) SELECT * FROM unnest($1::text[], $2::text[])"
            " ON CONFLICT (word) DO NOTHING",
            list(words), list(words.values()),
        )  # fmt: skip


async def _reindex(
    conn: asyncpg.Connection, before: asyncpg.Record | None, after: dict[str, Any]
) -> None:
    """Keep the stem counts and vocabulary in step with what is published."""
    old = (
        _stem_set(before["search_text"], before["search_solution"])
        if before and before["status"] == "published"
        else set()
    )
    new = (
        _stem_set(after["search_text"], after["search_solution"])
        if after["status"] == "published"
        else set()
    )
    counts: Counter[str] = Counter()
    counts.update({stem: 1 for stem in new - old})
    counts.update({stem: -1 for stem in old - new})
    was, now = bool(before and before["status"] == "published"), after["status"] == "published"
    if was != now:
        counts[_ARTICLE_COUNT] += 1 if now else -1
    await _count_stems(conn, counts)
    if now:
        await _add_words(
            conn, _vocabulary(after["problem"], " ".join(after["tags"]), after["solution"])
        )


def _validate(problem: str, solution: str, status: str, language: str) -> None:
    if not problem.strip():
        raise ArticleInvalid("the problem must not be empty")
    if not solution.strip():
        raise ArticleInvalid("the solution must not be empty")
    if len(problem) > PROBLEM_MAX or len(solution) > SOLUTION_MAX:
        raise ArticleInvalid(
            f"problem at most {PROBLEM_MAX} and solution at most {SOLUTION_MAX} characters"
        )
    if status not in STATUSES:
        raise ArticleInvalid(f"status must be one of {', '.join(STATUSES)}")
    if language not in LANGUAGES:
        raise ArticleInvalid(f"language must be one of {', '.join(LANGUAGES)}")


_ARTICLE_COLUMNS = (
    "id, problem, solution, tags, language, status, source_ticket_id, author_agent_id,"
    " edited_agent_id, usage_count, created_at, updated_at, published_at, retired_at"
)


async def create_article(
    conn: asyncpg.Connection, *, problem: str, solution: str, tags: Sequence[str] = (),
    language: str | None = None, status: str = "published", author_agent_id: int | None = None,
    source_ticket_id: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Store an article (published unless told otherwise); run inside a transaction."""
    problem, solution, tags = problem.strip(), solution.strip(), clean_tags(tags)
    language = language or language_of(problem, solution)
    _validate(problem, solution, status, language)
    search_text, search_solution = search_columns(problem, solution, tags)
    row = await conn.fetchrow(
        "INSERT INTO kb_articles (problem, solution, tags, language, status, source_ticket_id,"
        " author_agent_id, search_text, search_solution, published_at, retired_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,"
        " CASE WHEN $5 = 'published' THEN now() END, CASE WHEN $5 = 'retired' THEN now() END)"
        f" RETURNING {_ARTICLE_COLUMNS}, search_text, search_solution",
        problem, solution, tags, language, status, source_ticket_id, author_agent_id,
        search_text, search_solution,
    )  # fmt: skip
    await _reindex(conn, None, dict(row))
    return _public(row)


def _public(row: asyncpg.Record) -> dict[str, Any]:
    return {k: v for k, v in dict(row).items() if k not in ("search_text", "search_solution")}


async def get_article(conn: asyncpg.Connection, article_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {_ARTICLE_COLUMNS} FROM kb_articles WHERE id = $1", article_id
    )
    if row is None:
        raise ArticleNotFound(f"article {article_id} does not exist")
    return dict(row)


async def update_article(
    conn: asyncpg.Connection, article_id: int, *, agent_id: int | None, problem: str | None = None,
    solution: str | None = None, tags: Sequence[str] | None = None, language: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Edit, publish, unpublish or retire an article; run inside a transaction."""
    before = await conn.fetchrow(
        f"SELECT {_ARTICLE_COLUMNS}, search_text, search_solution FROM kb_articles WHERE id = $1 FOR UPDATE",
        article_id,
    )
    if before is None:
        raise ArticleNotFound(f"article {article_id} does not exist")
    after = dict(before)
    if problem is not None:
        after["problem"] = problem.strip()
    if solution is not None:
        after["solution"] = solution.strip()
    if tags is not None:
        after["tags"] = clean_tags(tags)
    if status is not None:
        after["status"] = status
    if language is not None:
        after["language"] = language
    elif problem is not None or solution is not None:
        after["language"] = language_of(after["problem"], after["solution"])
    _validate(after["problem"], after["solution"], after["status"], after["language"])
    # Drafts written by the ticket procedure carry no stems yet: always compute them here.
    after["search_text"], after["search_solution"] = search_columns(
        after["problem"], after["solution"], after["tags"]
    )
    row = await conn.fetchrow(
        "UPDATE kb_articles SET problem = $2, solution = $3, tags = $4, language = $5, status = $6,"
        " search_text = $7, search_solution = $8, edited_agent_id = $9, updated_at = now(),"
        " published_at = CASE WHEN $6 = 'published' AND status <> 'published' THEN now() ELSE published_at END,"
        " retired_at = CASE WHEN $6 = 'retired' THEN coalesce(retired_at, now()) END"
        f" WHERE id = $1 RETURNING {_ARTICLE_COLUMNS}",
        article_id, after["problem"], after["solution"], after["tags"], after["language"],
        after["status"], after["search_text"], after["search_solution"], agent_id,
    )  # fmt: skip
    await _reindex(conn, before, after)
    return dict(row)


@dataclass(frozen=True)
class NewArticle:
    problem: str
    solution: str
    tags: tuple[str, ...] = ()
    language: str | None = None


async def publish_many(
    conn: asyncpg.Connection, articles: Sequence[NewArticle], *, author_agent_id: int | None = None
) -> int:
    """Publish many articles at once (imports, benchmarks): one COPY and one count update."""
    records = []
    counts: Counter[str] = Counter()
    words: dict[str, str] = {}
    for article in articles:
        problem, solution, tags = (
            article.problem.strip(),
            article.solution.strip(),
            clean_tags(article.tags),
        )
        language = article.language or language_of(problem, solution)
        _validate(problem, solution, "published", language)
        search_text, search_solution = search_columns(problem, solution, tags)
        counts.update(_stem_set(search_text, search_solution))
        for word, stem in _vocabulary(problem, " ".join(tags), solution).items():
            words.setdefault(word, stem)
        records.append(
            (
                problem,
                solution,
                tags,
                language,
                "published",
                author_agent_id,
                search_text,
                search_solution,
            )
        )
    counts[_ARTICLE_COUNT] += len(records)
    await conn.copy_records_to_table(
        "kb_articles", records=records,
        columns=["problem", "solution", "tags", "language", "status", "author_agent_id", "search_text", "search_solution"],
    )  # fmt: skip
    await conn.execute(
        "UPDATE kb_articles SET published_at = created_at WHERE published_at IS NULL AND status = 'published'"
    )
    await _count_stems(conn, counts)
    await _add_words(conn, words)
    return len(records)


async def latest(conn: asyncpg.Connection, status: str, limit: int) -> list[dict[str, Any]]:
    """Articles in `status`, the most recently changed first (a search without words)."""
    rows = await conn.fetch(
        "SELECT id, problem, solution, tags, language, status, usage_count, source_ticket_id"
        " FROM kb_articles WHERE status = $1 ORDER BY updated_at DESC, id DESC LIMIT $2",
        status, limit,
    )  # fmt: skip
    return [dict(r) for r in rows]


async def status_of(conn: asyncpg.Connection, article_id: int) -> str | None:
    """An article's status, held until the caller's transaction ends; None if there is none."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM kb_articles WHERE id = $1 FOR SHARE", article_id
    )
    return status
