-- Retention in short steps, each in a transaction of its own, each waiting for a lock no
-- longer than it is given (lock_wait, 100 ms by default; the sessions' step, which is in no
-- writer's way, 10 s), never in the way of a gateway's write for longer than that. It
-- replaces the single function arbiter.purge_before, which ran in one transaction and:
--   * dropped partitions there: DROP TABLE takes an ACCESS EXCLUSIVE lock on
--     arbiter.session_events, held until the purge committed (through row deletions and
--     recounts), and while it waited behind a reader (an export, a report) every insert
--     queued behind its request;
--   * decided on snapshots that could miss a late event in flight: the drop path could drop
--     a denial committed between its check and its drop, and the row path could delete the
--     link a denial committed meanwhile points at, which verify then reports as tampering;
--   * took the day locks of the sealed days only, so that a rollup of a day not yet sealed
--     could seal counts of the events it deleted.
-- (DETACH PARTITION ... CONCURRENTLY, which takes a partition out without blocking
-- writers, is refused by PostgreSQL while the table has a default partition, as this one
-- has.)
--
-- The steps, which `operator::retention` (and the procedure arbiter.purge_before below, for
-- SQL) run in order:
--   1. arbiter.purge_sessions(cutoff): the sessions that are over, and their totals;
--   2. arbiter.purge_partition(day, cutoff): one day's partition, dropped whole, once no
--      session of its day is stored and each of its events occurred before yesterday and
--      was recorded before the cutoff. It first locks the partition SHARE (an insert into
--      it in flight is waited for, a later one waits: these are late events of old
--      sessions), decides, takes the locks of the days its events occurred on, and only
--      then drops, waiting at most lock_wait for the table's lock; its transaction ends
--      right after;
--   3. arbiter.purge_trails(cutoff, sessions, days): the whole trails of purged sessions,
--      row by row, a batch of sessions at a time (arbiter.purge_trail_candidates lists
--      them, one day at a time), under each session's denial-chain lock (a late denial of
--      one of them in flight is waited for and keeps its trail; a later one waits, and then
--      starts a new chain) and the locks of the days their events occurred on. Only the
--      days of arbiter.purge_trail_days are read: the days whose sessions were deleted while
--      their trails stayed, kept by step 1 and emptied as the trails go.
-- A purge keeps every event that occurred since the start of yesterday (UTC), and every
-- trail one of whose events did: it never takes the lock of today's or yesterday's events,
-- which every insert takes (shared). A step whose lock wait runs out answers 'busy' and
-- changes nothing; a later purge does it.
--
-- The days a step removed events of are marked not sealed in the same transaction, so the
-- views read them raw (exactly) until a rollup counts them again; `operator::retention`
-- rolls up at the end of a purge.

DROP FUNCTION arbiter.purge_before(timestamptz, boolean, date[], bigint[]);

-- A purge never removes an event that occurred since yesterday, so it no longer touches
-- today's rollup.
COMMENT ON TABLE arbiter.rollup_today IS
    'Today''s rollup: the events of day that occurred before counted_until are counted in agent_today_rollup, tool_today_rollup and denial_today_rollup (events: how many), while valid. A late event marks it invalid until the next rollup.';

-- The days whose partition may hold the trail of a session no longer stored: what step 3
-- reads, instead of every old partition. Step 1 adds the days of the sessions it deletes;
-- a dropped partition's day goes, and so does a day step 3 finds with no such trail left.
-- To start with, every day with a partition before today, and the days in the default
-- partition (each is read once by the next purge that deletes events).
CREATE TABLE arbiter.purge_trail_days (
    day date PRIMARY KEY
);

COMMENT ON TABLE arbiter.purge_trail_days IS
    'Days whose partition may hold trails of sessions no longer stored: the worklist of a purge''s row-by-row step.';

INSERT INTO arbiter.purge_trail_days (day)
SELECT p.day FROM arbiter.event_partitions() p
 WHERE p.day < (now() AT TIME ZONE 'UTC')::date
