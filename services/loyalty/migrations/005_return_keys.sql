-- Returns count once by what they return (book.return_key: 'return:' || order key || ':' || return
-- id) as well as by their event id. Returns applied before that key existed get it here, from the
-- ledger entry each made (its detail holds the return id, its order_id finds the order's key), so a
-- till's retry of one of them under a new event id is refused too. Returns that took back no points
-- made no entry, and returns of erased members lost their order reference: those keep only their
-- event-id key.
INSERT INTO processed (key)
SELECT DISTINCT 'return:' || o.order_key || ':' || (l.detail->>'return_id')
FROM ledger l JOIN orders o ON o.order_id = l.order_id
WHERE l.kind = 'reverse' AND l.detail ? 'return_id'
ON CONFLICT DO NOTHING;
