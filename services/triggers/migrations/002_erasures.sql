-- One row per customer whose erase_request triggers applied: when, and which kinds of data it
-- dropped (fired trigger ids and offers stay, so a replay still fires nothing twice). Kept after
-- the erasure on purpose: it holds no personal data, only the pseudonymous id the report asks about.
CREATE TABLE IF NOT EXISTS erasures (
    customer_id text PRIMARY KEY,
    erased_at   timestamptz NOT NULL,
    what        text[]      NOT NULL DEFAULT '{}'
);
