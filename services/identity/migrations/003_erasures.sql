-- What this service erased for a person and when (the erase report reads it; no personal data).
CREATE TABLE IF NOT EXISTS erasures (
    customer_id text PRIMARY KEY,
    erased_at   timestamptz NOT NULL,
    what        text[]      NOT NULL
);
