-- The triggers read model: customer facts kept from the topics, stores, and what fired.

CREATE TABLE IF NOT EXISTS customer_facts (
    customer_id        text PRIMARY KEY,
    birthday           text,
    birthday_month     smallint,
    birthday_day       smallint,
    locale             text,
    timezone           text,
    home_store_id      text,
    city               text,
    country            text,
    lat                double precision,
    lon                double precision,
    tags               text[]  NOT NULL DEFAULT '{}',
    consents           jsonb   NOT NULL DEFAULT '{}',
    consented_channels text[]  NOT NULL DEFAULT '{}',
    preferred_channel  text,
    profile_version    bigint  NOT NULL DEFAULT -1,
    profile_at         timestamptz,
    last_event_at      timestamptz,                  -- when the facts last changed (event time)
    first_seen_at      timestamptz,
    signed_up_at       timestamptz,
    first_purchase_at  timestamptz,
    last_purchase_at   timestamptz,
    orders_count       integer NOT NULL DEFAULT 0,
    lifetime_spend     bigint  NOT NULL DEFAULT 0,   -- base-currency minor units
    tier               text    NOT NULL DEFAULT 'member',
    tier_at            timestamptz,
    winback_due_at     timestamptz,                  -- last_purchase_at + lapse, for the scan
    winback_fired_for  timestamptz,
    birthday_fired_for integer,
    points_fired_for   text,                         -- latest month a points_expiring fired for
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS customer_facts_birthday ON customer_facts (birthday_month, birthday_day);
CREATE INDEX IF NOT EXISTS customer_facts_winback ON customer_facts (winback_due_at);
CREATE INDEX IF NOT EXISTS customer_facts_location ON customer_facts (lat, lon) WHERE lat IS NOT NULL;
CREATE INDEX IF NOT EXISTS customer_facts_home_store ON customer_facts (home_store_id);
CREATE INDEX IF NOT EXISTS customer_facts_tier ON customer_facts (tier);

CREATE TABLE IF NOT EXISTS carts (
    customer_id      text NOT NULL,
    cart_id          text NOT NULL,
    last_activity_at timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,           -- last activity + after_minutes
    items            integer NOT NULL DEFAULT 0,
    total            bigint  NOT NULL DEFAULT 0,
    category         text,
    sku              text,
    status           text NOT NULL DEFAULT 'open',
    PRIMARY KEY (customer_id, cart_id)
);
CREATE INDEX IF NOT EXISTS carts_due ON carts (due_at) WHERE status = 'open';

CREATE TABLE IF NOT EXISTS category_facts (
    customer_id  text NOT NULL,
    category     text NOT NULL,
    purchases    timestamptz[] NOT NULL,
    quantity     bigint NOT NULL DEFAULT 0,
    last_at      timestamptz,
    remind_at    timestamptz,
    reminded_for timestamptz,
    PRIMARY KEY (customer_id, category)
);
CREATE INDEX IF NOT EXISTS category_facts_remind ON category_facts (remind_at);
CREATE INDEX IF NOT EXISTS category_facts_category ON category_facts (category, customer_id);

CREATE TABLE IF NOT EXISTS point_lots (
    customer_id text NOT NULL,
    lot_id      text NOT NULL,
    points      bigint NOT NULL,
    expires_at  timestamptz NOT NULL,
    order_id    text,
    PRIMARY KEY (customer_id, lot_id)
);
CREATE INDEX IF NOT EXISTS point_lots_expiry ON point_lots (expires_at);

-- Signed spend per sale/return, for trailing spend over any window.
CREATE TABLE IF NOT EXISTS purchases (
    customer_id text NOT NULL,
    event_id    text NOT NULL,
    occurred_at timestamptz NOT NULL,
    amount      bigint NOT NULL,
    PRIMARY KEY (customer_id, event_id)
);
CREATE INDEX IF NOT EXISTS purchases_by_time ON purchases (customer_id, occurred_at);

-- Every applied event, by the customer it arrived for: the de-duplication key and the source
-- for re-deriving facts after an unmerge.
CREATE TABLE IF NOT EXISTS customer_events (
    source      text NOT NULL,                       -- identity | loyalty
    event_id    text NOT NULL,
    owner       text NOT NULL,
    occurred_at timestamptz NOT NULL,
    seq         bigserial,
    raw         bytea NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX IF NOT EXISTS customer_events_owner ON customer_events (owner, occurred_at, seq);

CREATE TABLE IF NOT EXISTS merged_into (
    merged   text PRIMARY KEY,
    survivor text NOT NULL,
    merge_id text NOT NULL
);
CREATE INDEX IF NOT EXISTS merged_into_survivor ON merged_into (survivor);

-- Merge records applied (a re-delivered record is skipped; a later re-merge has a new time).
CREATE TABLE IF NOT EXISTS merges_applied (
    merge_id    text NOT NULL,
    kind        text NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (merge_id, kind, occurred_at)
);

CREATE TABLE IF NOT EXISTS stores (
    store_id   text PRIMARY KEY,
    name       text NOT NULL,
    timezone   text,
    country    text,
    city       text,
    lat        double precision,
    lon        double precision,
    currency   text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stores_location ON stores (lat, lon) WHERE lat IS NOT NULL;

CREATE TABLE IF NOT EXISTS fired_triggers (
    trigger_id     uuid PRIMARY KEY,
    kind           text NOT NULL,
    customer_id    text NOT NULL,
    period         text NOT NULL,
    fired_at       timestamptz NOT NULL,
    occurred_at    timestamptz,
    cause_event_id text,
    context        jsonb NOT NULL DEFAULT '{}',
    offer          jsonb
);
CREATE INDEX IF NOT EXISTS fired_triggers_customer ON fired_triggers (customer_id, fired_at DESC);

CREATE TABLE IF NOT EXISTS campaigns (
    name       text PRIMARY KEY,
    segment    jsonb NOT NULL,
    message    jsonb NOT NULL,
    members    integer NOT NULL,
    fired      integer NOT NULL,
    created_at timestamptz NOT NULL
);

-- Event-time progress per input partition: staleness of events and the as-of of event-clock scans.
CREATE TABLE IF NOT EXISTS partition_watermarks (
    topic     text NOT NULL,
    partition integer NOT NULL,
    watermark timestamptz NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE TABLE IF NOT EXISTS scan_state (
    name  text PRIMARY KEY,
    as_of timestamptz NOT NULL
);

-- Store events waiting for their invitations (with the event clock: until every partition reached them).
CREATE TABLE IF NOT EXISTS store_events (
    event_id    text PRIMARY KEY,
    store_id    text NOT NULL,
    title       text NOT NULL,
    starts_at   timestamptz NOT NULL,
    radius_km   double precision,
    occurred_at timestamptz NOT NULL,
    invited_at  timestamptz
);
CREATE INDEX IF NOT EXISTS store_events_pending ON store_events (occurred_at) WHERE invited_at IS NULL;
