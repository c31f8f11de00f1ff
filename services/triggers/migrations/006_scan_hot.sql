-- More room on each customer_facts page for the scan's marks (004 left 30%). A scan marks what fired
-- in the facts of whole runs of customers at once (those whose last purchase fell on the same days,
-- stored side by side), and 30% held the new versions of only ~11 of a page's ~29 rows: a quarter of
-- a million-customer scan's marks went to other pages, each with a new entry in all six indexes
-- (~380,000 index inserts). At 50% every mark of the benchmark's first scan stays on its page (HOT).
-- Applies to pages written from now on.
ALTER TABLE customer_facts SET (fillfactor = 50);
