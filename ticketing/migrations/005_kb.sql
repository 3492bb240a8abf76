-- The troubleshooting knowledge base: stemmed full-text and trigram search, usage, suggestions.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- The stems are computed by the application (PySastrawi for Indonesian, Snowball for English):
-- search_text holds the problem and tags, search_solution the solution, both already stemmed.
ALTER TABLE kb_articles
    ADD COLUMN search_text     text NOT NULL DEFAULT '',
    ADD COLUMN search_solution text NOT NULL DEFAULT '',
    ADD COLUMN search_tsv      tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('simple', search_text), 'A')
        || setweight(to_tsvector('simple', search_solution), 'C')
    ) STORED,
    ADD COLUMN published_at    timestamptz,
    ADD COLUMN retired_at      timestamptz,
    ADD COLUMN edited_agent_id bigint REFERENCES agents(id);

-- Not partial: the search takes the status as a parameter, which a partial index cannot serve.
CREATE INDEX kb_articles_search ON kb_articles USING gin (search_tsv);
-- Typing mistakes: word_similarity of the query against the problem as written.
CREATE INDEX kb_articles_problem_trgm ON kb_articles USING gin (lower(problem) gin_trgm_ops);
CREATE INDEX kb_articles_status ON kb_articles (status, updated_at DESC);
CREATE INDEX kb_articles_tags ON kb_articles USING gin (tags);

-- How many published articles contain each stem (for weighting rare words above common ones).
CREATE TABLE kb_stems (
    stem text PRIMARY KEY,
    df   integer NOT NULL DEFAULT 0
);

-- Every word seen in an article as written, with its stem: a misspelt query word is
-- matched to the nearest of these by trigram similarity.
CREATE TABLE kb_words (
    word text PRIMARY KEY,
    stem text NOT NULL
);
CREATE INDEX kb_words_trgm ON kb_words USING gin (word gin_trgm_ops);

-- An agent used an article on a ticket (once per ticket and article).
CREATE TABLE kb_usage (
    id         bigserial PRIMARY KEY,
    article_id bigint NOT NULL REFERENCES kb_articles(id),
    ticket_id  bigint NOT NULL REFERENCES tickets(id),
    agent_id   bigint REFERENCES agents(id),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (article_id, ticket_id)
);
CREATE INDEX kb_usage_ticket ON kb_usage (ticket_id);
CREATE INDEX kb_usage_created ON kb_usage (created_at);

-- The articles most like a ticket's problem, computed by the kb-suggest stage off the hot path.
CREATE TABLE ticket_suggestions (
    ticket_id  bigint NOT NULL REFERENCES tickets(id),
    article_id bigint NOT NULL REFERENCES kb_articles(id),
    rank       smallint NOT NULL,
    score      double precision NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticket_id, article_id)
);
CREATE INDEX ticket_suggestions_article ON ticket_suggestions (article_id);
