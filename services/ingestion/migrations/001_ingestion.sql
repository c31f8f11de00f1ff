-- Ingestion's own tables (schema `ingestion`).

-- Every event_id ever accepted, from HTTP, Shopify or the raw topic: the idempotency keys.
-- A row is written in the same transaction that publishes (HTTP) or outboxes (raw topic) the event,
-- so "seen" always means "durably in Kafka or about to be, atomically".
CREATE TABLE IF NOT EXISTS seen_events (
    event_id    text PRIMARY KEY,
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- Shopify retries a webhook with the same X-Shopify-Webhook-Id: answered once.
CREATE TABLE IF NOT EXISTS shopify_webhooks (
    webhook_id  text PRIMARY KEY,
    topic       text,
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- refunds/create carries no customer: the one identifier of the order (least sensitive kind
-- first: Shopify customer id, else email, else phone) and its currency, kept from the order webhook.
CREATE TABLE IF NOT EXISTS shopify_orders (
    order_id         text PRIMARY KEY,
    identifier_kind  text NOT NULL,
    identifier       text NOT NULL,
    currency         text,
    seen_at          timestamptz NOT NULL DEFAULT now()
);
