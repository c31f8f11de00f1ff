-- The event time a record stands for when its value cannot say it (a tombstone): published as the
-- `omnicrm-event-at` header, so replays under the event clock order the tombstone where it happened.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS event_at timestamptz;