UNION
SELECT DISTINCT d.session_day FROM arbiter.session_events_default d;

-- The cutoff's checks, shared by the steps.
CREATE FUNCTION arbiter.purge_check_cutoff(cutoff timestamptz) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
BEGIN
    IF cutoff IS NULL OR cutoff > now() THEN
        RAISE EXCEPTION 'purge cutoff % is not in the past', cutoff
            USING ERRCODE = 'invalid_parameter_value', CONSTRAINT = 'purge_cutoff_in_past';
    END IF;
END
$$;

-- The first instant a purge keeps every event of: the start of yesterday (UTC).
CREATE FUNCTION arbiter.purge_keeps_from() RETURNS timestamptz
LANGUAGE sql STABLE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
    SELECT ((now() AT TIME ZONE 'UTC')::date - 1)::timestamp AT TIME ZONE 'UTC'
$$;

-- Takes the locks of the days from `first_day` to `last_day` (oldest first, the lock order)
-- exclusively, waiting at most the transaction's lock_timeout for each: no rollup counts
-- those days, and no event of them is inserted, until the transaction ends. False if a
-- wait ran out.
CREATE FUNCTION arbiter.purge_lock_days(first_day date, last_day date) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    locked date;
BEGIN
    FOR locked IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup'), arbiter.rollup_lock_key(locked));
    END LOOP;
    RETURN true;
EXCEPTION WHEN lock_not_available THEN
    RETURN false;
END
$$;

-- Step 1: deletes the sessions that are over (closed or expired and last changed before
-- the cutoff, or past their time limit), and their totals; how many. What it may wait for
-- (an ended session's row a store is expiring, the totals' lock a rollup holds) holds up no
-- writer; it waits at most 10 s for it, then fails (lock_not_available) and nothing of it
-- is done.
CREATE FUNCTION arbiter.purge_sessions(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
SET lock_timeout = '10s'
AS $$
DECLARE
    deleted bigint;
BEGIN
    PERFORM arbiter.purge_check_cutoff(cutoff);
    PERFORM set_config('arbiter.purge_cutoff', cutoff::text, true);
    WITH gone AS (
        DELETE FROM arbiter.sessions s
         WHERE arbiter.session_purgeable(s.status, s.updated_at, s.expires_at, cutoff)
        RETURNING (s.created_at AT TIME ZONE 'UTC')::date AS day
    ), days AS (
        INSERT INTO arbiter.purge_trail_days (day)
        SELECT DISTINCT gone.day FROM gone
        ON CONFLICT (day) DO NOTHING
    )
    SELECT count(*) INTO deleted FROM gone;
    -- A deleted session ended before the cutoff, so it was created before the cutoff's day
    -- ended (a day's slack for a store's clock).
    IF deleted > 0 THEN
        PERFORM arbiter.session_totals_lock();
        DELETE FROM arbiter.session_rollup t
         WHERE t.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = t.session_id);
    END IF;
    PERFORM set_config('arbiter.purge_cutoff', '', true);
    RETURN deleted;
END
$$;

-- Step 2: drops the partition of `day` whole, if it may go. `outcome` says what happened:
-- 'dropped' (with its events' count and, if `list_sessions`, their sessions), 'busy' (a
-- lock wait ran out:
-- nothing changed, a later purge tries again), 'recent' (not a day before the cutoff's and
-- before yesterday, or an event of it occurred since the start of yesterday), 'late' (an
-- event of it was recorded at or after the cutoff), 'session' (a session of the day is
-- stored), 'changed' (it no longer holds `archived_rows` rows, the count an archive
-- wrote), or 'absent' (no such partition). Run it in a transaction of its own, ended
-- right after: the table's lock the drop takes is held until then.
CREATE FUNCTION arbiter.purge_partition(
    day date, cutoff timestamptz, archived_rows bigint DEFAULT NULL,
    lock_wait interval DEFAULT interval '100 milliseconds', list_sessions boolean DEFAULT false,
    OUT outcome text, OUT events bigint, OUT sessions uuid[])
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
-- Its count reads the partition whole: no plan is worth compiling for that.
SET jit = off
AS $$
DECLARE
    partition regclass;
    day_start timestamptz := day::timestamp AT TIME ZONE 'UTC';
    recorded_late boolean;
    first_occurred timestamptz;
    last_occurred timestamptz;
