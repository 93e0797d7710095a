-- Rollups for reports: the daily aggregates of the reporting views are kept for days that
-- are over, so that a report's cost does not grow with the months of trail stored.
--
-- Three views of migration 20261124000006 (agent_daily_activity, tool_daily_usage,
-- denials_by_reason) become the union of two parts split at the rollup horizon H
-- (arbiter.rollup_horizon()): the rollup tables for days before H, and the raw events
-- from H on. Their results are exactly those of the raw views, by this invariant:
--
--     every event whose UTC day of occurrence is before H is counted in the rollup of its
--     day, and in no other.
--
-- H is the first day that is not sealed (arbiter.rollup_days), or the day after the last
-- sealed day; with no sealed day it is -infinity, and the views read raw events only.
-- The invariant holds because:
--   * a day is sealed only by arbiter.rollup_count_day, which counts the day's events
--     while it holds the day's rollup lock (advisory, key space 'arbiter.rollup', one key
--     per day) exclusively, and only once the day is over;
--   * every insert of an event takes its day's rollup lock shared, until its transaction
--     ends: a rollup waits for the inserts in flight, and an insert waits for a rollup;
--   * an insert of an event whose day is over (a late event: a reconciled write, a
--     denial recorded after midnight, a clock behind) unseals its day, after taking that
--     lock, so that it sees the seal of a rollup that ran just before it;
--   * retention (purge_before) counts again, under the same lock, every sealed day it
--     removed events of.
-- The rollup locks are taken by rollup_day with a try-lock: a rollup never queues behind
-- an insert, so inserts never wait for one another through it.
--
-- session_utilization is per session, not per day, and stays raw; its two lookups per
-- session now name the session's partition (every event carries its session's creation
-- day), so each reads one partition instead of all of them.

CREATE TABLE arbiter.rollup_days (
    day       date        PRIMARY KEY,
    sealed    boolean     NOT NULL,
    rolled_at timestamptz,
    events    bigint      NOT NULL DEFAULT 0
);

COMMENT ON TABLE arbiter.rollup_days IS
    'The UTC days of the rollups: sealed when the rollup tables count every event of the day (events: how many); unsealed when an event came for the day after its rollup, which leaves the day to the raw events until the next rollup.';

CREATE TABLE arbiter.agent_day_rollup (
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
    PRIMARY KEY (day, agent_id)
);

CREATE TABLE arbiter.tool_day_rollup (
    day           date   NOT NULL,
    agent_id      uuid   NOT NULL,
    tool          text   NOT NULL,
    calls_allowed bigint NOT NULL,
    calls_denied  bigint NOT NULL,
    sessions      bigint NOT NULL,
    PRIMARY KEY (day, agent_id, tool)
);

CREATE TABLE arbiter.denial_day_rollup (
    day      date   NOT NULL,
    agent_id uuid   NOT NULL,
    reason   text   NOT NULL,
    denials  bigint NOT NULL,
    sessions bigint NOT NULL,
    PRIMARY KEY (day, agent_id, reason)
);

COMMENT ON TABLE arbiter.agent_day_rollup IS
    'agent_daily_activity for the sealed days before the rollup horizon; read it through the view.';
COMMENT ON TABLE arbiter.tool_day_rollup IS
    'tool_daily_usage for the sealed days before the rollup horizon; read it through the view.';
COMMENT ON TABLE arbiter.denial_day_rollup IS
    'denials_by_reason for the sealed days before the rollup horizon; read it through the view.';

-- The rollup lock of a day: (key space, days since 2000-01-01).
CREATE FUNCTION arbiter.rollup_lock_key(day date) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT day - DATE '2000-01-01' $$;

-- The first day the views read from raw events.
CREATE FUNCTION arbiter.rollup_horizon() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN coalesce(bool_or(sealed), false)
                THEN coalesce(min(day) FILTER (WHERE NOT sealed), max(day) + 1)
                ELSE '-infinity'::date END
      FROM arbiter.rollup_days
$$;

