-- The help-desk procedure: caller search and duplicate keys, caller history, report indexes.

-- Text as people compare it: lower case, punctuation and repeated spaces gone.
CREATE FUNCTION loket_text_key(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT nullif(btrim(regexp_replace(lower(coalesce(value, '')), '[^[:alnum:]]+', ' ', 'g')), '')
$$;

-- A person's name as people compare it: academic degrees after the first comma
-- ("Siti Aminah, S.Pd") and forms of address (Bapak, Ibu, Sdr., Dr., H./Hj. ...)
-- dropped, so "Ibu Siti  Aminah, S.Pd." and "siti aminah" have one key.
CREATE FUNCTION loket_name_key(name text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT nullif(
        regexp_replace(
            coalesce(loket_text_key(split_part(name, ',', 1)), ''),
            '^((bapak|pak|ibu|bu|sdr|sdri|saudara|saudari|dr|drs|dra|ir|prof|hj|h)( |$))+',
            ''
        ),
        ''
    )
$$;

ALTER TABLE callers
    ADD COLUMN name_key text GENERATED ALWAYS AS (loket_name_key(name)) STORED,
    ADD COLUMN organization_key text GENERATED ALWAYS AS (loket_text_key(organization)) STORED;
CREATE INDEX callers_name_key ON callers (name_key) WHERE merged_into IS NULL;
CREATE INDEX callers_organization_key ON callers (organization_key) WHERE merged_into IS NULL;

-- What happened to a caller record (created, identities added or removed, merged), and who did it.
CREATE TABLE caller_events (
    id        bigserial PRIMARY KEY,
    caller_id bigint NOT NULL REFERENCES callers(id),
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL DEFAULT 'system',
    agent_id  bigint REFERENCES agents(id),
    kind      text NOT NULL,
    note      text,
    data      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX caller_events_caller ON caller_events (caller_id, id);

-- The open report reads every ticket not closed, oldest first.
CREATE INDEX tickets_open_age ON tickets (created_at) WHERE status <> 'closed';
CREATE INDEX kb_articles_source ON kb_articles (source_ticket_id);