BEGIN
    PERFORM arbiter.purge_check_cutoff(cutoff);
    events := 0;
    sessions := '{}';
    partition := to_regclass(format('arbiter.%I', 'session_events_' || to_char(day, 'YYYYMMDD')));
    IF partition IS NULL THEN
        outcome := 'absent';
        RETURN;
    END IF;
    IF day IS NULL OR day >= least((cutoff AT TIME ZONE 'UTC')::date,
                                   (now() AT TIME ZONE 'UTC')::date - 1) THEN
        outcome := 'recent';
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', (extract(epoch FROM lock_wait) * 1000)::bigint::text, true);
    BEGIN
        EXECUTE format('LOCK TABLE %s IN SHARE MODE', partition);
    EXCEPTION WHEN lock_not_available THEN
        outcome := 'busy';
        RETURN;
    END;
    -- From here on no event enters the partition: what is decided below stays true.
    IF EXISTS (SELECT 1 FROM arbiter.sessions s
                WHERE s.created_at >= day_start AND s.created_at < day_start + interval '1 day') THEN
        outcome := 'session';
        RETURN;
    END IF;
    EXECUTE format('SELECT count(*), coalesce(bool_or(recorded_at >= $1), false),'
                   ' min(occurred_at), max(occurred_at) FROM %s', partition)
       INTO events, recorded_late, first_occurred, last_occurred USING cutoff;
    outcome := CASE WHEN recorded_late THEN 'late'
                    WHEN last_occurred >= arbiter.purge_keeps_from() THEN 'recent'
                    WHEN archived_rows IS NOT NULL AND events IS DISTINCT FROM archived_rows
                        THEN 'changed' END;
    IF outcome IS NOT NULL THEN
        events := 0;
        sessions := '{}';
        RETURN;
    END IF;
    IF first_occurred IS NOT NULL
       AND NOT arbiter.purge_lock_days((first_occurred AT TIME ZONE 'UTC')::date,
                                       (last_occurred AT TIME ZONE 'UTC')::date) THEN
        outcome := 'busy';
        events := 0;
        sessions := '{}';
        RETURN;
    END IF;
    IF list_sessions THEN
        -- Read before the drop, under the same locks: exactly the trails that go.
        EXECUTE format('SELECT coalesce(array_agg(DISTINCT session_id), ''{}'') FROM %s',
                       partition)
           INTO sessions;
    END IF;
    BEGIN
        EXECUTE format('DROP TABLE %s', partition);
    EXCEPTION WHEN lock_not_available THEN
        outcome := 'busy';
        events := 0;
        sessions := '{}';
        RETURN;
    END;
    EXECUTE format('DROP FUNCTION IF EXISTS arbiter.%I()',
                   'session_events_' || to_char(day, 'YYYYMMDD') || '_chain');
    DELETE FROM arbiter.purge_trail_days t WHERE t.day = purge_partition.day;
    -- The days its events occurred on are read raw until a rollup counts them again.
    UPDATE arbiter.rollup_days r SET sealed = false
     WHERE r.sealed AND r.day BETWEEN (first_occurred AT TIME ZONE 'UTC')::date
                                  AND (last_occurred AT TIME ZONE 'UTC')::date;
    outcome := 'dropped';
END
$$;

-- The days step 3 reads for `cutoff`: those of arbiter.purge_trail_days before the
-- cutoff's next and before yesterday (a session's events are recorded after its day, with
-- a day's slack for a store's clock), oldest first.
CREATE FUNCTION arbiter.purge_trail_worklist(cutoff timestamptz) RETURNS SETOF date
LANGUAGE sql STABLE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
    SELECT t.day FROM arbiter.purge_trail_days t
     WHERE t.day < least((cutoff AT TIME ZONE 'UTC')::date + 2,
                         (now() AT TIME ZONE 'UTC')::date - 1)
     ORDER BY 1
