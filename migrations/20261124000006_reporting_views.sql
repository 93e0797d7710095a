-- Reporting views (DESIGN.md §5; docs/reporting.md answers questions with them).
--
-- Days are UTC calendar days of `occurred_at` (when the library decided). The activity
-- views read only `session_events`, so they still answer after sessions were purged with
-- their events kept. A call counts once per tool: a batch of three tools is three calls.
-- A denial counts once per denied request, whatever its number of tools.

-- One agent's day, and one session, are found by index, never by scanning the audit trail:
-- session_events_by_session (migration 1) serves one session; this serves one agent's day.
-- The expression is the views' `day`, so a filter on it reaches the index.
CREATE INDEX session_events_by_agent_day
    ON arbiter.session_events (agent_id, ((occurred_at AT TIME ZONE 'UTC')::date));

-- Utilization of one agent's sessions (the `sessions_active_by_agent` index of migration 1
-- covers only active ones).
CREATE INDEX sessions_by_agent ON arbiter.sessions (agent_id, created_at);

CREATE VIEW arbiter.session_utilization AS
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
                       WHERE e.session_id = s.session_id AND e.kind = 'closed'),
                     s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended
  LEFT JOIN LATERAL (
      SELECT count(*) AS count FROM arbiter.session_events e
       WHERE e.session_id = s.session_id AND e.kind = 'denied'
  ) denied ON true;

COMMENT ON VIEW arbiter.session_utilization IS
    'One row per stored session: budget, calls made, percentage used, effective status (expired once past the time limit), when it ended, how long it ran, and how many calls were denied.';

CREATE VIEW arbiter.agent_daily_activity AS
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
 GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date;

COMMENT ON VIEW arbiter.agent_daily_activity IS
    'One row per agent and UTC day with activity: sessions opened, calls allowed (one per tool), calls denied in all and by reason.';

CREATE VIEW arbiter.tool_daily_usage AS
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date                   AS day,
       e.agent_id,
       t.tool,
       count(*) FILTER (WHERE e.kind <> 'denied')                  AS calls_allowed,
       count(*) FILTER (WHERE e.kind = 'denied')                   AS calls_denied,
       count(DISTINCT e.session_id)                                AS sessions
  FROM arbiter.session_events e
 CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
 WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, t.tool;

COMMENT ON VIEW arbiter.tool_daily_usage IS
    'One row per UTC day, agent and tool: calls allowed and requests denied that named the tool, and in how many sessions. Sum over agent_id for a tool''s whole day.';

CREATE VIEW arbiter.denials_by_reason AS
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
       e.agent_id,
       e.reason,
       count(*)                                 AS denials,
       count(DISTINCT e.session_id)             AS sessions
  FROM arbiter.session_events e
 WHERE e.kind = 'denied'
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, e.reason;

COMMENT ON VIEW arbiter.denials_by_reason IS
    'One row per UTC day, agent and denial reason: denied requests and the sessions they were made on.';
