-- A dated tombstone (OMNICRM_CLOCK=event): identity's merge-away and erasure tombstones carry their
-- event time, and a trigger fired before it may reach this service after it (the triggers topic is
-- a hop behind identity's). So that a replay decides such a trigger as it would have had it arrived
-- first, the customer is gone only from `gone_from`: a trigger fired earlier is decided on the
-- profile version in force at its fired_at and then stopped (suppressed `erased`) exactly as the
-- tombstone stops an unsent message. The versions before `gone_from` are kept (they hold no contact
-- point) until `keep_versions_until`, a horizon later in event time, then deleted.
-- NULL `gone_from` (wall clock, or a tombstone with no time): gone for every trigger.

ALTER TABLE forgotten ADD COLUMN IF NOT EXISTS gone_from timestamptz;
ALTER TABLE forgotten ADD COLUMN IF NOT EXISTS keep_versions_until timestamptz;
CREATE INDEX IF NOT EXISTS forgotten_versions_kept ON forgotten (keep_versions_until)
    WHERE keep_versions_until IS NOT NULL;