$$;

-- Up to `max_sessions` purged sessions of `day` whose whole trail step 3 may delete, in
-- session order: no longer stored, every event of them occurred before yesterday and was
-- recorded before the cutoff. One read of the day's partition (the sessions that keep
-- their trail found once, as a set). When none is left and no other trail of a session no
-- longer stored is in the partition, the day leaves arbiter.purge_trail_days.
CREATE FUNCTION arbiter.purge_trail_candidates(cutoff timestamptz, day date, max_sessions integer)
RETURNS TABLE (session_id uuid, session_day date)
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
SET enable_nestloop = off
SET jit = off
AS $$
DECLARE
    keeps_from timestamptz := arbiter.purge_keeps_from();
    listed integer;
BEGIN
    RETURN QUERY
    WITH gone AS MATERIALIZED (
        SELECT DISTINCT e.session_id
          FROM arbiter.session_events e
         WHERE e.session_day = purge_trail_candidates.day
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = e.session_id)
    ), kept AS MATERIALIZED (
        SELECT DISTINCT l.session_id
          FROM arbiter.session_events l
          JOIN gone g ON g.session_id = l.session_id
         WHERE l.session_day = purge_trail_candidates.day
           AND (l.recorded_at >= cutoff OR l.occurred_at >= keeps_from)
    )
    SELECT g.session_id, purge_trail_candidates.day
      FROM gone g
     WHERE NOT EXISTS (SELECT 1 FROM kept k WHERE k.session_id = g.session_id)
     ORDER BY 1
     LIMIT max_sessions;
    GET DIAGNOSTICS listed = ROW_COUNT;
    IF listed = 0 AND NOT EXISTS (
        SELECT 1 FROM arbiter.session_events e
         WHERE e.session_day = purge_trail_candidates.day
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = e.session_id)) THEN
        DELETE FROM arbiter.purge_trail_days t WHERE t.day = purge_trail_candidates.day;
    END IF;
END
$$;

-- Step 3: deletes the whole trails of `sessions` (with their days, at the same positions)
-- that may go: the sessions are gone, and every event of them occurred before yesterday
-- and was recorded before the cutoff, as seen once each session's denial chain is locked.
-- `outcome` is 'deleted' (with the events' count and the sessions whose trail went; some
-- may have kept theirs), or 'busy' (a lock wait ran out: nothing changed).
CREATE FUNCTION arbiter.purge_trails(
    cutoff timestamptz, sessions uuid[], days date[],
    lock_wait interval DEFAULT interval '100 milliseconds',
    OUT outcome text, OUT events bigint, OUT purged uuid[])
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
SET jit = off
AS $$
DECLARE
    keeps_from timestamptz := arbiter.purge_keeps_from();
    chained uuid;
    doomed_sessions uuid[];
    doomed_days date[];
    first_occurred timestamptz;
    last_occurred timestamptz;
