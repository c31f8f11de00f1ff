-- The scan helpers of 003 as expressions PostgreSQL inlines into the scan's statement. Declared
-- IMMUTABLE around STABLE functions (to_char, extract of a timestamptz), or with a FROM clause, they
-- ran as a SQL function call per row (tens of microseconds each, several per due trigger). Same results.

-- rules.local_midnight: the earliest instant that reads as local midnight of day `d` in zone `tz`
-- (see 003_scan_sql.sql).
CREATE OR REPLACE FUNCTION triggers_local_midnight(d date, tz text) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN (((d::timestamp AT TIME ZONE tz) - interval '3 hours') AT TIME ZONE tz) = d::timestamp
                    THEN (d::timestamp AT TIME ZONE tz) - interval '3 hours'
                WHEN (((d::timestamp AT TIME ZONE tz) - interval '2 hours') AT TIME ZONE tz) = d::timestamp
                    THEN (d::timestamp AT TIME ZONE tz) - interval '2 hours'
                WHEN (((d::timestamp AT TIME ZONE tz) - interval '1 hour') AT TIME ZONE tz) = d::timestamp
                    THEN (d::timestamp AT TIME ZONE tz) - interval '1 hour'
                WHEN (((d::timestamp AT TIME ZONE tz) - interval '30 minutes') AT TIME ZONE tz) = d::timestamp
                    THEN (d::timestamp AT TIME ZONE tz) - interval '30 minutes'
                ELSE d::timestamp AT TIME ZONE tz END
$$;

-- datetime.isoformat() of an instant in UTC: 2026-03-01T12:00:00[.ffffff]+00:00.
CREATE OR REPLACE FUNCTION triggers_iso_utc(t timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN extract(microseconds FROM t AT TIME ZONE 'UTC')::bigint % 1000000 = 0 THEN ''
                ELSE '.' || lpad((extract(microseconds FROM t AT TIME ZONE 'UTC')::bigint % 1000000)::text, 6, '0') END
        || '+00:00'
$$;

-- Avro timestamp-millis of an instant (fastavro truncates the microseconds).
CREATE OR REPLACE FUNCTION triggers_epoch_ms(t timestamptz) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT floor(extract(epoch FROM t) * 1000)::bigint
$$;
