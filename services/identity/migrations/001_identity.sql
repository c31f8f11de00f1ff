-- The identity graph: customers (a tree of merges), identifiers each owned by one surviving customer,
-- merge edges, the over-merge guard's memory, processed events and store countries.

CREATE TABLE IF NOT EXISTS customers (
    customer_id  text PRIMARY KEY,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    merged_into  text REFERENCES customers (customer_id) DEFERRABLE INITIALLY DEFERRED,
    erased       boolean NOT NULL DEFAULT false,
    version      bigint  NOT NULL DEFAULT 0,
    own          jsonb   NOT NULL DEFAULT '{}',   -- what events resolved to this node said (LWW state)
    golden       jsonb   NOT NULL DEFAULT '{}',   -- fold of own over the subtree
    members      jsonb   NOT NULL DEFAULT '[]',   -- subtree ids, itself included
    blocked      jsonb   NOT NULL DEFAULT '[]',   -- ids never to merge with (after an unmerge)
    quarantined  jsonb   NOT NULL DEFAULT '[]',   -- identifiers held back by the over-merge guard
    created_by   text
);
CREATE INDEX IF NOT EXISTS customers_merged_into ON customers (merged_into) WHERE merged_into IS NOT NULL;

-- Each (type, value) is owned by at most one customer; the unique key is what keeps two workers
-- that see the same new person at once from creating two owners.
CREATE TABLE IF NOT EXISTS identifiers (
    id_type           text NOT NULL,
    value             text NOT NULL,
    customer_id       text NOT NULL,
    home_customer_id  text NOT NULL,            -- the customer it was first attached to (unmerge)
    linked_at         timestamptz NOT NULL,
    event_id          text,
    PRIMARY KEY (id_type, value)
);
CREATE INDEX IF NOT EXISTS identifiers_customer ON identifiers (customer_id);

CREATE TABLE IF NOT EXISTS merges (
    merge_id        text PRIMARY KEY,
    survivor        text NOT NULL,
    merged          text NOT NULL,
    reason          text NOT NULL,
    cause_event_id  text,
    occurred_at     timestamptz NOT NULL,
    unmerged_at     timestamptz
);
CREATE INDEX IF NOT EXISTS merges_merged ON merges (merged);

CREATE TABLE IF NOT EXISTS quarantined_identifiers (
    id_type  text NOT NULL,
    value    text NOT NULL,
    reason   text NOT NULL,
    since    timestamptz NOT NULL,
    PRIMARY KEY (id_type, value)
);

-- Whom an identifier was seen with (only when that was another customer): the quarantine count.
CREATE TABLE IF NOT EXISTS sightings (
    id_type  text NOT NULL,
    value    text NOT NULL,
    anchor   text NOT NULL,
    seen_at  timestamptz NOT NULL,
    PRIMARY KEY (id_type, value, anchor, seen_at)
);

CREATE TABLE IF NOT EXISTS processed_events (
    event_id      text PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS stores (
    store_id  text PRIMARY KEY,
    country   text NOT NULL,
    timezone  text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
