-- Today's rollup: today's events are rolled up as the day goes, up to a few seconds before
-- each rollup, so that a report of one day reads raw only the events since the last
-- rollup, not the whole day's.
--
-- Until now the daily views read raw events from the rollup horizon H (the first day not
-- sealed, normally today), and one day's report cost about a microsecond per event of
-- today. Now each view is the union of three parts:
--   * the day rollups, for days before H (migration 20261201000003, unchanged);
--   * today's rollup, the counts of events that occurred on day X from its start up to an
--     instant W (arbiter.rollup_today), read when it is valid and X = H;
--   * raw events from arbiter.rollup_raw_from() on: W when today's rollup is read, H
--     otherwise.
-- Their results are exactly those of the raw views, by this invariant:
--
--     while today's rollup is valid, every event of day X that occurred before W is
--     counted in it once, and no other event is.
--
-- arbiter.rollup_today() (the store's upkeep, `arbiter-session rollup`) moves W forward to
-- its start minus a lag L (arbiter.rollup_today_lag(), 5 s). It holds because:
--   * an insert takes its event's day lock (shared, migration 20261201000003) before it
--     reads the clock, and holds it until its transaction ends;
--   * the rollup reads the clock (T), then finds the transactions holding day X's lock,
--     and waits until they have ended. An insert that took the lock later read the clock
--     after T, so an event of it that occurred before W = T - L is late by more than L at
--     its insert; every other insert of an event of day X has ended, and the rollup's
--     count sees it if it committed;
--   * an insert of an event late by more than L takes today's rollup lock shared and, if
--     the event falls before W of day X, marks today's rollup invalid (until the next
--     rollup counts day X again from its start). The rollup counts and moves W under that
--     lock, held exclusively: a late insert in flight is counted, a later one sees W;
--   * retention (purge_before) takes that lock too, and invalidates today's rollup when it
--     removed an event of day X;
--   * a day rollup of X (at the day's end) makes X < H: today's rollup is no longer read,
--     and the next one starts from the new day.
-- Events late by more than L are rare (a reconciled write, a denial batch held back, a
-- store's clock behind the database's); they pay one lock and one row read more. Every
-- other insert pays a comparison.
--
-- tool_daily_usage and denials_by_reason count distinct sessions, which do not add up
-- across the two parts: today's rollup keeps their counts per session, and the views
-- count the sessions of the union. A day's sessions are a small fraction of its events.

-- The state of today's rollup: one row, or none before the first.
CREATE TABLE arbiter.rollup_today (
    only_row      boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    day           date        NOT NULL,
    counted_until timestamptz NOT NULL,
    valid         boolean     NOT NULL,
    rolled_at     timestamptz NOT NULL,
    events        bigint      NOT NULL,
    CHECK (counted_until >= day::timestamp AT TIME ZONE 'UTC'
           AND counted_until <= (day + 1)::timestamp AT TIME ZONE 'UTC')
);

COMMENT ON TABLE arbiter.rollup_today IS
    'Today''s rollup: the events of day that occurred before counted_until are counted in agent_today_rollup, tool_today_rollup and denial_today_rollup (events: how many), while valid. A late event or a purge of that day marks it invalid until the next rollup.';

CREATE TABLE arbiter.agent_today_rollup (
    day                   date   NOT NULL,
    agent_id              uuid   NOT NULL,
    events                bigint NOT NULL,
    sessions_opened       bigint NOT NULL,
    calls_allowed         bigint NOT NULL,
    calls_denied          bigint NOT NULL,
    denied_agent_mismatch bigint NOT NULL,
    denied_closed         bigint NOT NULL,
    denied_expired        bigint NOT NULL,
    denied_budget         bigint NOT NULL,
    denied_tool           bigint NOT NULL,
    denied_rate           bigint NOT NULL,
    denied_write_through  bigint NOT NULL,
    denied_invalid        bigint NOT NULL,
    denied_tool_budget    bigint NOT NULL,
    PRIMARY KEY (day, agent_id)
);

-- Per session: the views count distinct sessions over this and today's raw events.
CREATE TABLE arbiter.tool_today_rollup (
    day           date   NOT NULL,
    agent_id      uuid   NOT NULL,
    tool          text   NOT NULL,
    session_id    uuid   NOT NULL,
    calls_allowed bigint NOT NULL,
    calls_denied  bigint NOT NULL,
    PRIMARY KEY (day, agent_id, tool, session_id)
);

CREATE TABLE arbiter.denial_today_rollup (
    day        date   NOT NULL,
    agent_id   uuid   NOT NULL,
    reason     text   NOT NULL,
    session_id uuid   NOT NULL,
    denials    bigint NOT NULL,
    PRIMARY KEY (day, agent_id, reason, session_id)
);

COMMENT ON TABLE arbiter.agent_today_rollup IS
    'agent_daily_activity for today up to arbiter.rollup_today.counted_until; read it through the view.';
COMMENT ON TABLE arbiter.tool_today_rollup IS
    'tool_daily_usage for today up to arbiter.rollup_today.counted_until, per session; read it through the view.';
COMMENT ON TABLE arbiter.denial_today_rollup IS
    'denials_by_reason for today up to arbiter.rollup_today.counted_until, per session; read it through the view.';

-- L: how far behind the database's clock an event may occur and still be inserted without
-- the late path; today's rollup counts up to its start minus L.
CREATE FUNCTION arbiter.rollup_today_lag() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '5 seconds' $$;

-- The day whose rollup the views read, or NULL when they read none.
CREATE FUNCTION arbiter.rollup_today_day() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT t.day FROM arbiter.rollup_today t
     WHERE t.valid AND t.day = arbiter.rollup_horizon()
$$;

-- The first instant the views read raw events from: W while today's rollup is read, the
-- rollup horizon otherwise.
CREATE FUNCTION arbiter.rollup_raw_from() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT t.counted_until FROM arbiter.rollup_today t
                      WHERE t.valid AND t.day = arbiter.rollup_horizon()),
                    arbiter.rollup_horizon_at())
