-- Triggers held for their customer's profile (status 'pending', reason 'awaiting_profile', no
-- channel): the trigger record (Avro, as consumed) is kept so it can be decided when the profile
-- arrives; due_at is the end of the grace period, when the dispatcher's sweep ends it no_contact.
-- The column is emptied as soon as the row leaves the hold.

ALTER TABLE notifications ADD COLUMN IF NOT EXISTS held_trigger bytea;

CREATE INDEX IF NOT EXISTS notifications_held ON notifications (customer_id)
    WHERE status = 'pending' AND reason = 'awaiting_profile';
CREATE INDEX IF NOT EXISTS notifications_held_due ON notifications (due_at)
    WHERE status = 'pending' AND reason = 'awaiting_profile';
