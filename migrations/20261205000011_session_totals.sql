-- session_utilization without a lookup per session, with today's rollup, and a report of
-- the sessions since an instant that reads only theirs.
--
-- The view of migration 20261201000006 cost two things that grew with what it returned or
-- with the day's traffic, measured on the bench's trail (10 million events: 100,000 ended
-- sessions over 30 days, 20 agents; 64 live sessions with 211,000 events of today; psql,
-- JIT off, work_mem 64 MB, the executor's time):
--   * its `recent` part grouped every 'denied' and 'closed' event since the horizon H,
--     that is, read all of today's partition (its BRIN index cannot skip what it must
--     read): 57 ms of the 89 ms one-day report, whatever the report's range;
--   * its days before H came from a lookup per session (an aggregate over the session's
--     rows of session_day_rollup), about 2 µs each: 210 ms of the 30-day report's 529 ms.
-- Now:
--   * today's rollup (migration 20261201000009) counts the sessions' part too, in
--     arbiter.session_today_rollup (per session: its denials and its first close of the
--     day before W), under the invariant and the locks of that migration; the view reads
--     it while it is valid and raw events only from arbiter.rollup_raw_from() on, as the
--     daily views do;
--   * arbiter.session_rollup holds, per session, the totals of its session_day_rollup rows:
--     the sum of their denials, the earliest of their closes and the last of their days.
--     The report joins them (one hash join, not a lookup per session). When the last day
--     is before H, every day the totals count is before H, and they are exactly the
--     per-day lookup's answer. When it is not (a late event unsealed one of the session's
--     days), the report falls back to that lookup for this session;
--   * arbiter.session_utilization_since(since) is the report of the sessions created at or
--     after `since`, and the view is that report since -infinity (a SQL function, inlined
--     into the query that calls it: a condition on the view reaches its tables as before).
--     Its parameter reaches the totals too, through their session's creation day
--     (session_day): a condition on the view's created_at cannot (PostgreSQL carries a
--     range across a join only as far as the column it names), so the view joins every
--     session's totals, and a report of one day would read all of them.
-- Same data, same measurement (best and worst of three): one day 89 ms before, 11-15 ms
-- after; 30 days 529 ms before, 237-262 ms after; one day with 500,000 more sessions'
-- totals stored, 10-15 ms (the view filtered on created_at: 86-101 ms). This migration took
-- 0.75 s on that trail.
--
-- The invariant of session_rollup: every session of arbiter.sessions that has rows in
-- session_day_rollup has one row here, holding their totals and its creation day. (A
-- session whose row is gone may keep its totals until purge_before removes them.)
-- rollup_count_day, the only writer of session_day_rollup, counts again the totals of every
-- session whose rows of the day it replaced or wrote, in the same transaction. Rolling up
-- two days of one session at once (one transaction per day) would lose one day's update
-- (each reads the other's rows as they were before it committed), so the totals are counted
-- under an exclusive lock (arbiter.session_totals_lock()), taken after the day's rows are
-- written and held to the transaction's end: the next transaction to take it reads every
-- day's rows committed before. A transaction takes no day lock after it: purge_before,
-- which counts several days in one transaction, now takes all their locks before it counts
-- the first.

CREATE TABLE arbiter.session_rollup (
    session_id  uuid        PRIMARY KEY,
    -- The UTC day of the session's created_at (its events' session_day).
    session_day date        NOT NULL,
    -- The sum of its rows' denials in session_day_rollup.
    denials     bigint      NOT NULL,
    -- The earliest of their closes.
    closed_at   timestamptz,
    -- The last day it has a row of.
    last_day    date        NOT NULL
);

-- A report since an instant reads the totals of the sessions created since its day.
CREATE INDEX session_rollup_by_day ON arbiter.session_rollup (session_day);

COMMENT ON TABLE arbiter.session_rollup IS
    'Per session, the totals of its rows in session_day_rollup (denials, first close, last day) and its creation day, kept by rollup_count_day; session_utilization reads them while last_day is before the rollup horizon. Read it through the view.';