$$;

-- An event that occurred at `occurred` is being inserted (or removed) behind today's
-- rollup's back: if today's rollup counts up to a later instant of the same day, it is
-- no longer valid. Taken under today's rollup lock (shared), held to the transaction's
-- end, so that a rollup in flight either counts the event or is seen to have moved W.
CREATE FUNCTION arbiter.rollup_today_late(occurred timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup_today'), 1);
    IF EXISTS (SELECT 1 FROM arbiter.rollup_today t
                WHERE t.valid AND t.counted_until > occurred
                  AND t.day = (occurred AT TIME ZONE 'UTC')::date) THEN
        UPDATE arbiter.rollup_today SET valid = false WHERE valid;
    END IF;
END
$$;

-- Counts the events of `today` that occurred in [since, until) into today's rollup tables
-- (adding to what they hold); returns how many. The caller holds today's rollup lock.
-- The aggregates are those of the views (migrations 20261201000006, 20261201000008).
CREATE FUNCTION arbiter.rollup_today_count(today date, since timestamptz, until timestamptz)
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
    RETURN counted;
END
$$;

-- The transactions (other than this one) that hold a day's rollup lock: inserts of the
-- day's events in flight. Advisory locks are per database, so these are this database's.
CREATE FUNCTION arbiter.rollup_lock_holders(day date)
RETURNS TABLE (virtualtransaction text)
LANGUAGE sql VOLATILE AS $$
    SELECT l.virtualtransaction
      FROM pg_locks l
     WHERE l.locktype = 'advisory'
       AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
       AND l.classid = hashtext('arbiter.rollup')::oid
       AND l.objid = arbiter.rollup_lock_key(day)::oid
       AND l.objsubid = 2
       AND l.granted
       AND l.pid <> pg_backend_pid()
$$;

-- Rolls today up to its start minus L: returns the instant counted up to (W), or NULL when
-- it did not: a day before today is not sealed (the views would not read it), another
-- rollup of today is in flight, or an insert of today's events that was in flight when it
-- started was still open 10 s later (try again later). `arbiter-session rollup` and the
-- store's upkeep call it after the day rollups.
CREATE FUNCTION arbiter.rollup_today() RETURNS timestamptz
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

-- rollup_pending_days of migration 20261201000003, which now always includes yesterday
-- (when it is not sealed): a trail whose first event is of today gets yesterday sealed,
-- empty, so that today's rollup is read from the trail's first day on.
CREATE OR REPLACE FUNCTION arbiter.rollup_pending_days() RETURNS SETOF date
LANGUAGE sql STABLE AS $$
    WITH bounds AS (
        SELECT CASE WHEN EXISTS (SELECT 1 FROM arbiter.rollup_days WHERE sealed)
                    THEN arbiter.rollup_horizon()
                    ELSE least((SELECT min(day) FROM arbiter.rollup_days),
                               (SELECT (min(occurred_at) AT TIME ZONE 'UTC')::date
                                  FROM arbiter.session_events)) END AS first_day,
               (clock_timestamp() AT TIME ZONE 'UTC')::date - 1 AS last_day
    )
    SELECT d::date
      FROM bounds,
           generate_series(least(bounds.first_day, bounds.last_day), bounds.last_day,
                           interval '1 day') AS d
     WHERE NOT EXISTS (SELECT 1 FROM arbiter.rollup_days r WHERE r.day = d::date AND r.sealed)
     ORDER BY 1
$$;

-- The chain trigger's template of migration 20261201000007, with a late event's check for
-- today's rollup, after the day's lock (see the top of this file). Installed again on
-- every partition below.
CREATE OR REPLACE FUNCTION arbiter.install_event_partition_chain(partition regclass) RETURNS void
LANGUAGE plpgsql AS $install$
DECLARE
    table_name name;
    chain name;
BEGIN
    SELECT c.relname INTO table_name
      FROM pg_class c
      JOIN pg_inherits i ON i.inhrelid = c.oid
     WHERE c.oid = partition AND i.inhparent = 'arbiter.session_events'::regclass;
    IF table_name IS NULL THEN
        RAISE EXCEPTION '% is not a partition of arbiter.session_events', partition
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    chain := table_name || '_chain';
    EXECUTE format($source$
CREATE OR REPLACE FUNCTION arbiter.%1$I() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_bitmapscan = off
AS $chain$
DECLARE
    occurred_day date := (NEW.occurred_at AT TIME ZONE 'UTC')::date;
    read_at timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup'),
                                         arbiter.rollup_lock_key(occurred_day));
    read_at := clock_timestamp();
    IF NEW.occurred_at < read_at - arbiter.rollup_today_lag() THEN
        PERFORM arbiter.rollup_today_late(NEW.occurred_at);
    END IF;
    IF occurred_day < (read_at AT TIME ZONE 'UTC')::date THEN
        PERFORM arbiter.rollup_unseal(occurred_day);
    END IF;
    IF NEW.kind = 'denied' THEN
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.denials'), hashtext(NEW.session_id::text));
        -- Taken under the lock: a later link always has a larger id.
        NEW.event_id := nextval('arbiter.session_events_event_id_seq');
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.%2$I e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind = 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    ELSE
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.%2$I e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind <> 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    END IF;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := arbiter.audit_link_hash(
        NEW.prev_hash, NEW.event_key, NEW.session_id, NEW.agent_id, NEW.kind, NEW.tools,
        NEW.calls_made, NEW.rate_window_calls, NEW.status, NEW.session_version,
        NEW.occurred_at, NEW.recorded_at, NEW.instance_id, NEW.reason,
        NEW.limited_tools, NEW.tool_calls);
    RETURN NEW;
END
$chain$
$source$, chain, table_name);
    EXECUTE format('COMMENT ON FUNCTION arbiter.%I() IS %L', chain,
                   'The audit chain trigger of arbiter.' || table_name
                   || ', made by arbiter.install_event_partition_chain: install it again rather than edit it.');
    EXECUTE format('CREATE OR REPLACE TRIGGER session_events_chain BEFORE INSERT ON arbiter.%I '
                   'FOR EACH ROW EXECUTE FUNCTION arbiter.%I()', table_name, chain);
