-- One row per customer whose erase_request loyalty applied: when, and which kinds of data it
-- dropped (the ledger keeps its amounts, anonymised). Kept after the erasure on purpose: it holds
-- no personal data, only the pseudonymous id the erase report is asked about.
CREATE TABLE IF NOT EXISTS erasures (
    customer_id text PRIMARY KEY,
    erased_at   timestamptz NOT NULL,
    what        text[]      NOT NULL DEFAULT '{}'
);
