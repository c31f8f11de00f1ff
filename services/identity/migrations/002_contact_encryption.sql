-- Contact data encrypted at rest (issue 12). Identifiers are keyed by (id_type, token), token being
-- the HMAC blind index of the normalised value (shared/crypto.py Vault.index): every lookup and the
-- one-owner-per-identifier uniqueness go through it. Contact values (email, phone, whatsapp_id) are
-- stored only sealed (AES-256-GCM, key id inside the blob); other ids (loyalty_id, ...) stay clear.
-- The over-merge guard's tables keep only the token.
--
-- 001 is kept as it was: a database that already holds clear rows gets them renamed to *_v1 here and
-- converted by the application (store.convert_legacy, run before the first batch and by rekey),
-- since the keys live in the application, not in SQL. A fresh database drops the empty *_v1 tables.

ALTER TABLE identifiers RENAME TO identifiers_v1;
ALTER TABLE identifiers_v1 RENAME CONSTRAINT identifiers_pkey TO identifiers_v1_pkey;
ALTER INDEX identifiers_customer RENAME TO identifiers_v1_customer;
ALTER TABLE quarantined_identifiers RENAME TO quarantined_identifiers_v1;
ALTER TABLE quarantined_identifiers_v1 RENAME CONSTRAINT quarantined_identifiers_pkey
    TO quarantined_identifiers_v1_pkey;
ALTER TABLE sightings RENAME TO sightings_v1;
ALTER TABLE sightings_v1 RENAME CONSTRAINT sightings_pkey TO sightings_v1_pkey;

CREATE TABLE identifiers (
    id_type           text  NOT NULL,
    token             bytea NOT NULL,           -- blind index: HMAC(index key, type, value)
    value             text,                     -- clear, only for non-contact ids
    sealed            bytea,                    -- AES-GCM, only for contact ids
    customer_id       text  NOT NULL,
    home_customer_id  text  NOT NULL,           -- the customer it was first attached to (unmerge)
    linked_at         timestamptz NOT NULL,
    event_id          text,
    PRIMARY KEY (id_type, token),
    CHECK ((value IS NULL) <> (sealed IS NULL))
);
CREATE INDEX identifiers_customer ON identifiers (customer_id);

CREATE TABLE quarantined_identifiers (
    id_type  text  NOT NULL,
    token    bytea NOT NULL,
    reason   text  NOT NULL,
    since    timestamptz NOT NULL,
    PRIMARY KEY (id_type, token)
);

CREATE TABLE sightings (
    id_type  text  NOT NULL,
    token    bytea NOT NULL,
    anchor   text  NOT NULL,
    seen_at  timestamptz NOT NULL,
    PRIMARY KEY (id_type, token, anchor, seen_at)
);
CREATE INDEX sightings_seen_at ON sightings (seen_at);

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM identifiers_v1) AND NOT EXISTS (SELECT 1 FROM quarantined_identifiers_v1)
       AND NOT EXISTS (SELECT 1 FROM sightings_v1) THEN
        DROP TABLE identifiers_v1, quarantined_identifiers_v1, sightings_v1;
    END IF;
END $$;
