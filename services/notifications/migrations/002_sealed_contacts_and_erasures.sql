-- Contact points encrypted at rest, and a record of every erasure.
--
-- The clear text[] columns of 001 are dropped, not converted: the key lives in the application
-- (OMNICRM_DATA_KEYS, shared/crypto.py), so SQL cannot seal them. Nothing is released yet; a
-- development database only loses contact points until the customer's next profile update.
-- Each value is `01 | len(kid) | kid | nonce | AES-256-GCM ciphertext+tag`, sealed with the
-- context `notifications.contacts/<customer_id>/<email|phone|whatsapp_id>`.

ALTER TABLE contacts
    DROP COLUMN IF EXISTS emails,
    DROP COLUMN IF EXISTS phones,
    DROP COLUMN IF EXISTS whatsapp_ids;

ALTER TABLE contacts
    ADD COLUMN IF NOT EXISTS emails_sealed       bytea[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS phones_sealed       bytea[] NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS whatsapp_ids_sealed bytea[] NOT NULL DEFAULT '{}',
    -- the data key every value of the row is sealed with; `rekey` moves rows to the active key
    ADD COLUMN IF NOT EXISTS key_id              text;

-- One row per customer whose profile tombstone was applied here (erase or merge-away):
-- when, and which kinds of personal data this service dropped. Kept after the erasure on purpose:
-- it holds no personal data, only the pseudonymous id the erase report is asked about.
CREATE TABLE IF NOT EXISTS erasures (
    customer_id text PRIMARY KEY,
    erased_at   timestamptz NOT NULL,
    what        text[]      NOT NULL DEFAULT '{}'
);
