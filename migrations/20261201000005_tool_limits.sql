-- Per-tool call limits inside a session (`CreateSessionRequest::tool_limits`).
--
-- Three parallel arrays on the session row, in the order of limited_tools (sorted by
-- name, as the library writes them): the tool, its limit, its calls so far. The calls are
-- written by the same UPDATE as calls_made, so they are exactly as durable and as
-- serialized as the budget, and the database defends them as it does calls_made:
--   * sessions_tool_calls_within_limits: one count per limited tool, each from 0 to its
--     limit and at most calls_made (a tool's calls are some of the session's);
--   * sessions_tool_limits_named: one name per limit, none NULL;
--   * sessions_tool_limits_fixed (trigger): the tools and their limits never change
--     after the insert; only their calls do.
-- A session without limits has three empty arrays and pays one cardinality test per
-- update.

ALTER TABLE arbiter.sessions
    ADD COLUMN limited_tools text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN tool_limits   bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN tool_calls    bigint[] NOT NULL DEFAULT '{}';

COMMENT ON COLUMN arbiter.sessions.limited_tools IS
    'Tools with a call limit of their own, sorted by name; tool_limits and tool_calls hold, at the same positions, each one''s limit and calls so far.';

-- Whether `calls` counts the calls of tools limited by `limits`, within them and within
-- the session's `calls_made`.
CREATE FUNCTION arbiter.tool_calls_within_limits(limits bigint[], calls bigint[],
                                                 calls_made bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT cardinality(limits) = cardinality(calls)
       AND NOT EXISTS (SELECT 1 FROM unnest(limits, calls) AS t(lim, used)
                        WHERE lim IS NULL OR used IS NULL OR lim < 1 OR used < 0
                           OR used > lim OR used > calls_made)
$$;

ALTER TABLE arbiter.sessions
    ADD CONSTRAINT sessions_tool_limits_named
        CHECK (cardinality(limited_tools) = cardinality(tool_limits)
               AND array_position(limited_tools, NULL) IS NULL),
    ADD CONSTRAINT sessions_tool_calls_within_limits
        CHECK ((cardinality(tool_limits) = 0 AND cardinality(tool_calls) = 0)
               OR arbiter.tool_calls_within_limits(tool_limits, tool_calls, calls_made));

CREATE FUNCTION arbiter.sessions_tool_limits_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.limited_tools IS DISTINCT FROM OLD.limited_tools
       OR NEW.tool_limits IS DISTINCT FROM OLD.tool_limits THEN
        RAISE EXCEPTION 'the tool limits of session % cannot change', OLD.session_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sessions_tool_limits_fixed',
                  TABLE = 'sessions', SCHEMA = 'arbiter';
    END IF;
    RETURN NEW;
END
$$;

-- Fires only for an UPDATE that names these columns; the library's never does.
CREATE TRIGGER sessions_tool_limits_fixed
    BEFORE UPDATE OF limited_tools, tool_limits ON arbiter.sessions
    FOR EACH ROW EXECUTE FUNCTION arbiter.sessions_tool_limits_fixed();

-- A call denied by a tool's own limit is recorded with its own reason. Re-adding the
-- check reads every event once (not timed yet on a large trail).
ALTER TABLE arbiter.session_events
    DROP CONSTRAINT session_events_reason_known,
    ADD CONSTRAINT session_events_reason_known CHECK (reason IN
        ('agent_mismatch', 'closed', 'expired', 'budget', 'tool_budget', 'tool', 'rate',
         'write_through', 'invalid'));

COMMENT ON COLUMN arbiter.session_events.reason IS
    'Why a call was denied (kind = denied only): agent_mismatch, closed, expired, budget, tool_budget (a tool''s own limit), tool, rate, write_through, invalid.';

-- session_utilization (migration 20261201000004) with, last, each limited tool's use:
-- {"write_file": {"limit": 3, "calls": 2}, ...}; NULL for a session without limits.
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
       coalesce(rolled.denials, 0) + coalesce(recent.denials, 0) AS denials,
       (SELECT jsonb_object_agg(t.tool, jsonb_build_object('limit', t.lim, 'calls', t.used))
          FROM unnest(s.limited_tools, s.tool_limits, s.tool_calls) AS t(tool, lim, used)
       )                                                       AS tool_use
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

COMMENT ON VIEW arbiter.session_utilization IS
    'One row per stored session: budget, calls made, percentage used, effective status (expired once past the time limit), when it ended, how long it ran, how many calls were denied, and each limited tool''s limit and calls.';
