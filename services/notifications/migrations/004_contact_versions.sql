-- Profile versions by event time, for deciding each trigger on the profile as it stood at its
-- fired_at (OMNICRM_CLOCK=event: replays decide identically whichever of a trigger and a later
-- profile reached this service first). Written only under the event clock; `contacts` stays the
-- latest profile, the one messages are sent to.
--
-- A version keeps no contact point: `reachable` names the channels that had one (email, sms,
-- whatsapp), which is all a decision needs; the address is read from `contacts` at send time.
-- An erasure deletes a customer's versions with their contact row. Versions superseded more than
-- a horizon before the clock are pruned as new ones arrive (store.add_versions).

CREATE TABLE IF NOT EXISTS contact_versions (
    customer_id       text        NOT NULL,
    valid_from        timestamptz NOT NULL,   -- the profile's updated_at (event time)
    version           bigint      NOT NULL,   -- identity's version: orders versions of one instant
    reachable         text[]      NOT NULL DEFAULT '{}',
    first_name        text,
    locale            text,
    timezone          text,
    home_store_id     text,
    preferred_channel text,
    consents          jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (customer_id, valid_from, version)
);