BEGIN
    PERFORM arbiter.purge_check_cutoff(cutoff);
    events := 0;
    purged := '{}';
    PERFORM set_config('lock_timeout', (extract(epoch FROM lock_wait) * 1000)::bigint::text, true);
    -- In session order, the order a batch of denials takes them in.
    BEGIN
        FOR chained IN SELECT DISTINCT s FROM unnest(sessions) AS s ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(hashtext('arbiter.denials'), hashtext(chained::text));
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        outcome := 'busy';
        RETURN;
    END;
    SELECT coalesce(array_agg(c.s ORDER BY c.s), '{}'), coalesce(array_agg(c.d ORDER BY c.s), '{}')
      INTO doomed_sessions, doomed_days
      FROM unnest(sessions, days) AS c(s, d)
     WHERE NOT EXISTS (SELECT 1 FROM arbiter.sessions x WHERE x.session_id = c.s)
       AND NOT EXISTS (SELECT 1 FROM arbiter.session_events e
                        WHERE e.session_id = c.s AND e.session_day = c.d
                          AND (e.recorded_at >= cutoff OR e.occurred_at >= keeps_from));
    outcome := 'deleted';
    IF cardinality(doomed_sessions) = 0 THEN
        RETURN;
    END IF;
    SELECT min(e.occurred_at), max(e.occurred_at) INTO first_occurred, last_occurred
      FROM unnest(doomed_sessions, doomed_days) AS c(s, d)
      JOIN arbiter.session_events e ON e.session_id = c.s AND e.session_day = c.d;
    IF first_occurred IS NULL THEN
        RETURN;
    END IF;
    IF NOT arbiter.purge_lock_days((first_occurred AT TIME ZONE 'UTC')::date,
                                   (last_occurred AT TIME ZONE 'UTC')::date) THEN
        outcome := 'busy';
        RETURN;
    END IF;
    PERFORM set_config('arbiter.purge_cutoff', cutoff::text, true);
    PERFORM set_config('arbiter.purge_events', 'on', true);
    WITH gone AS (
        DELETE FROM arbiter.session_events e
         USING unnest(doomed_sessions, doomed_days) AS c(s, d)
         WHERE e.session_id = c.s AND e.session_day = c.d
        RETURNING e.session_id
    )
    SELECT count(*), coalesce(array_agg(DISTINCT gone.session_id), '{}')
      INTO events, purged FROM gone;
    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
    UPDATE arbiter.rollup_days r SET sealed = false
     WHERE r.sealed AND r.day BETWEEN (first_occurred AT TIME ZONE 'UTC')::date
                                  AND (last_occurred AT TIME ZONE 'UTC')::date;
END
$$;

-- The whole purge, for SQL (psql, pg_cron): the steps above, each committed before the
-- next, then the rollups of the days it removed events of. Returns what it deleted. It
-- must be called on its own (CALL arbiter.purge_before(...), outside a transaction block),
-- and has no SET clause (a procedure with one cannot commit): every name in it is
-- qualified. Steps found busy are left to a later purge.
CREATE PROCEDURE arbiter.purge_before(
    cutoff timestamptz, with_events boolean DEFAULT false,
    INOUT sessions_deleted bigint DEFAULT NULL, INOUT events_deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    candidate record;
    step record;
    batch_sessions uuid[];
    batch_days date[];
    progressed boolean;
BEGIN
    sessions_deleted := arbiter.purge_sessions(cutoff);
    events_deleted := 0;
    COMMIT;
    IF NOT with_events THEN
        RETURN;
    END IF;
    FOR candidate IN SELECT c.day FROM arbiter.purge_partition_candidates(cutoff) AS c LOOP
        SELECT * INTO step FROM arbiter.purge_partition(candidate.day, cutoff);
        IF step.outcome = 'dropped' THEN
            events_deleted := events_deleted + step.events;
        END IF;
        COMMIT;
    END LOOP;
    FOR candidate IN SELECT w AS day FROM arbiter.purge_trail_worklist(cutoff) AS w LOOP
        LOOP
            SELECT array_agg(t.session_id ORDER BY t.session_id),
                   array_agg(t.session_day ORDER BY t.session_id)
              INTO batch_sessions, batch_days
              FROM arbiter.purge_trail_candidates(cutoff, candidate.day, 256) AS t;
            COMMIT;
            EXIT WHEN batch_sessions IS NULL;
            SELECT * INTO step FROM arbiter.purge_trails(cutoff, batch_sessions, batch_days);
            COMMIT;
            progressed := step.outcome = 'deleted' AND cardinality(step.purged) > 0;
            events_deleted := events_deleted + step.events;
            EXIT WHEN NOT progressed;
        END LOOP;
    END LOOP;
    FOR candidate IN SELECT d AS day FROM arbiter.rollup_pending_days() AS d LOOP
        EXIT WHEN arbiter.rollup_day(candidate.day) IS NULL;
        COMMIT;
    END LOOP;
END
$$;