-- The same, as the instant the raw part starts.
CREATE FUNCTION arbiter.rollup_horizon_at() RETURNS timestamptz
LANGUAGE sql STABLE AS $$ SELECT arbiter.rollup_horizon()::timestamp AT TIME ZONE 'UTC' $$;

-- A late event's day goes back to raw events. The row lock this may take is held by
-- late events of one day only, and only until their transactions end.
CREATE FUNCTION arbiter.rollup_unseal(late_day date) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM arbiter.rollup_days WHERE day = late_day AND NOT sealed) THEN
        RETURN;
    END IF;
    INSERT INTO arbiter.rollup_days AS r (day, sealed) VALUES (late_day, false)
        ON CONFLICT (day) DO UPDATE SET sealed = false WHERE r.sealed;
END
$$;

-- Counts one day's events into the rollup tables and seals the day; returns the number of
-- events. The caller holds the day's rollup lock exclusively. Each statement here reads a
-- snapshot taken after the lock (a volatile function at READ COMMITTED), so it sees every
-- insert that held the lock before.
CREATE FUNCTION arbiter.rollup_count_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql
-- Its plans span every partition, and their estimates pass the JIT thresholds while the
-- work takes milliseconds: compiling cost seconds per statement (docs/reporting.md).
SET jit = off
AS $$
DECLARE
    day_start timestamptz := rolled_day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (rolled_day + 1)::timestamp AT TIME ZONE 'UTC';
    counted   bigint;
BEGIN
    -- The BRIN indexes on occurred_at of the day's partitions (events occur on their
    -- session's day or the next) summarize what was written since autovacuum last did:
    -- an unsummarized block range matches every query, so the count below and the raw
    -- part of the views would read it whole.
    PERFORM brin_summarize_new_values(i.indexrelid)
       FROM arbiter.event_partitions() p
       JOIN pg_index i ON i.indrelid = p.partition
       JOIN pg_class c ON c.oid = i.indexrelid
       JOIN pg_am a ON a.oid = c.relam AND a.amname = 'brin'
      WHERE p.day BETWEEN rolled_day - 1 AND rolled_day;

    DELETE FROM arbiter.agent_day_rollup WHERE day = rolled_day;
    DELETE FROM arbiter.tool_day_rollup WHERE day = rolled_day;
    DELETE FROM arbiter.denial_day_rollup WHERE day = rolled_day;

    -- The aggregates are those of the views (migration 20261124000006), for one day.
    INSERT INTO arbiter.agent_day_rollup
    SELECT rolled_day, e.agent_id,
           count(*),
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
           count(*) FILTER (WHERE e.reason = 'invalid')
      FROM arbiter.session_events e
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
     GROUP BY e.agent_id;

    INSERT INTO arbiter.tool_day_rollup
    SELECT rolled_day, e.agent_id, t.tool,
           count(*) FILTER (WHERE e.kind <> 'denied'),
           count(*) FILTER (WHERE e.kind = 'denied'),
           count(DISTINCT e.session_id)
      FROM arbiter.session_events e
     CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
       AND e.kind IN ('call_allowed', 'batch_allowed', 'denied')
     GROUP BY e.agent_id, t.tool;

    INSERT INTO arbiter.denial_day_rollup
    SELECT rolled_day, e.agent_id, e.reason, count(*), count(DISTINCT e.session_id)
      FROM arbiter.session_events e
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
       AND e.kind = 'denied'
     GROUP BY e.agent_id, e.reason;

    SELECT coalesce(sum(r.events), 0) INTO counted
      FROM arbiter.agent_day_rollup r WHERE r.day = rolled_day;
    INSERT INTO arbiter.rollup_days AS r (day, sealed, rolled_at, events)
        VALUES (rolled_day, true, clock_timestamp(), counted)
        ON CONFLICT (day) DO UPDATE
        SET sealed = true, rolled_at = excluded.rolled_at, events = excluded.events;
    RETURN counted;
END
$$;

