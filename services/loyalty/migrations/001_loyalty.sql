-- The loyalty schema: an append-only ledger, the orders (with the points lot each earned) it is
-- derived from, and one summary row per member written in the same transaction as the entries.

CREATE TABLE IF NOT EXISTS accounts (
    customer_id     text PRIMARY KEY,
    balance         bigint      NOT NULL DEFAULT 0 CHECK (balance >= 0),
    tier            text        NOT NULL DEFAULT 'member',
    trailing_spend  bigint      NOT NULL DEFAULT 0,   -- base minor units, as of evaluated_at
    evaluated_at    timestamptz,
    review_at       timestamptz,                      -- when spend next leaves the tier window
    next_expiry_at  timestamptz,                      -- earliest expiry of points held
    merged_into     text,
    erased_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);  -- room for HOT updates: a busy member's row is rewritten per batch
CREATE INDEX IF NOT EXISTS accounts_expiry_due ON accounts (next_expiry_at) WHERE next_expiry_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS accounts_review_due ON accounts (review_at) WHERE review_at IS NOT NULL;

-- Append-only: rows are only ever inserted (erasure nulls order_id, nothing else changes).
-- entry_id is derived from (event_id, kind), so the primary key also makes it unique.
CREATE TABLE IF NOT EXISTS ledger (
    event_id        text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('earn', 'redeem', 'reverse', 'expire', 'merge_in', 'adjust')),
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    entry_id        uuid        NOT NULL,
    customer_id     text        NOT NULL,
    points          bigint      NOT NULL,
    balance_after   bigint      NOT NULL CHECK (balance_after >= 0),
    order_id        text,
    occurred_at     timestamptz NOT NULL,
    expires_at      timestamptz,
    detail          jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, kind)
);
CREATE INDEX IF NOT EXISTS ledger_by_customer ON ledger (customer_id, occurred_at DESC, seq DESC);

-- One row per sale: its net spend for the tier window and its lot of points (consumed oldest
-- expiry first); owner moves with merges.
CREATE TABLE IF NOT EXISTS orders (
    order_key       text PRIMARY KEY,       -- digest of order_id, kept after erasure
    order_id        text,                   -- dropped on erasure
    owner           text        NOT NULL,
    sale_event_id   text        NOT NULL,
    sale_at         timestamptz NOT NULL,
    currency        text        NOT NULL,
    total           bigint      NOT NULL,
    refunded        bigint      NOT NULL DEFAULT 0,
    gross_spend     bigint      NOT NULL,
    spend           bigint      NOT NULL,
    earned          bigint      NOT NULL,
    reversed        bigint      NOT NULL DEFAULT 0,
    remaining       bigint      NOT NULL CHECK (remaining >= 0),
    expires_at      timestamptz NOT NULL
) WITH (fillfactor = 85);  -- returns and redemptions update in place (HOT: no indexed column changes)
-- One index serves both reads by owner (points held, spend in the window).
CREATE INDEX IF NOT EXISTS orders_by_owner ON orders (owner, sale_at);

-- Returns and merges applied (sales are keyed by their order): re-delivery is a no-op.
CREATE TABLE IF NOT EXISTS processed (
    key     text PRIMARY KEY
);

CREATE TABLE IF NOT EXISTS redemption_rejections (
    event_id     text PRIMARY KEY,
    customer_id  text        NOT NULL,
    order_id     text,
    requested    bigint      NOT NULL,
    balance      bigint      NOT NULL,
    reason       text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS redemption_rejections_by_customer ON redemption_rejections (customer_id, occurred_at);

CREATE TABLE IF NOT EXISTS merges (
    merge_id     text PRIMARY KEY,
    survivor     text        NOT NULL,
    merged       text        NOT NULL,
    reason       text,
    merged_at    timestamptz NOT NULL,
    points_in    bigint      NOT NULL DEFAULT 0,
    unmerged_at  timestamptz,
    points_out   bigint
);

-- The orders each merge moved, so an unmerge moves exactly those back.
CREATE TABLE IF NOT EXISTS merge_moves (
    merge_id   text NOT NULL,
    order_key  text NOT NULL,
    PRIMARY KEY (merge_id, order_key)
);

-- merged-away customer -> the customer it was merged into (one edge per merge).
CREATE TABLE IF NOT EXISTS aliases (
    merged    text PRIMARY KEY,
    survivor  text NOT NULL,
    merge_id  text NOT NULL
);