CREATE TABLE arbiter.session_today_rollup (
    day        date        NOT NULL,
    session_id uuid        NOT NULL,
    -- Its 'denied' events of the day before arbiter.rollup_today.counted_until.
    denials    bigint      NOT NULL,
    -- Its first 'closed' event among them, if it had one.
    closed_at  timestamptz,
    PRIMARY KEY (day, session_id)
);

COMMENT ON TABLE arbiter.session_today_rollup IS
    'session_utilization''s denials and close times for today up to arbiter.rollup_today.counted_until, per session; read it through the view.';

-- The lock under which a transaction counts sessions' totals: exclusive, to its end.
CREATE FUNCTION arbiter.session_totals_lock() RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtext('arbiter.session_rollup'))
$$;

-- The session's creation day on each of its day rows, as its events carry it (NULL in
-- the rows counted before this migration): the totals take it when the session's own row
-- is gone.
ALTER TABLE arbiter.session_day_rollup ADD COLUMN session_day date;

-- Counts again the totals of the sessions whose rows of session_day_rollup the count of
-- `rolled_day` replaced (`replaced`) or wrote (its rows now). A session with no rows left
-- has no totals. Its creation day comes from its row in arbiter.sessions, else from its
-- day rows, else from its totals as they were; a session with none of the three gets no
-- totals, which no report reads (it has no row). The caller holds the lock; each statement
-- here reads a snapshot taken after it. The arrays are only ever scanned once, as the outer
-- side of a join: a plan that rescanned one per row would cost the square of a day's
-- sessions.
CREATE FUNCTION arbiter.rollup_session_totals(rolled_day date, replaced uuid[])
RETURNS void
LANGUAGE plpgsql
SET jit = off
AS $$
BEGIN
    DELETE FROM arbiter.session_rollup t
     WHERE t.session_id = ANY (replaced)
       AND NOT EXISTS (SELECT 1 FROM arbiter.session_day_rollup r
                        WHERE r.session_id = t.session_id);
    INSERT INTO arbiter.session_rollup AS t (session_id, session_day, denials, closed_at, last_day)
    SELECT totals.session_id,
           coalesce((s.created_at AT TIME ZONE 'UTC')::date, totals.session_day,
                    kept.session_day),
           totals.denials, totals.closed_at, totals.last_day
      FROM (SELECT r.session_id, max(r.session_day) AS session_day,
                   sum(r.denials)::bigint AS denials, min(r.closed_at) AS closed_at,
                   max(r.day) AS last_day
              FROM (SELECT u.session_id FROM unnest(replaced) AS u(session_id)
                    UNION
                    SELECT d.session_id FROM arbiter.session_day_rollup d
                     WHERE d.day = rolled_day) touched
              JOIN arbiter.session_day_rollup r ON r.session_id = touched.session_id
             GROUP BY r.session_id) totals
      LEFT JOIN arbiter.sessions s ON s.session_id = totals.session_id
      LEFT JOIN arbiter.session_rollup kept ON kept.session_id = totals.session_id
     WHERE coalesce((s.created_at AT TIME ZONE 'UTC')::date, totals.session_day,
                    kept.session_day) IS NOT NULL
    ON CONFLICT (session_id) DO UPDATE SET
        session_day = excluded.session_day,
        denials     = excluded.denials,
        closed_at   = excluded.closed_at,
        last_day    = excluded.last_day;
END
$$;

-- rollup_count_day of migration 20261201000006, which now counts again the totals of the
-- sessions whose rows of the day it replaced or wrote.
CREATE OR REPLACE FUNCTION arbiter.rollup_count_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql
SET jit = off
-- purge_before, which calls this, turns nested loops off for its own statements; the
-- counts here are planned with the default (see migration 20261201000004).
SET enable_nestloop = on
AS $$
DECLARE
    day_start timestamptz := rolled_day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (rolled_day + 1)::timestamp AT TIME ZONE 'UTC';
    counted   bigint;
    replaced  uuid[];