-- Rolls up one day that is over: its number of events, or NULL when an insert of one of
-- its events is still in flight (try again later). `arbiter-session rollup` and the
-- store's upkeep call it for each of arbiter.rollup_pending_days(), oldest first.
CREATE FUNCTION arbiter.rollup_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql SET jit = off AS $$
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
    RETURN arbiter.rollup_count_day(rolled_day);
END
$$;

-- The days a rollup has to seal, oldest first: from the horizon (or, before the first
-- rollup, the first day with an event) to yesterday, the days not sealed.
CREATE FUNCTION arbiter.rollup_pending_days() RETURNS SETOF date
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
           generate_series(coalesce(bounds.first_day, bounds.last_day), bounds.last_day,
                           interval '1 day') AS d
     WHERE NOT EXISTS (SELECT 1 FROM arbiter.rollup_days r WHERE r.day = d::date AND r.sealed)
     ORDER BY 1
$$;

-- The chain trigger of migration 20261201000002 with, first, the event's rollup lock
-- (shared) and, for a late event, the unsealing of its day.
--
-- Its settings: each lookup here is "the newest link of one session", which an ordered
-- scan of the chain's index answers at once. With a partition's statistics behind a hot
-- session, the planner expected a handful of rows, fetched and sorted every denial of the
-- session instead (27 ms per denial after 18,000 of them: a batch of denials outlived its
-- statement timeout and was retried forever); and with the pool's force_custom_plan, every
-- row planned each lookup again. So sorts and bitmap scans are off and the plans generic
-- (planned once per connection, partitions pruned at execution).
CREATE OR REPLACE FUNCTION arbiter.session_events_chain() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
DECLARE
    occurred_day date := (NEW.occurred_at AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup'),
                                         arbiter.rollup_lock_key(occurred_day));
    IF occurred_day < (clock_timestamp() AT TIME ZONE 'UTC')::date THEN
        PERFORM arbiter.rollup_unseal(occurred_day);
    END IF;
    IF NEW.kind = 'denied' THEN
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.denials'), hashtext(NEW.session_id::text));
        -- Taken under the lock: a later link always has a larger id.
        NEW.event_id := nextval('arbiter.session_events_event_id_seq');
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.session_events e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind = 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    ELSE
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.session_events e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind <> 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    END IF;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := arbiter.audit_link_hash(
        NEW.prev_hash, NEW.event_key, NEW.session_id, NEW.agent_id, NEW.kind, NEW.tools,
        NEW.calls_made, NEW.rate_window_calls, NEW.status, NEW.session_version,
        NEW.occurred_at, NEW.recorded_at, NEW.instance_id, NEW.reason);
    RETURN NEW;
END
$$;

-- The views: rollups before the horizon, raw events from it on. The horizon is read once
-- per query (a sub-select, not a per-row call); the raw part reads the BRIN index on
-- occurred_at, so it touches only the blocks written since the horizon.
CREATE OR REPLACE VIEW arbiter.agent_daily_activity AS
SELECT r.agent_id, r.day, r.sessions_opened, r.calls_allowed, r.calls_denied,
       r.denied_agent_mismatch, r.denied_closed, r.denied_expired, r.denied_budget,
       r.denied_tool, r.denied_rate, r.denied_write_through, r.denied_invalid
  FROM arbiter.agent_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT e.agent_id,
       (e.occurred_at AT TIME ZONE 'UTC')::date                               AS day,
       count(*) FILTER (WHERE e.kind = 'created')                              AS sessions_opened,
       coalesce(sum(cardinality(e.tools))
                FILTER (WHERE e.kind IN ('call_allowed', 'batch_allowed')), 0) AS calls_allowed,
       count(*) FILTER (WHERE e.kind = 'denied')                               AS calls_denied,
       count(*) FILTER (WHERE e.reason = 'agent_mismatch')                     AS denied_agent_mismatch,
       count(*) FILTER (WHERE e.reason = 'closed')                             AS denied_closed,
       count(*) FILTER (WHERE e.reason = 'expired')                            AS denied_expired,
       count(*) FILTER (WHERE e.reason = 'budget')                             AS denied_budget,
       count(*) FILTER (WHERE e.reason = 'tool')                               AS denied_tool,
       count(*) FILTER (WHERE e.reason = 'rate')                               AS denied_rate,
       count(*) FILTER (WHERE e.reason = 'write_through')                      AS denied_write_through,
       count(*) FILTER (WHERE e.reason = 'invalid')                            AS denied_invalid
  FROM arbiter.session_events e
 WHERE e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
 GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date;

