-- Helpers of the set-based time-based scan (store.scan_due_sql): the same instants and strings as
-- the Python rules compute, so the scan can decide and describe due triggers in SQL.

-- rules.local_midnight: the first instant of local day `d` in zone `tz`. Python (fold=0) takes the
-- earlier of two instants where midnight repeats; PostgreSQL takes the later one, so the earliest
-- instant that reads as local midnight is chosen. In a DST gap both use the offset before it.
CREATE OR REPLACE FUNCTION triggers_local_midnight(d date, tz text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN ((v - interval '3 hours') AT TIME ZONE tz) = d::timestamp THEN v - interval '3 hours'
                WHEN ((v - interval '2 hours') AT TIME ZONE tz) = d::timestamp THEN v - interval '2 hours'
                WHEN ((v - interval '1 hour') AT TIME ZONE tz) = d::timestamp THEN v - interval '1 hour'
                WHEN ((v - interval '30 minutes') AT TIME ZONE tz) = d::timestamp THEN v - interval '30 minutes'
                ELSE v END
    FROM (SELECT d::timestamp AT TIME ZONE tz AS v) AS p
$$;

-- datetime.isoformat() of an instant in UTC: 2026-03-01T12:00:00[.ffffff]+00:00.
CREATE OR REPLACE FUNCTION triggers_iso_utc(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN extract(microseconds FROM t AT TIME ZONE 'UTC')::bigint % 1000000 = 0 THEN ''
                ELSE '.' || lpad((extract(microseconds FROM t AT TIME ZONE 'UTC')::bigint % 1000000)::text, 6, '0') END
        || '+00:00'
$$;

-- Avro timestamp-millis of an instant (fastavro truncates the microseconds).
CREATE OR REPLACE FUNCTION triggers_epoch_ms(t timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT floor(extract(epoch FROM t) * 1000)::bigint
$$;

-- A scan marks what fired in the facts of ~a third of the customers at once: room on each page
-- lets those updates stay HOT (no index entries rewritten). Applies to pages written from now on.
ALTER TABLE customer_facts SET (fillfactor = 70);
