"""The troubleshooting knowledge base: articles, stemmed and typo-tolerant search, usage, suggestions."""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from normalizer.stem import SYNONYMS, looks_english, normalize, stem_word, stemmed_text, tokens

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


# --- search ---------------------------------------------------------------------------------


@dataclass
class QueryGroup:
    """One word of the query: the stems that count as it, and the ones that count for less."""

    word: str
    terms: list[str]
    synonyms: list[str]
    weight: float


@dataclass
class Query:
    """A query as the search runs it."""

    text: str
    groups: list[QueryGroup] = field(default_factory=list)
    trigram_text: str | None = None
    # A word no article has in any form nor in a near spelling: only trigrams may still find it.
    unresolved: bool = False

    def highlight_stems(self) -> set[str]:
        return {t for g in self.groups for t in (*g.terms, *g.synonyms)}


def _idf(df: int, total: int) -> float:
    """BM25's inverse document frequency: rare stems weigh more than common ones."""
    return math.log(1 + (total - df + 0.5) / (df + 0.5))


def _tsquery(terms: Iterable[str], weight: str = "") -> str | None:
    # Stems are [0-9a-z]+ only (the tokenizer makes them so): safe to quote as they are.
    parts = [f"'{t}'{':' + weight if weight else ''}" for t in terms]
    return " | ".join(parts) or None


async def plan_query(conn: asyncpg.Connection, text: str) -> Query:
    """Stem the query, weigh each word by rarity, and take misspelt words for their nearest known ones."""
    normalized = normalize(text)
    found = tokens(normalized)
    query = Query(text=text)
    if 0 < len(normalized) <= TRIGRAM_QUERY_MAX:
        query.trigram_text = " ".join(t.word for t in found) or None
    by_stem: dict[str, str] = {}
    for token in found:
        by_stem.setdefault(token.stem, token.word)
    if not by_stem:
        return query
    wanted = set(by_stem) | {s for stem in by_stem for s in SYNONYMS.get(stem, ())}
    rows = await conn.fetch(
        "SELECT stem, df FROM kb_stems WHERE stem = ANY($1::text[]) OR stem = ''", list(wanted)
    )
    df = {r["stem"]: r["df"] for r in rows}
    total = max(df.pop(_ARTICLE_COUNT, 0), 1)
    unknown = [word for stem, word in by_stem.items() if df.get(stem, 0) <= 0 and len(word) >= 4]
    fuzzy: dict[str, list[tuple[str, float]]] = {}
    if unknown:
        rows = await conn.fetch(
            "SELECT q.word AS typed, w.stem, w.sim FROM unnest($1::text[]) AS q(word) CROSS JOIN LATERAL"
            " (SELECT k.stem, max(similarity(k.word, q.word)) AS sim FROM kb_words k"
            "  WHERE k.word % q.word GROUP BY k.stem ORDER BY sim DESC LIMIT $2) AS w",
            unknown, FUZZY_PER_WORD,
        )  # fmt: skip
        for row in rows:
            if row["sim"] >= FUZZY_MIN:
                fuzzy.setdefault(row["typed"], []).append((row["stem"], float(row["sim"])))
        extra = {s for found_stems in fuzzy.values() for s, _ in found_stems}
        extra |= {syn for s in extra for syn in SYNONYMS.get(s, ())}
        for row in await conn.fetch(
            "SELECT stem, df FROM kb_stems WHERE stem = ANY($1::text[])", list(extra - set(df))
        ):
            df[row["stem"]] = row["df"]
    for stem, word in by_stem.items():
        if df.get(stem, 0) > 0:
            terms, factor = [stem], 1.0
        elif word in fuzzy:
            terms = [s for s, _ in fuzzy[word] if df.get(s, 0) > 0]
            factor = min(1.0, max(sim for _, sim in fuzzy[word]) + 0.3)
        else:
            terms, factor = [], 1.0
        synonyms = sorted(
            {syn for t in (terms or [stem]) for syn in SYNONYMS.get(t, ()) if df.get(syn, 0) > 0}
            - set(terms)
        )
        if terms:
            weight = factor * max(_idf(df[t], total) for t in terms)
        elif synonyms:
            weight = SYNONYM_FACTOR * max(_idf(df[s], total) for s in synonyms)
        else:
            # A word no article has in any form: it cannot tell articles apart by words.
            query.unresolved = query.unresolved or len(word) >= 4
            continue
        query.groups.append(QueryGroup(word, terms, synonyms, weight))
    query.groups.sort(key=lambda g: -g.weight)
    del query.groups[QUERY_GROUPS_MAX:]
    return query


@dataclass
class Hit:
    """One article found, with its score and a highlighted snippet."""

    id: int
    problem: str
    solution: str
    tags: list[str]
    language: str
    status: str
    usage_count: int
    source_ticket_id: int | None
    score: float
    snippet: str