BEGIN
    -- First: it summarizes the day's BRIN ranges, which the count below reads too.
    counted := arbiter.rollup_count_day_views(rolled_day);
    UPDATE arbiter.agent_day_rollup r
       SET denied_tool_budget = d.denials
      FROM arbiter.denial_day_rollup d
     WHERE r.day = rolled_day AND d.day = rolled_day
       AND d.agent_id = r.agent_id AND d.reason = 'tool_budget';
    WITH gone AS (
        DELETE FROM arbiter.session_day_rollup WHERE day = rolled_day RETURNING session_id
    )
    SELECT coalesce(array_agg(gone.session_id), '{}') INTO replaced FROM gone;
    INSERT INTO arbiter.session_day_rollup (day, session_id, session_day, denials, closed_at)
    SELECT rolled_day, e.session_id, min(e.session_day),
           count(*) FILTER (WHERE e.kind = 'denied'),
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
      FROM arbiter.session_events e
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
       AND e.kind IN ('denied', 'closed')
     GROUP BY e.session_id;
    -- Last: the lock is held to the transaction's end (see the top of this file).
    PERFORM arbiter.session_totals_lock();
    PERFORM arbiter.rollup_session_totals(rolled_day, replaced);
    RETURN counted;
END
$$;

-- Counts the events of `today` that occurred in [since, until) into today's rollup tables;
-- rollup_today_count of migration 20261201000009, with the sessions' part.
CREATE OR REPLACE FUNCTION arbiter.rollup_today_count(today date, since timestamptz, until timestamptz)
RETURNS bigint
LANGUAGE plpgsql
SET jit = off
AS $$
DECLARE
    counted bigint;
BEGIN
    WITH counts AS MATERIALIZED (
        SELECT today AS day, e.agent_id,
               count(*) AS events,
               count(*) FILTER (WHERE e.kind = 'created'),
               coalesce(sum(cardinality(e.tools))
                        FILTER (WHERE e.kind IN ('call_allowed', 'batch_allowed')), 0),
               count(*) FILTER (WHERE e.kind = 'denied'),
               count(*) FILTER (WHERE e.reason = 'agent_mismatch'),
               count(*) FILTER (WHERE e.reason = 'closed'),
               count(*) FILTER (WHERE e.reason = 'expired'),
               count(*) FILTER (WHERE e.reason = 'budget'),
               count(*) FILTER (WHERE e.reason = 'tool'),
               count(*) FILTER (WHERE e.reason = 'rate'),
               count(*) FILTER (WHERE e.reason = 'write_through'),
               count(*) FILTER (WHERE e.reason = 'invalid'),
               count(*) FILTER (WHERE e.reason = 'tool_budget')
          FROM arbiter.session_events e
         WHERE e.occurred_at >= since AND e.occurred_at < until
         GROUP BY e.agent_id
    ), added AS (
        INSERT INTO arbiter.agent_today_rollup AS r
        SELECT * FROM counts
        ON CONFLICT (day, agent_id) DO UPDATE SET
            events                = r.events + excluded.events,
            sessions_opened       = r.sessions_opened + excluded.sessions_opened,
            calls_allowed         = r.calls_allowed + excluded.calls_allowed,
            calls_denied          = r.calls_denied + excluded.calls_denied,
            denied_agent_mismatch = r.denied_agent_mismatch + excluded.denied_agent_mismatch,
            denied_closed         = r.denied_closed + excluded.denied_closed,
            denied_expired        = r.denied_expired + excluded.denied_expired,
            denied_budget         = r.denied_budget + excluded.denied_budget,
            denied_tool           = r.denied_tool + excluded.denied_tool,
            denied_rate           = r.denied_rate + excluded.denied_rate,
            denied_write_through  = r.denied_write_through + excluded.denied_write_through,
            denied_invalid        = r.denied_invalid + excluded.denied_invalid,
            denied_tool_budget    = r.denied_tool_budget + excluded.denied_tool_budget
    )
    SELECT coalesce(sum(counts.events), 0) INTO counted FROM counts;

    INSERT INTO arbiter.tool_today_rollup AS r
    SELECT today, e.agent_id, t.tool, e.session_id,
           count(*) FILTER (WHERE e.kind <> 'denied'),
           count(*) FILTER (WHERE e.kind = 'denied')
      FROM arbiter.session_events e
     CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
     WHERE e.occurred_at >= since AND e.occurred_at < until
       AND e.kind IN ('call_allowed', 'batch_allowed', 'denied')
     GROUP BY e.agent_id, t.tool, e.session_id
    ON CONFLICT (day, agent_id, tool, session_id) DO UPDATE SET
        calls_allowed = r.calls_allowed + excluded.calls_allowed,
        calls_denied  = r.calls_denied + excluded.calls_denied;

    INSERT INTO arbiter.denial_today_rollup AS r
    SELECT today, e.agent_id, e.reason, e.session_id, count(*)
      FROM arbiter.session_events e
     WHERE e.occurred_at >= since AND e.occurred_at < until
       AND e.kind = 'denied'
     GROUP BY e.agent_id, e.reason, e.session_id
    ON CONFLICT (day, agent_id, reason, session_id) DO UPDATE SET
        denials = r.denials + excluded.denials;

    -- The sessions' part: [since, until) follows what was counted, so the sum of the
    -- denials and the earlier of the closes are those of the whole day before until.
    INSERT INTO arbiter.session_today_rollup AS r
    SELECT today, e.session_id,
           count(*) FILTER (WHERE e.kind = 'denied'),
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
      FROM arbiter.session_events e
     WHERE e.occurred_at >= since AND e.occurred_at < until
       AND e.kind IN ('denied', 'closed')
     GROUP BY e.session_id
    ON CONFLICT (day, session_id) DO UPDATE SET
        denials   = r.denials + excluded.denials,
        closed_at = least(r.closed_at, excluded.closed_at);
    RETURN counted;