END
$install$;

SELECT arbiter.install_event_partition_chain(p.partition) FROM arbiter.event_partitions() p;

-- Retention of migration 20261201000003, which now also invalidates today's rollup when it
-- removed an event of its day.
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

        -- The rollups of the days events went from are counted again (oldest first, the
        -- lock order), so the views keep answering exactly what the raw events say.
        FOR sealed_day IN
            SELECT r.day FROM arbiter.rollup_days r
             WHERE r.sealed AND r.day BETWEEN purged_from AND purged_to
             ORDER BY r.day
        LOOP
            PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup'),
                                          arbiter.rollup_lock_key(sealed_day));
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

    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
END
$$;

-- The views, in three parts (see the top of this file). The parts are read once per query
-- (sub-selects, not per-row calls); the raw part reads the BRIN index on occurred_at.

-- agent_daily_activity of migration 20261201000006.
CREATE OR REPLACE VIEW arbiter.agent_daily_activity AS
SELECT r.agent_id, r.day, r.sessions_opened, r.calls_allowed, r.calls_denied,
       r.denied_agent_mismatch, r.denied_closed, r.denied_expired, r.denied_budget,
       r.denied_tool, r.denied_rate, r.denied_write_through, r.denied_invalid,
       r.denied_tool_budget
  FROM arbiter.agent_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT today.agent_id, today.day,
       sum(today.sessions_opened)::bigint       AS sessions_opened,
       sum(today.calls_allowed)::bigint         AS calls_allowed,
       sum(today.calls_denied)::bigint          AS calls_denied,
       sum(today.denied_agent_mismatch)::bigint AS denied_agent_mismatch,
       sum(today.denied_closed)::bigint         AS denied_closed,
       sum(today.denied_expired)::bigint        AS denied_expired,
       sum(today.denied_budget)::bigint         AS denied_budget,
       sum(today.denied_tool)::bigint           AS denied_tool,
       sum(today.denied_rate)::bigint           AS denied_rate,
       sum(today.denied_write_through)::bigint  AS denied_write_through,
       sum(today.denied_invalid)::bigint        AS denied_invalid,
       sum(today.denied_tool_budget)::bigint    AS denied_tool_budget
  FROM (SELECT t.agent_id, t.day, t.sessions_opened, t.calls_allowed, t.calls_denied,
               t.denied_agent_mismatch, t.denied_closed, t.denied_expired, t.denied_budget,
               t.denied_tool, t.denied_rate, t.denied_write_through, t.denied_invalid,
               t.denied_tool_budget
          FROM arbiter.agent_today_rollup t
         WHERE t.day = (SELECT arbiter.rollup_today_day())
        UNION ALL
        SELECT e.agent_id,
               (e.occurred_at AT TIME ZONE 'UTC')::date,
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
         WHERE e.occurred_at >= (SELECT arbiter.rollup_raw_from())
         GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date) today
 GROUP BY today.agent_id, today.day;

