-- session_utilization from rollups too: its cost per session no longer grows with the
-- session's events.
--
-- The view of migration 20261201000003 looked up two things per session in the session's
-- partition: the time of its first 'closed' event and the number of its denials. Each
-- lookup read the session's events (354 ms for the 3,333 sessions of one day and 8.2 s
-- for 30 days, on 10 million events). Now both come from two parts split at the rollup
-- horizon H, as the daily views' figures do (the invariant of migration 20261201000003):
--   * arbiter.session_day_rollup, for days before H: per session and day of occurrence,
--     its denials and its first 'closed' event, written by the day's rollup (only
--     sessions with either on that day have a row), read by one index lookup per session;
--   * the raw 'denied' and 'closed' events from H on, grouped by session once per query
--     (they are today's, found through the BRIN index on occurred_at).
-- Measured on 2 million events (20,000 sessions over 30 days, psql, JIT off): one day's
-- sessions 107 ms before, 17 ms after; 30 days 1.8 s before, 0.2 s after.
-- The sum of the two parts' denials and the earlier of their close times are exactly the
-- raw lookups' answers: every event before H is counted in the rollup of its day, and in
-- no other.

CREATE TABLE arbiter.session_day_rollup (
    day        date        NOT NULL,
    session_id uuid        NOT NULL,
    -- Its 'denied' events that occurred on the day.
    denials    bigint      NOT NULL,
    -- Its first 'closed' event of the day, if it had one.
    closed_at  timestamptz,
    PRIMARY KEY (day, session_id)
);

-- The view's lookup: a session's rows before the horizon.
CREATE INDEX session_day_rollup_by_session ON arbiter.session_day_rollup (session_id, day)
    INCLUDE (denials, closed_at);

COMMENT ON TABLE arbiter.session_day_rollup IS
    'session_utilization''s denials and close times for the sealed days before the rollup horizon, per session and day; read it through the view.';

-- The per-day counts of migration 20261201000003 stay as they were, under a name of their
-- own; rollup_count_day (which rollup_day and purge_before call) now also counts the
-- sessions' part, in the same transaction and under the same lock.
ALTER FUNCTION arbiter.rollup_count_day(date) RENAME TO rollup_count_day_views;

CREATE FUNCTION arbiter.rollup_count_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql
SET jit = off
-- purge_before, which calls this, turns nested loops off for its own statements, and the
-- setting reached these: the tools' count (a nested loop over each event's tools, which
-- nothing else can do) was costed as if forbidden and read every partition through the
-- agent index, 500 ms of a 650 ms purge of one day of 66,700 events. The counts here are
-- planned with the default.
SET enable_nestloop = on
AS $$
DECLARE
    day_start timestamptz := rolled_day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (rolled_day + 1)::timestamp AT TIME ZONE 'UTC';
    counted   bigint;
BEGIN
    -- First: it summarizes the day's BRIN ranges, which the count below reads too.
    counted := arbiter.rollup_count_day_views(rolled_day);
    DELETE FROM arbiter.session_day_rollup WHERE day = rolled_day;
    INSERT INTO arbiter.session_day_rollup (day, session_id, denials, closed_at)
    SELECT rolled_day, e.session_id,
           count(*) FILTER (WHERE e.kind = 'denied'),
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
      FROM arbiter.session_events e
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
       AND e.kind IN ('denied', 'closed')
     GROUP BY e.session_id;
    RETURN counted;
END
$$;

-- The sealed days so far: their sessions' part, as their rollup would have counted it.
-- Each day under its rollup lock, so that no insert of one of its events is in flight.
DO $$
DECLARE
    sealed_day date;
BEGIN
    FOR sealed_day IN SELECT day FROM arbiter.rollup_days WHERE sealed ORDER BY day LOOP
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.rollup'),
                                      arbiter.rollup_lock_key(sealed_day));
        INSERT INTO arbiter.session_day_rollup (day, session_id, denials, closed_at)
        SELECT sealed_day, e.session_id,
               count(*) FILTER (WHERE e.kind = 'denied'),
               min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
          FROM arbiter.session_events e
         WHERE e.occurred_at >= sealed_day::timestamp AT TIME ZONE 'UTC'
           AND e.occurred_at < (sealed_day + 1)::timestamp AT TIME ZONE 'UTC'
           AND e.kind IN ('denied', 'closed')
         GROUP BY e.session_id;
    END LOOP;
END
$$;

-- A report of the sessions created since a day reads them by creation time, not the whole
-- table (which holds every session retention keeps). The key never changes after the
-- insert: a call's update of its session can stay a HOT update.
CREATE INDEX sessions_by_creation ON arbiter.sessions (created_at);

-- The same columns, types and answers as before (the reporting tests compare it with the
-- raw lookups of migration 20261124000006).
CREATE OR REPLACE VIEW arbiter.session_utilization AS
WITH recent AS (
    SELECT e.session_id,
           count(*) FILTER (WHERE e.kind = 'denied')           AS denials,
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed') AS closed_at
      FROM arbiter.session_events e
     WHERE e.kind IN ('denied', 'closed')
       AND e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
     GROUP BY e.session_id
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
       coalesce(rolled.denials, 0) + coalesce(recent.denials, 0) AS denials
  FROM arbiter.sessions s
  LEFT JOIN LATERAL (
      SELECT sum(r.denials)::bigint AS denials, min(r.closed_at) AS closed_at
        FROM arbiter.session_day_rollup r
       WHERE r.session_id = s.session_id
         AND r.day < (SELECT arbiter.rollup_horizon())
  ) rolled ON true
  LEFT JOIN recent ON recent.session_id = s.session_id
  -- When it ended: a close at its event's time (or at the row's last change, for a close
  -- made with plain SQL, which writes no event); an expiry at its time limit; NULL while live.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN s.status = 'closed'
                     THEN coalesce(least(rolled.closed_at, recent.closed_at), s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended;