# Which articles get the full score. An OR of all the query's words can match a large part
# of a big knowledge base, so candidates come in levels, strictest first: every word in the
# problem or tags; every word anywhere; any set of words worth 70%, 50%, 30% of the query's
# weight (an OR of ANDs, which the GIN index evaluates without reading articles); any word.
# The first level that finds CANDIDATES articles is read (at most LEVEL_READ of them) along
# with all of the stricter level before it (fewer than CANDIDATES, by construction), and the
# cheap weighted word sum keeps the best CANDIDATES for the full score. Articles the trigram
# index finds are added when a query word could not be resolved.
LEVELS: tuple[tuple[float, str], ...] = ((1.0, "A"), (1.0, ""), (0.7, ""), (0.5, ""), (0.3, ""))
QUORUM_GROUPS = 6
CANDIDATES = 200
LEVEL_READ = 1000

_PROBE_SQL = """
SELECT count(*) FROM (
    SELECT 1 FROM kb_articles WHERE search_tsv @@ $1::tsquery AND status = $2 LIMIT $3
) AS found
"""

_SEARCH_SQL = """
WITH g AS MATERIALIZED (
    SELECT w, ta::tsquery AS ta, sa::tsquery AS sa, t::tsquery AS t, s::tsquery AS s
    FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::float8[]) AS u(ta, sa, t, s, w)
), level AS (
    SELECT id FROM kb_articles
    WHERE $20::text IS NOT NULL AND search_tsv @@ $20::tsquery AND status = $1
    UNION
    (SELECT id FROM kb_articles
     WHERE $17::text IS NOT NULL AND search_tsv @@ $17::tsquery AND status = $1 LIMIT $21)
), best AS (
    SELECT a.id FROM kb_articles a JOIN level USING (id)
    WHERE $11::bigint IS NULL OR a.source_ticket_id IS DISTINCT FROM $11
    ORDER BY (SELECT sum(CASE WHEN a.search_tsv @@ g.ta THEN $12 * g.w WHEN a.search_tsv @@ g.t THEN $13 * g.w
                              WHEN a.search_tsv @@ g.s THEN $10 * $13 * g.w ELSE 0 END) FROM g) DESC, a.id DESC
    LIMIT $18
), cand AS (
    SELECT id FROM best
    UNION
    SELECT id FROM kb_articles
    WHERE $19 AND $3::text IS NOT NULL AND $3 <% lower(problem) AND status = $1
      AND ($11::bigint IS NULL OR source_ticket_id IS DISTINCT FROM $11)
), scored AS (
    SELECT a.id, a.problem, a.solution, a.tags, a.language, a.status, a.usage_count, a.source_ticket_id,
        coalesce((SELECT sum(CASE WHEN a.search_tsv @@ g.ta THEN g.w
                                  WHEN a.search_tsv @@ g.sa THEN g.w * $10 ELSE 0 END) FROM g), 0) AS in_problem,
        coalesce((SELECT sum(CASE WHEN a.search_tsv @@ g.t THEN g.w
                                  WHEN a.search_tsv @@ g.s THEN g.w * $10 ELSE 0 END) FROM g), 0) AS anywhere,
        CASE WHEN $2::text IS NULL THEN 0 ELSE ts_rank_cd(a.search_tsv, $2::tsquery, 32) END AS rank,
        CASE WHEN $3::text IS NULL THEN 0 ELSE word_similarity($3, lower(a.problem)) END AS trigram
    FROM kb_articles a JOIN cand USING (id)
)
SELECT *, ($12 * in_problem / $9 + $13 * anywhere / $9 + $14 * rank + $15 * trigram) AS score
FROM scored
ORDER BY score DESC, usage_count DESC, id DESC
LIMIT $16
"""


def quorum_query(groups: Sequence[QueryGroup], fraction: float, weight: str = "") -> str | None:
    """A tsquery matching the articles whose words are worth at least `fraction` of the query's
    (with `weight` "A": found in the problem or tags)."""
    heaviest = [g for g in groups if g.terms or g.synonyms][:QUORUM_GROUPS]
    if not heaviest:
        return None
    alternatives = [f"({_tsquery([*g.terms, *g.synonyms], weight)})" for g in heaviest]
    needed = fraction * sum(g.weight for g in heaviest) - 1e-9
    minimal: list[int] = []
    # Subsets as bit masks, fewest words first, so a superset of an accepted set is skipped.
    for mask in sorted(range(1, 1 << len(heaviest)), key=lambda m: (m.bit_count(), m)):
        if any(mask & found == found for found in minimal):
            continue
        if sum(g.weight for i, g in enumerate(heaviest) if mask >> i & 1) >= needed:
            minimal.append(mask)
    return " | ".join(
        "(" + " & ".join(alt for i, alt in enumerate(alternatives) if mask >> i & 1) + ")"
        for mask in minimal
    )