-- tool_daily_usage of migration 20261201000008: a session counts once per tool and day,
-- whichever parts its events are in.
CREATE OR REPLACE VIEW arbiter.tool_daily_usage AS
SELECT r.day, r.agent_id, r.tool, r.calls_allowed, r.calls_denied, r.sessions
  FROM arbiter.tool_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT per_session.day,
       per_session.agent_id,
       per_session.tool,
       sum(per_session.calls_allowed)::bigint AS calls_allowed,
       sum(per_session.calls_denied)::bigint  AS calls_denied,
       count(*)                               AS sessions
  FROM (SELECT u.day, u.agent_id, u.tool, u.session_id,
               sum(u.calls_allowed) AS calls_allowed,
               sum(u.calls_denied)  AS calls_denied
          FROM (SELECT t.day, t.agent_id, t.tool, t.session_id, t.calls_allowed, t.calls_denied
                  FROM arbiter.tool_today_rollup t
                 WHERE t.day = (SELECT arbiter.rollup_today_day())
                UNION ALL
                SELECT (e.occurred_at AT TIME ZONE 'UTC')::date,
                       e.agent_id,
                       t.tool,
                       e.session_id,
                       count(*) FILTER (WHERE e.kind <> 'denied'),
                       count(*) FILTER (WHERE e.kind = 'denied')
                  FROM arbiter.session_events e
                 CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
                 WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
                   AND e.occurred_at >= (SELECT arbiter.rollup_raw_from())
                 GROUP BY 1, 2, 3, 4) u
         GROUP BY u.day, u.agent_id, u.tool, u.session_id) per_session
 GROUP BY per_session.day, per_session.agent_id, per_session.tool;

-- denials_by_reason of migration 20261201000003, likewise per session first.
CREATE OR REPLACE VIEW arbiter.denials_by_reason AS
SELECT r.day, r.agent_id, r.reason, r.denials, r.sessions
  FROM arbiter.denial_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT per_session.day,
       per_session.agent_id,
       per_session.reason,
       sum(per_session.denials)::bigint AS denials,
       count(*)                         AS sessions
  FROM (SELECT u.day, u.agent_id, u.reason, u.session_id, sum(u.denials) AS denials
          FROM (SELECT t.day, t.agent_id, t.reason, t.session_id, t.denials
                  FROM arbiter.denial_today_rollup t
                 WHERE t.day = (SELECT arbiter.rollup_today_day())
                UNION ALL
                SELECT (e.occurred_at AT TIME ZONE 'UTC')::date,
                       e.agent_id,
                       e.reason,
                       e.session_id,
                       count(*)
                  FROM arbiter.session_events e
                 WHERE e.kind = 'denied'
                   AND e.occurred_at >= (SELECT arbiter.rollup_raw_from())
                 GROUP BY 1, 2, 3, 4) u
         GROUP BY u.day, u.agent_id, u.reason, u.session_id) per_session
 GROUP BY per_session.day, per_session.agent_id, per_session.reason;
