-- arbiter.rollup_day seals a day only where the horizon is.
--
-- The views read the days before the rollup horizon from rollups, and the horizon is the
-- first day not sealed, or the day after the last sealed one (arbiter.rollup_horizon). A
-- day whose events were all inserted on the day itself has no row in rollup_days until its
-- rollup seals it. Sealing a later day first (as docs/reporting.md's SQL recipe did, going
-- on past a day another rollup held) moved the horizon past it: its events were then read
-- neither from rollups nor raw, and it was never pending again.
--
-- So a day is sealed only when no earlier day the views would need is left unsealed: while
-- some day is sealed, only a day up to the horizon (a first seal of the horizon's day, or a
-- recount of a sealed day); before the first seal, only the first day with an event or a
-- row. Any other call returns NULL, as for a busy day: the caller goes on from the horizon
-- next time. The checks run after the day's lock, on snapshots taken then.
CREATE OR REPLACE FUNCTION arbiter.rollup_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql
SET jit = off
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
BEGIN
    IF rolled_day IS NULL OR rolled_day >= (clock_timestamp() AT TIME ZONE 'UTC')::date THEN
        RAISE EXCEPTION 'day % is not over yet', rolled_day
            USING ERRCODE = 'invalid_parameter_value', CONSTRAINT = 'rollup_day_over';
    END IF;
    -- At REPEATABLE READ the statements below would read the snapshot taken before the
    -- lock, and could miss an insert that committed while the lock was awaited.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'a rollup runs at READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state', CONSTRAINT = 'rollup_read_committed';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('arbiter.rollup'),
                                     arbiter.rollup_lock_key(rolled_day)) THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM arbiter.rollup_days WHERE sealed) THEN
        IF rolled_day > arbiter.rollup_horizon() THEN
            RETURN NULL;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM arbiter.rollup_days r WHERE r.day < rolled_day)
       OR EXISTS (SELECT 1 FROM arbiter.session_events e
                   WHERE e.occurred_at < rolled_day::timestamp AT TIME ZONE 'UTC'
                     -- A session's events occur on its day or later: older partitions only.
                     AND e.session_day <= rolled_day) THEN
        RETURN NULL;
    END IF;
    RETURN arbiter.rollup_count_day(rolled_day);
END
$$;
