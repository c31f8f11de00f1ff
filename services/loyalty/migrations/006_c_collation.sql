-- Keys compare as bytes. The server's default collation (C.UTF-8 here, a libc locale) makes every
-- comparison of a text key go through strcoll, in every index probe and insert; "C" compares with
-- memcmp. Nothing orders these columns for people: the ledger pages by (occurred_at, seq), and for
-- UTF-8 C.UTF-8 orders by code point, which is byte order, so no result changes order either way.
-- Indexes on the columns are rebuilt; the rows are not rewritten.
ALTER TABLE accounts ALTER COLUMN customer_id TYPE text COLLATE "C";
ALTER TABLE ledger ALTER COLUMN event_id TYPE text COLLATE "C",
                   ALTER COLUMN kind TYPE text COLLATE "C",
                   ALTER COLUMN customer_id TYPE text COLLATE "C";
ALTER TABLE orders ALTER COLUMN order_key TYPE text COLLATE "C",
                   ALTER COLUMN owner TYPE text COLLATE "C";
ALTER TABLE processed ALTER COLUMN key TYPE text COLLATE "C";
