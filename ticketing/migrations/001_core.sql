-- Callers, identities, tickets and their history, messages, outbox, cursors, agents.

CREATE TABLE agents (
    id            bigserial PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('agent', 'support', 'manager', 'admin')),
    display_name  text,
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agent_sessions (
    token_hash text PRIMARY KEY,
    agent_id   bigint NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE TABLE callers (
    id                bigserial PRIMARY KEY,
    name              text,
    organization      text,
    organization_code text,
    region            text,
    notes             text,
    merged_into       bigint REFERENCES callers(id),
    is_demo           boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identities (
    id         bigserial PRIMARY KEY,
    caller_id  bigint NOT NULL REFERENCES callers(id),
    kind       text NOT NULL,
    value      text NOT NULL,
    display    text,
    valid      boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, value)
);
CREATE INDEX identities_caller ON identities (caller_id);

CREATE TABLE tickets (
    id                 bigserial PRIMARY KEY,
    caller_id          bigint NOT NULL REFERENCES callers(id),
    subject            text NOT NULL DEFAULT '',
    status             text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'pending', 'closed')),
    tier               text NOT NULL DEFAULT 'agent' CHECK (tier IN ('agent', 'support', 'management')),
    close_reason       text CHECK (close_reason IN ('resolved', 'withdrawn', 'duplicate', 'spam')),
    solution           text,
    channel            text NOT NULL,
    account            text NOT NULL DEFAULT '',
    linked_ticket_id   bigint REFERENCES tickets(id),
    assignee_id        bigint REFERENCES agents(id),
    first_response_due timestamptz,
    resolution_due     timestamptz,
    first_response_at  timestamptz,
    is_demo            boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_activity_at   timestamptz NOT NULL DEFAULT now(),
    closed_at          timestamptz,
    CHECK ((status = 'closed') = (close_reason IS NOT NULL)),
    CHECK (close_reason IS DISTINCT FROM 'resolved' OR coalesce(solution, '') <> '')
);
CREATE INDEX tickets_caller ON tickets (caller_id, id DESC);
CREATE INDEX tickets_queue ON tickets (status, tier, resolution_due) WHERE status <> 'closed';

CREATE TABLE ticket_events (
    id          bigserial PRIMARY KEY,
    ticket_id   bigint NOT NULL REFERENCES tickets(id),
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL DEFAULT 'system',
    agent_id    bigint REFERENCES agents(id),
    kind        text NOT NULL,
    from_status text,
    to_status   text,
    from_tier   text,
    to_tier     text,
    note        text,
    data        jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX ticket_events_ticket ON ticket_events (ticket_id, id);

CREATE TABLE messages (
    id            bigserial PRIMARY KEY,
    ticket_id     bigint NOT NULL REFERENCES tickets(id),
    caller_id     bigint NOT NULL REFERENCES callers(id),
    direction     text NOT NULL CHECK (direction IN ('in', 'out')),
    channel       text NOT NULL,
    account       text NOT NULL DEFAULT '',
    external_id   text,
    sender        text NOT NULL DEFAULT '',
    recipient     text,
    subject       text,
    body_text     text NOT NULL DEFAULT '',
    body_display  text NOT NULL DEFAULT '',
    body_html     text,
    headers       jsonb NOT NULL DEFAULT '{}',
    meta          jsonb NOT NULL DEFAULT '{}',
    problems      text[] NOT NULL DEFAULT '{}',
    auto_reply    boolean NOT NULL DEFAULT false,
    status        text NOT NULL DEFAULT 'received'
                  CHECK (status IN ('received', 'queued', 'sent', 'delivered', 'read', 'failed')),
    status_reason text,
    provider_id   text,
    attempts      integer NOT NULL DEFAULT 0,
    agent_id      bigint REFERENCES agents(id),
    trace_id      text,
    received_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz
);
-- The natural key: a redelivered inbound message is a no-op.
CREATE UNIQUE INDEX messages_natural_key ON messages (channel, account, external_id) WHERE direction = 'in';
CREATE INDEX messages_ticket ON messages (ticket_id, id);
CREATE INDEX messages_provider ON messages (provider_id) WHERE provider_id IS NOT NULL;
CREATE INDEX messages_trace ON messages (trace_id);

CREATE TABLE attachments (
    id           bigserial PRIMARY KEY,
    message_id   bigint NOT NULL REFERENCES messages(id),
    filename     text NOT NULL,
    content_type text NOT NULL,
    size         bigint NOT NULL,
    sha256       text NOT NULL DEFAULT '',
    dropped      text
);
CREATE INDEX attachments_message ON attachments (message_id);

-- Written in the same transaction as what it announces; the relay publishes and deletes it.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    key          bytea,
    payload      bytea NOT NULL,
    available_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_available ON outbox (available_at, id);

CREATE TABLE channel_cursors (
    channel    text NOT NULL,
    account    text NOT NULL,
    scope      text NOT NULL DEFAULT '',
    cursor     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, account, scope)
);

-- Problem/solution pairs from resolved tickets, the seed of the knowledge base.
CREATE TABLE kb_articles (
    id               bigserial PRIMARY KEY,
    problem          text NOT NULL,
    solution         text NOT NULL,
    tags             text[] NOT NULL DEFAULT '{}',
    language         text NOT NULL DEFAULT 'id',
    status           text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'published', 'retired')),
    source_ticket_id bigint REFERENCES tickets(id),
    author_agent_id  bigint REFERENCES agents(id),
    usage_count      integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
