-- orders_fifo (owner, expires_at, order_key) answers every read by owner that orders_by_owner
-- (owner, sale_at) did (points held, spend in the window, erasure, the HTTP summary: a member's
-- few orders are read through the owner prefix), so each new order writes two secondary index
-- entries instead of three.
DROP INDEX IF EXISTS orders_by_owner;