CREATE OR REPLACE VIEW arbiter.tool_daily_usage AS
SELECT r.day, r.agent_id, r.tool, r.calls_allowed, r.calls_denied, r.sessions
  FROM arbiter.tool_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date                   AS day,
       e.agent_id,
       t.tool,
       count(*) FILTER (WHERE e.kind <> 'denied')                  AS calls_allowed,
       count(*) FILTER (WHERE e.kind = 'denied')                   AS calls_denied,
       count(DISTINCT e.session_id)                                AS sessions
  FROM arbiter.session_events e
 CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
 WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
   AND e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, t.tool;

CREATE OR REPLACE VIEW arbiter.denials_by_reason AS
SELECT r.day, r.agent_id, r.reason, r.denials, r.sessions
  FROM arbiter.denial_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
       e.agent_id,
       e.reason,
       count(*)                                 AS denials,
       count(DISTINCT e.session_id)             AS sessions
  FROM arbiter.session_events e
 WHERE e.kind = 'denied'
   AND e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, e.reason;

-- One partition per lookup: the session's events are in its creation day's partition.
CREATE OR REPLACE VIEW arbiter.session_utilization AS
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
       coalesce(denied.count, 0)                               AS denials
  FROM arbiter.sessions s
  -- When it ended: a close at its event's time (or at the row's last change, for a close
  -- made with plain SQL, which writes no event); an expiry at its time limit; NULL while live.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN s.status = 'closed' THEN coalesce(
                     (SELECT min(e.occurred_at) FROM arbiter.session_events e
                       WHERE e.session_id = s.session_id
                         AND e.session_day = (s.created_at AT TIME ZONE 'UTC')::date
                         AND e.kind = 'closed'),
                     s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended
  LEFT JOIN LATERAL (
      SELECT count(*) AS count FROM arbiter.session_events e
       WHERE e.session_id = s.session_id
         AND e.session_day = (s.created_at AT TIME ZONE 'UTC')::date
         AND e.kind = 'denied'
  ) denied ON true;

-- Retention (migration 20261201000002) with two additions:
--   * every sealed day it removed events of is counted again, under its rollup lock,
--     before the purge commits;
--   * an archiving purge (`purge --archive`: archived_days and archived_rows given) drops
--     only the partitions written out beforehand, each only if it still holds exactly the
--     rows written, and deletes no event row by row: what goes is what was archived. The
--     rest waits until its whole partition can go (purge_partition_candidates).
DROP FUNCTION arbiter.purge_before(timestamptz, boolean);
CREATE FUNCTION arbiter.purge_before(
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
    END IF;

    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
END
$$;

-- The partitions an archiving purge at `cutoff` may drop, oldest first: days before the
-- cutoff's and before yesterday with no session that the purge would keep. purge_before
-- checks each again (and its rows against the archive) when it runs.
CREATE FUNCTION arbiter.purge_partition_candidates(cutoff timestamptz)
RETURNS TABLE (partition regclass, day date)
LANGUAGE sql STABLE AS $$
    WITH kept AS (
        SELECT DISTINCT (s.created_at AT TIME ZONE 'UTC')::date AS day
          FROM arbiter.sessions s
         WHERE NOT arbiter.session_purgeable(s.status, s.updated_at, s.expires_at, cutoff)
    )
    SELECT p.partition, p.day
      FROM arbiter.event_partitions() p
     WHERE p.day IS NOT NULL
       AND p.day < least((cutoff AT TIME ZONE 'UTC')::date,
                         (now() AT TIME ZONE 'UTC')::date - 1)
       AND NOT EXISTS (SELECT 1 FROM kept WHERE kept.day = p.day)
     ORDER BY p.day
$$;