async def _candidate_levels(
    conn: asyncpg.Connection, groups: Sequence[QueryGroup], status: str
) -> tuple[str | None, str | None]:
    """The stricter level read whole (fewer than CANDIDATES articles) and the level read in part."""
    stricter: str | None = None
    for fraction, weight in LEVELS:
        level = quorum_query(groups, fraction, weight)
        if level is None:
            return None, None
        if level == stricter:
            continue
        if await conn.fetchval(_PROBE_SQL, level, status, CANDIDATES) >= CANDIDATES:
            return stricter, level
        stricter = level
    return stricter, _tsquery(t for g in groups for t in (*g.terms, *g.synonyms))


async def search(
    conn: asyncpg.Connection, text: str, *, limit: int = 10, status: str = "published",
    exclude_source_ticket: int | None = None, min_score: float = 0.0,
) -> list[Hit]:  # fmt: skip
    """Articles best matching `text`, best first: stemmed full-text words weighted by rarity,
    the words' closeness (ts_rank_cd), and trigram similarity for typing mistakes."""
    if status not in STATUSES:
        raise ArticleInvalid(f"status must be one of {', '.join(STATUSES)}")
    query = await plan_query(conn, text)
    groups = query.groups
    if not groups and query.trigram_text is None:
        return []
    any_terms = [t for g in groups for t in (*g.terms, *g.synonyms)]
    total_weight = sum(g.weight for g in groups) or 1.0
    # Without any known word, trigrams are all there is: let them decide the whole score.
    w_problem, w_anywhere, w_rank, w_trigram = (
        (W_PROBLEM, W_ANYWHERE, W_RANK, W_TRIGRAM) if groups else (0.0, 0.0, 0.0, 1.0)
    )
    if query.trigram_text is None and groups:
        w_problem, w_anywhere, w_rank = (
            W_PROBLEM + W_TRIGRAM * 0.6,
            W_ANYWHERE + W_TRIGRAM * 0.4,
            W_RANK,
        )
        w_trigram = 0.0
    stricter, level = await _candidate_levels(conn, groups, status)
    rows = await conn.fetch(
        _SEARCH_SQL, status, _tsquery(any_terms), query.trigram_text,
        [_tsquery(g.terms, "A") for g in groups], [_tsquery(g.synonyms, "A") for g in groups],
        [_tsquery(g.terms) for g in groups], [_tsquery(g.synonyms) for g in groups],
        [g.weight for g in groups], total_weight, SYNONYM_FACTOR, exclude_source_ticket,
        w_problem, w_anywhere, w_rank, w_trigram, min(max(limit, 1), SEARCH_LIMIT), level, CANDIDATES,
        query.trigram_text is not None and (query.unresolved or not groups), stricter, LEVEL_READ,
    )  # fmt: skip
    stems = query.highlight_stems()
    hits = []
    for row in rows:
        if row["score"] < min_score:
            continue
        hits.append(
            Hit(
                id=row["id"], problem=row["problem"], solution=row["solution"], tags=list(row["tags"]),
                language=row["language"], status=row["status"], usage_count=row["usage_count"],
                source_ticket_id=row["source_ticket_id"], score=round(float(row["score"]), 4),
                snippet=snippet(row["problem"], stems) if _mentions(row["problem"], stems) or not _mentions(row["solution"], stems)
                else snippet(row["solution"], stems),
            )
        )  # fmt: skip
    return hits


def _mentions(text: str, stems: set[str]) -> bool:
    return any(stem_word(m.group().lower()) in stems for m in _WORD_ORIGINAL.finditer(text))


SNIPPET_WORDS = 30


def snippet(text: str, stems: set[str], words: int = SNIPPET_WORDS) -> str:
    """A window of `text` around its first matching word, HTML-escaped, matches in <mark>."""
    found = list(_WORD_ORIGINAL.finditer(text))
    if not found:
        return html.escape(" ".join(text.split())[:200])
    matched = [stem_word(m.group().lower()) in stems for m in found]
    first = matched.index(True) if True in matched else 0
    start = max(0, first - words // 4)
    end = min(len(found), start + words)
    lo = 0 if start == 0 else found[start].start()
    hi = len(text) if end == len(found) else found[end - 1].end()
    pieces = ["…"] if start > 0 else []
    cursor = lo
    for index in range(start, end):
        match = found[index]
        pieces.append(html.escape(text[cursor : match.start()]))
        word = html.escape(match.group())
        pieces.append(f"<mark>{word}</mark>" if matched[index] else word)
        cursor = match.end()
    pieces.append(html.escape(text[cursor:hi]))
    if end < len(found):
        pieces.append("…")
    return " ".join("".join(pieces).split())


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