END
$$;

-- rollup_today of migration 20261201000009, which now empties the sessions' part too when it
-- counts the day again from its start.
CREATE OR REPLACE FUNCTION arbiter.rollup_today() RETURNS timestamptz
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    started  timestamptz;
    until    timestamptz;
    today    date;
    inserts  text[];
    since    timestamptz;
    state    arbiter.rollup_today%ROWTYPE;
    counted  bigint;
BEGIN
    -- Each statement below must read a snapshot taken after the wait and the lock.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'a rollup runs at READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state', CONSTRAINT = 'rollup_read_committed';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('arbiter.rollup_today'), 0) THEN
        RETURN NULL;
    END IF;
    -- The clock first, then the inserts in flight: an insert that takes day X's lock
    -- after they are listed reads the clock after this reading.
    started := clock_timestamp();
    until := started - arbiter.rollup_today_lag();
    today := (until AT TIME ZONE 'UTC')::date;
    -- The views read today's rollup only while every day before it is sealed.
    IF arbiter.rollup_horizon() IS DISTINCT FROM today THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(l.virtualtransaction) INTO inserts
      FROM arbiter.rollup_lock_holders(today) l;
    WHILE EXISTS (SELECT 1 FROM arbiter.rollup_lock_holders(today) l
                   WHERE l.virtualtransaction = ANY (inserts)) LOOP
        IF clock_timestamp() > started + interval '10 seconds' THEN
            RETURN NULL;
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;

    PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup_today'), 1);
    SELECT * INTO state FROM arbiter.rollup_today;
    IF NOT FOUND OR NOT state.valid OR state.day <> today THEN
        DELETE FROM arbiter.agent_today_rollup;
        DELETE FROM arbiter.tool_today_rollup;
        DELETE FROM arbiter.denial_today_rollup;
        DELETE FROM arbiter.session_today_rollup;
        since := today::timestamp AT TIME ZONE 'UTC';
        state.events := 0;
    ELSE
        since := state.counted_until;
    END IF;

    IF until > since THEN
        -- The raw part of the views finds what came after W through the BRIN indexes on
        -- occurred_at, whose complete block ranges autovacuum summarizes. They are not
        -- summarized here: a summarized range is updated by every insert into it, and
        -- today's partitions are being written.
        counted := arbiter.rollup_today_count(today, since, until);
    ELSE
        until := since;
        counted := 0;
    END IF;

    INSERT INTO arbiter.rollup_today AS t (day, counted_until, valid, rolled_at, events)
        VALUES (today, until, true, clock_timestamp(), state.events + counted)
        ON CONFLICT (only_row) DO UPDATE
        SET day = excluded.day, counted_until = excluded.counted_until, valid = true,
            rolled_at = excluded.rolled_at, events = excluded.events;
    RETURN until;
