-- Keys compare as bytes, as loyalty's do (its migration 006). The server's default collation
-- (C.UTF-8 here, a libc locale) makes every comparison of a text key go through strcoll, in every
-- index probe and insert; "C" compares with memcmp. For UTF-8, C.UTF-8 orders by code point, which
-- is byte order, so no result changes order. Indexes on the columns are rebuilt; rows are not
-- rewritten.
ALTER TABLE customer_events ALTER COLUMN source TYPE text COLLATE "C",
                            ALTER COLUMN event_id TYPE text COLLATE "C",
                            ALTER COLUMN owner TYPE text COLLATE "C";
ALTER TABLE customer_facts ALTER COLUMN customer_id TYPE text COLLATE "C";
ALTER TABLE purchases ALTER COLUMN customer_id TYPE text COLLATE "C",
                      ALTER COLUMN event_id TYPE text COLLATE "C";
ALTER TABLE category_facts ALTER COLUMN customer_id TYPE text COLLATE "C",
                           ALTER COLUMN category TYPE text COLLATE "C";
ALTER TABLE point_lots ALTER COLUMN customer_id TYPE text COLLATE "C",
                       ALTER COLUMN lot_id TYPE text COLLATE "C";
ALTER TABLE carts ALTER COLUMN customer_id TYPE text COLLATE "C",
                  ALTER COLUMN cart_id TYPE text COLLATE "C";
ALTER TABLE fired_triggers ALTER COLUMN customer_id TYPE text COLLATE "C";
ALTER TABLE merged_into ALTER COLUMN merged TYPE text COLLATE "C",
                        ALTER COLUMN survivor TYPE text COLLATE "C";
