-- What the reports' raw read of today needs from the partitions that hold today's events.
--
-- The daily views read raw the events from arbiter.rollup_raw_from() on (migration
-- 20261201000009): normally the last minute's. They find them through the BRIN index on
-- occurred_at, which skips every block range whose summary lies before that instant. Two
-- things keep it from doing so, and both are left to autovacuum until now:
--   * the block ranges written since the last VACUUM have no summary, and a BRIN scan
--     reads every unsummarized range: with autovacuum off, the whole of today's partition;
--     with it on, up to the fifth of it that an insert-only table grows before autovacuum
--     comes round;
--   * without statistics on occurred_at (a partition created ahead, empty when it was
--     last analyzed) the planner does not know that the column follows the table's
--     order, so it reads the partition sequentially instead.
-- Measured on a database with 10 million historical events and 1.1 million of today
-- (autovacuum off, as on the machine of the README's figures): the one-day agents report
-- executed in 218 ms (a sequential scan of today's partition), 206 ms once the partition
-- was analyzed (a BRIN scan that rechecked all 1.1 million rows), 4.4 ms once its ranges
-- were summarized as well.
--
-- arbiter.refresh_recent_partitions() does both for the partitions that can hold events of
-- today (a session lives at most 24 hours: yesterday's and today's, and the default), and
-- the rollup (the store's upkeep, `arbiter-session rollup`) calls it after today's rollup:
--   * brin_summarize_new_values summarizes the ranges written since it last ran, about a
--     minute of events, so what a report reads raw is the events since the last upkeep and
--     at most one range (32 blocks) more;
--   * ANALYZE only a partition that has never been analyzed with rows (no statistics on
--     occurred_at) and holds 16 blocks or more: once per partition. The planner scales the
--     row estimate to the table's current size by itself; what it needs from the sample is
--     the column's order, which an append-only partition keeps.
-- Both take the partition's SHARE UPDATE EXCLUSIVE lock, which inserts do not wait for; a
-- partition whose lock is taken (a VACUUM, an ANALYZE, another rollup) is left for the next
-- rollup rather than waited for.

CREATE FUNCTION arbiter.refresh_recent_partitions() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    today date := (clock_timestamp() AT TIME ZONE 'UTC')::date;
    recent record;
    brin regclass;
    analyzed integer := 0;
BEGIN
    FOR recent IN
        SELECT p.partition, c.relname, c.relnamespace::regnamespace::name AS schema_name
          FROM arbiter.event_partitions() p
          JOIN pg_class c ON c.oid = p.partition
         WHERE p.day IS NULL OR p.day BETWEEN today - 1 AND today
    LOOP
        -- Never wait for the lock: the one that holds it is a VACUUM (which summarizes
        -- too), an ANALYZE or another process's rollup, and a waiting request would make
        -- PostgreSQL cancel an autovacuum of the partition. Next time, then.
        BEGIN
            EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT',
                           recent.partition);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        FOR brin IN
            SELECT i.indexrelid::regclass
              FROM pg_index i
              JOIN pg_class ic ON ic.oid = i.indexrelid
              JOIN pg_am am ON am.oid = ic.relam
             WHERE i.indrelid = recent.partition AND am.amname = 'brin'
        LOOP
            PERFORM brin_summarize_new_values(brin);
        END LOOP;
        IF pg_relation_size(recent.partition) >= 16 * current_setting('block_size')::bigint
           AND NOT EXISTS (SELECT 1 FROM pg_stats s
                            WHERE s.schemaname = recent.schema_name
                              AND s.tablename = recent.relname
                              AND s.attname = 'occurred_at') THEN
            EXECUTE format('ANALYZE %s', recent.partition);
            analyzed := analyzed + 1;
        END IF;
    END LOOP;
    RETURN analyzed;
END
$$;

COMMENT ON FUNCTION arbiter.refresh_recent_partitions() IS
    'Summarizes the new BRIN ranges of the partitions that can hold today''s events, and analyzes one that has no statistics yet (returns how many it analyzed), so that the reports read raw only the events since the last rollup. Called by the rollup.';
