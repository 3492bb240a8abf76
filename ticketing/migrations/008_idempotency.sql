-- Idempotency keys of the POSTs that create (tickets, replies, transitions, callers): a
-- repeated request with the same key answers what the first one did and does nothing twice.
-- The key is claimed, the work done and the response recorded in one transaction, so a
-- committed row always holds its response; a concurrent request with the same key waits
-- on the uncommitted row. Rows older than 24 hours count as gone and are pruned.

CREATE TABLE idempotency_keys (
    agent_id     bigint NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    key          text NOT NULL,
    -- sha256 of method, path and the canonical JSON of the request body
    fingerprint  bytea NOT NULL,
    method       text NOT NULL,
    path         text NOT NULL,
    -- the response as first sent; NULL only inside the claiming transaction
    status       integer,
    headers      jsonb NOT NULL DEFAULT '{}',
    body         bytea NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
