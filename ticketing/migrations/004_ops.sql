-- Operations: channel health for `loket status`, replays of shunted records, stage samples.

-- One row per channel account, written by pollers and webhooks (rarely: on a change of
-- state, otherwise at most every few seconds).
CREATE TABLE channel_health (
    channel    text NOT NULL,
    account    text NOT NULL,
    state      text NOT NULL CHECK (state IN ('up', 'down')),
    last_ok_at timestamptz,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, account)
);

-- Shunt records already republished, by their place on the shunt topic. `shunted_at`
-- tells a record apart from a newer one at the same offset after an in-memory broker restart.
CREATE TABLE shunt_replays (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    "offset"    bigint NOT NULL,
    shunted_at  double precision NOT NULL,
    stage       text NOT NULL,
    source      text NOT NULL,
    replayed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);

-- Committed and end offsets of each stage as seen by `loket status` and the ops view:
-- rates, stalls and the lag series come from consecutive samples.
CREATE TABLE stage_samples (
    at         timestamptz NOT NULL DEFAULT now(),
    stage      text NOT NULL,
    committed  bigint NOT NULL,
    end_offset bigint NOT NULL,
    members    integer NOT NULL,
    PRIMARY KEY (stage, at)
);
CREATE INDEX stage_samples_at ON stage_samples (at);