END
$$;

-- purge_before of migration 20261201000009, which now takes the locks of all the days it
-- counts again before it counts the first (see the top of this file).
CREATE OR REPLACE FUNCTION arbiter.purge_before(
    cutoff timestamptz, with_events boolean DEFAULT false,
    archived_days date[] DEFAULT NULL, archived_rows bigint[] DEFAULT NULL,
    OUT sessions_deleted bigint, OUT events_deleted bigint)
LANGUAGE plpgsql
-- A batch job over whole days: the planner, which cannot know how many sessions have late
-- events, would loop over them for every row; hash joins are what every step here needs.
SET enable_nestloop = off
-- Compiling these statements' plans, which span every partition, would cost more than
-- running them (see rollup_count_day).
SET jit = off
AS $$
DECLARE
    partition regclass;
    partition_day date;
    rows bigint;
    days_with_sessions date[];
    recorded_late boolean;
    first_occurred timestamptz;
    last_occurred timestamptz;
    purged_from date;
    purged_to date;
    sealed_day date;
    recounted date[];
BEGIN
    IF cutoff IS NULL OR cutoff > now() THEN
        RAISE EXCEPTION 'purge cutoff % is not in the past', cutoff
            USING ERRCODE = 'invalid_parameter_value', CONSTRAINT = 'purge_cutoff_in_past';
    END IF;
    PERFORM set_config('arbiter.purge_cutoff', cutoff::text, true);
    PERFORM set_config('arbiter.purge_events', CASE WHEN with_events THEN 'on' ELSE '' END, true);

    DELETE FROM arbiter.sessions s
     WHERE (s.status <> 'active' AND s.updated_at < cutoff)
        OR (s.status = 'active' AND s.expires_at < least(cutoff, now()));
    GET DIAGNOSTICS sessions_deleted = ROW_COUNT;

    events_deleted := 0;
    IF with_events THEN
        SELECT coalesce(array_agg(DISTINCT (s.created_at AT TIME ZONE 'UTC')::date), '{}')
          INTO days_with_sessions
          FROM arbiter.sessions s;
        FOR partition, partition_day IN
            SELECT p.partition, p.day FROM arbiter.event_partitions() p
             WHERE p.day IS NOT NULL
               -- A day before the cutoff's, and before yesterday: no store whose clock
               -- is right still creates sessions of that day, and a session lives at
               -- most a day. Today's and the days ahead stay, however empty.
               AND p.day < least((cutoff AT TIME ZONE 'UTC')::date,
                                 (now() AT TIME ZONE 'UTC')::date - 1)
               AND NOT p.day = ANY (days_with_sessions)
             ORDER BY p.day
        LOOP
            -- One pass over the partition: its rows, whether any came after the cutoff,
            -- and the days they occurred on (for the rollups).
            EXECUTE format('SELECT count(*), coalesce(bool_or(recorded_at >= $1), false),'
                           ' min(occurred_at), max(occurred_at) FROM %s', partition)
               INTO rows, recorded_late, first_occurred, last_occurred USING cutoff;
            CONTINUE WHEN recorded_late;
            IF archived_days IS NOT NULL THEN
                CONTINUE WHEN NOT partition_day = ANY (archived_days)
                    OR rows IS DISTINCT FROM
                       archived_rows[array_position(archived_days, partition_day)];
            END IF;
            EXECUTE format('DROP TABLE %s', partition);
            events_deleted := events_deleted + rows;
            purged_from := least(purged_from, (first_occurred AT TIME ZONE 'UTC')::date);
            purged_to := greatest(purged_to, (last_occurred AT TIME ZONE 'UTC')::date);
        END LOOP;

        -- Only the days up to the day after the cutoff's (and the default partition) can
        -- hold an event recorded before the cutoff: a session's events are recorded after
        -- it was created (a day's slack for a store's clock). Later days are not read.
        -- The sessions with an event recorded at or after the cutoff keep their whole
        -- trail: found once, as a set (a probe per row would cost more than the delete).
        -- An archiving purge deletes nothing row by row (rows stays 0).
        WITH late AS MATERIALIZED (
            SELECT DISTINCT l.session_id FROM arbiter.session_events l
             WHERE l.recorded_at >= cutoff
               AND l.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
        ), purged AS (
            DELETE FROM arbiter.session_events e
             WHERE archived_days IS NULL
               AND e.recorded_at < cutoff
               AND e.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
               AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = e.session_id)
               AND NOT EXISTS (SELECT 1 FROM late WHERE late.session_id = e.session_id)
            RETURNING e.occurred_at
        )
        SELECT count(*), min(occurred_at), max(occurred_at)
          INTO rows, first_occurred, last_occurred
          FROM purged;
        events_deleted := events_deleted + rows;
        purged_from := least(purged_from, (first_occurred AT TIME ZONE 'UTC')::date);
        purged_to := greatest(purged_to, (last_occurred AT TIME ZONE 'UTC')::date);

        -- The rollups of the days events went from are counted again, so the views keep
        -- answering exactly what the raw events say: the days' locks first (oldest first,
        -- the lock order), then the counts, each of which ends by taking the sessions'
        -- totals lock, after which a transaction must take no day lock.
        recounted := ARRAY(SELECT r.day FROM arbiter.rollup_days r
                            WHERE r.sealed AND r.day BETWEEN purged_from AND purged_to
                            ORDER BY r.day);
        FOREACH sealed_day IN ARRAY recounted LOOP
            PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup'),
                                          arbiter.rollup_lock_key(sealed_day));
        END LOOP;
        FOREACH sealed_day IN ARRAY recounted LOOP
            PERFORM arbiter.rollup_count_day(sealed_day);
        END LOOP;

        -- Today's rollup, if it counted an event of a day events went from, is no longer
        -- valid (after the day locks: the order the chain trigger takes them in).
        IF purged_from IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup_today'), 1);
            UPDATE arbiter.rollup_today SET valid = false
             WHERE valid AND day BETWEEN purged_from AND purged_to;
        END IF;
    END IF;

    -- The totals of the sessions deleted above go too: last, under the sessions' totals
    -- lock (after every day lock). A deleted session ended before the cutoff, so it was
    -- created before the cutoff's day ended (a day's slack, as above).
    IF sessions_deleted > 0 THEN
        PERFORM arbiter.session_totals_lock();
        DELETE FROM arbiter.session_rollup t
         WHERE t.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = t.session_id);
    END IF;

    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
