-- Members' lots in FIFO order (oldest expiry first): a batch that redeems a few points reads the
-- member's oldest open lots only (store.load_lots), not every order it ever placed. Not partial on
-- remaining > 0: an index predicate column would make every update of `remaining` a non-HOT update;
-- the few spent lots at the front of a member's range are skipped instead.
CREATE INDEX IF NOT EXISTS orders_fifo ON orders (owner, expires_at, order_key);
