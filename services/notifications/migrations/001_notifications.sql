-- Notifications: contact read model (from identity.profiles.v1), store time zones, merge aliases,
-- and one row per (trigger, channel) notification that is both the decision record and the send queue.

CREATE TABLE IF NOT EXISTS contacts (
    customer_id       text PRIMARY KEY,
    emails            text[] NOT NULL DEFAULT '{}',
    phones            text[] NOT NULL DEFAULT '{}',
    whatsapp_ids      text[] NOT NULL DEFAULT '{}',
    first_name        text,
    locale            text,
    timezone          text,
    home_store_id     text,
    preferred_channel text,
    consents          jsonb  NOT NULL DEFAULT '{}',
    version           bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Customers whose profile was tombstoned (erase or merge-away): later triggers are suppressed `erased`.
CREATE TABLE IF NOT EXISTS forgotten (
    customer_id  text PRIMARY KEY,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS stores (
    store_id  text PRIMARY KEY,
    timezone  text NOT NULL
);

-- merged -> survivor: a merged customer's history counts for the survivor's caps.
CREATE TABLE IF NOT EXISTS aliases (
    merged    text PRIMARY KEY,
    survivor  text NOT NULL
);
CREATE INDEX IF NOT EXISTS aliases_survivor ON aliases (survivor);

CREATE TABLE IF NOT EXISTS notifications (
    notification_id      uuid PRIMARY KEY,
    trigger_id           text        NOT NULL,
    customer_id          text        NOT NULL,
    kind                 text        NOT NULL,
    period               text        NOT NULL DEFAULT '',
    promotional          boolean     NOT NULL,
    channel              text,
    status               text        NOT NULL,
    reason               text,
    locale               text,
    subject              text,
    body                 text,
    params               jsonb       NOT NULL DEFAULT '{}',
    fallbacks            text[]      NOT NULL DEFAULT '{}',
    timezone             text,
    cap_date             date,                    -- local date the message counts on for caps
    scheduled_for        timestamptz,
    due_at               timestamptz,             -- business time it is due (pending/deferred only)
    retry_at             timestamptz,             -- back-off after a failed attempt (wall time)
    attempt              integer     NOT NULL DEFAULT 0,
    claimed_by           bigint,                  -- dispatcher worker holding the send
    lease_until          timestamptz,
    provider             text,
    provider_message_id  text,
    sent_at              timestamptz,
    trigger_occurred_at  timestamptz,
    decided_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS notifications_trigger ON notifications (trigger_id);
CREATE INDEX IF NOT EXISTS notifications_customer ON notifications (customer_id, decided_at DESC);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (due_at)
    WHERE status IN ('pending', 'deferred');
CREATE INDEX IF NOT EXISTS notifications_provider_msg ON notifications (provider, provider_message_id)
    WHERE provider_message_id IS NOT NULL;
