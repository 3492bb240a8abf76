-- The inbound journal: what a webhook accepted, kept in PostgreSQL until it is stored, because
-- the embedded broker holds its records in memory and loses them when it dies.

CREATE TABLE inbound_journal (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    key          bytea,
    value        bytea NOT NULL,
    -- The natural key of an inbound raw message: the row goes once `messages` holds it.
    -- NULL for delivery receipts, which are pruned a while after they were published.
    channel      text,
    account      text,
    external_id  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When the last publish the broker acknowledged was started (NULL: none yet), and how
    -- many were. A row published before the broker came back empty is published again, and
    -- so is a message not stored a while after its publish (spaced out by `publishes`).
    published_at timestamptz,
    publishes    integer NOT NULL DEFAULT 0,
    CHECK ((channel IS NULL) = (external_id IS NULL) AND (channel IS NULL) = (account IS NULL))
);
