-- Tables every service keeps in its own schema: the outbox and the consumer positions.
CREATE TABLE IF NOT EXISTS outbox (
    id          bigserial PRIMARY KEY,
    topic       text        NOT NULL,
    key         bytea,
    value       bytea,                      -- NULL = tombstone
    headers     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (id) WHERE sent_at IS NULL;

-- Consumer positions stored in the same transaction as the state they produced:
-- the next offset to apply per (group, topic, partition).
CREATE TABLE IF NOT EXISTS consumer_offsets (
    group_id    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

CREATE TABLE IF NOT EXISTS clock_watermark (
    service     text PRIMARY KEY,
    watermark   timestamptz NOT NULL
);