END
$$;

-- The totals of the days rolled up so far. A rollup in flight with the functions of
-- migration 20261201000006 holds its lock on session_day_rollup, which this waits for; later
-- ones wait for this migration, and then run the functions above. Then today's rollup,
-- which has no sessions' part yet: the next rollup counts the day again from its start, and
-- the views read it raw until then. That is done under the lock a rollup of today takes
-- first (it only tries it), so that none in flight marks it valid again.
DO $$
BEGIN
    LOCK TABLE arbiter.session_day_rollup IN SHARE MODE;
    PERFORM arbiter.session_totals_lock();
    INSERT INTO arbiter.session_rollup (session_id, session_day, denials, closed_at, last_day)
    SELECT r.session_id, (s.created_at AT TIME ZONE 'UTC')::date,
           sum(r.denials)::bigint, min(r.closed_at), max(r.day)
      FROM arbiter.session_day_rollup r
      JOIN arbiter.sessions s ON s.session_id = r.session_id
     GROUP BY r.session_id, s.created_at;

    PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup_today'), 0);
    UPDATE arbiter.rollup_today SET valid = false WHERE valid;
END
$$;

-- The sessions created at or after `since`, with their utilization: session_utilization's
-- rows, which are this function's since -infinity, and its three parts as at the top of
-- this file. A SQL function of one query, inlined into the query that calls it (keep it
-- so: not STRICT, no SET clause, one statement), so that conditions on its columns reach
-- its tables as a view's do.
CREATE FUNCTION arbiter.session_utilization_since(since timestamptz)
RETURNS TABLE (
    session_id       uuid,
    agent_id         uuid,
    status           text,
    call_budget      bigint,
    calls_made       bigint,
    budget_used_pct  numeric,
    budget_exhausted boolean,
    created_at       timestamptz,
    ended_at         timestamptz,
    duration         interval,
    denials          bigint,
    tool_use         jsonb)
