"""Knowledge-base search the way callers talk: stems, synonyms, typos, quorum, ranking, snippets."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from normalizer.stem import SYNONYMS, normalize, stem_word, tokens
from ticketing.kb.articles import (
    _ARTICLE_COUNT,
    _WORD_ORIGINAL,
    FUZZY_MIN,
    FUZZY_PER_WORD,
    QUERY_GROUPS_MAX,
    SEARCH_LIMIT,
    STATUSES,
    SYNONYM_FACTOR,
    TRIGRAM_QUERY_MAX,
    W_ANYWHERE,
    W_PROBLEM,
    W_RANK,
    W_TRIGRAM,
    ArticleInvalid,
)

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