LANGUAGE sql STABLE AS $utilization$
WITH recent AS (
    -- Per session, its denials and first close from the rollup horizon on: today's rollup,
    -- while it is read, and the raw events after it.
    SELECT u.session_id, sum(u.denials)::bigint AS denials, min(u.closed_at) AS closed_at
      FROM (SELECT t.session_id, t.denials, t.closed_at
              FROM arbiter.session_today_rollup t
             WHERE t.day = (SELECT arbiter.rollup_today_day())
            UNION ALL
            SELECT e.session_id,
                   count(*) FILTER (WHERE e.kind = 'denied'),
                   min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
              FROM arbiter.session_events e
             WHERE e.kind IN ('denied', 'closed')
               AND e.occurred_at >= (SELECT arbiter.rollup_raw_from())
             GROUP BY e.session_id) u
     GROUP BY u.session_id
)
SELECT s.session_id,
       s.agent_id,
       -- A session past its time limit is expired whether or not expire_due marked it.
       CASE WHEN s.status = 'active' AND s.expires_at <= now() THEN 'expired'
            ELSE s.status END                                  AS status,
       s.call_budget,
       s.calls_made,
       round(100.0 * s.calls_made / s.call_budget, 1)          AS budget_used_pct,
       s.calls_made >= s.call_budget                           AS budget_exhausted,
       s.created_at,
       ended.at                                                AS ended_at,
       ended.at - s.created_at                                 AS duration,
       coalesce(rolled.denials, 0) + coalesce(recent.denials, 0) AS denials,
       CASE WHEN cardinality(s.limited_tools) > 0 THEN
           (SELECT jsonb_object_agg(t.tool, jsonb_build_object('limit', t.lim, 'calls', t.used))
              FROM unnest(s.limited_tools, s.tool_limits, s.tool_calls) AS t(tool, lim, used))
       END                                                     AS tool_use
  FROM arbiter.sessions s
  -- Its totals: those of a session created since `since` are of its day or later.
  LEFT JOIN arbiter.session_rollup total
         ON total.session_id = s.session_id
        AND total.session_day >= (since AT TIME ZONE 'UTC')::date
  -- Its denials and first close on the days before the horizon: its totals when all their
  -- days are (nearly always), else its rows of those days. The sub-selects run only then.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN total.last_day < (SELECT arbiter.rollup_horizon()) THEN total.denials
                 WHEN total.session_id IS NOT NULL THEN
                     (SELECT sum(r.denials)::bigint FROM arbiter.session_day_rollup r
                       WHERE r.session_id = s.session_id
                         AND r.day < (SELECT arbiter.rollup_horizon()))
             END AS denials,
             CASE
                 WHEN total.last_day < (SELECT arbiter.rollup_horizon()) THEN total.closed_at
                 WHEN total.session_id IS NOT NULL THEN
                     (SELECT min(r.closed_at) FROM arbiter.session_day_rollup r
                       WHERE r.session_id = s.session_id
                         AND r.day < (SELECT arbiter.rollup_horizon()))
             END AS closed_at
  ) rolled
  LEFT JOIN recent ON recent.session_id = s.session_id
  -- When it ended: a close at its event's time (or at the row's last change, for a close
  -- made with plain SQL, which writes no event); an expiry at its time limit; NULL while live.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN s.status = 'closed'
                     THEN coalesce(least(rolled.closed_at, recent.closed_at), s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended
 WHERE s.created_at >= since
$utilization$;

COMMENT ON FUNCTION arbiter.session_utilization_since(timestamptz) IS
    'session_utilization''s rows of the sessions created at or after since; a report of a range reads only those sessions'' rollups.';

-- The same columns and answers as migration 20261201000006's view.
CREATE OR REPLACE VIEW arbiter.session_utilization AS
SELECT * FROM arbiter.session_utilization_since('-infinity');
