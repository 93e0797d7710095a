-- Today's part of the daily reports, read without walking every partition's index; and one
-- index fewer for every event written. Same answers.
--
-- 1. session_events_by_agent_day (agent_id, day of occurred_at) goes. The daily views read
--    raw events only from the rollup horizon on (today's, normally), which the BRIN index on
--    occurred_at finds in every partition at once. But a report's `day >= D` reaches that
--    scan as a condition on the agent-day index's second column, and the planner took it:
--    with no agent named, that is a scan of the whole index of every partition, to find
--    none of their rows. Measured on 2,000,000 events over 20 days plus 60,000 of today
--    (psql, JIT off): the agents report since yesterday took 54–71 ms with the index and
--    39 ms without (with the reports' work_mem, set by the library). The one query that
--    named an agent and a day (docs/reporting.md, question 9) reads a time range instead,
--    through the BRIN index. Every event written had to update this index.
--
-- 2. tool_daily_usage counts today's sessions per tool in two steps: per session first (a
--    hash aggregate), then per tool, where each session is one row, so `count(*)` is the
--    number of distinct sessions. `count(DISTINCT session_id)` over the events made the
--    planner sort all of today's events. Same measurement, since yesterday: 65–68 ms
--    before, 51–53 ms after (best of 8 runs, twice each).

DROP INDEX arbiter.session_events_by_agent_day;

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
  FROM (SELECT (e.occurred_at AT TIME ZONE 'UTC')::date   AS day,
               e.agent_id,
               t.tool,
               e.session_id,
               count(*) FILTER (WHERE e.kind <> 'denied') AS calls_allowed,
               count(*) FILTER (WHERE e.kind = 'denied')  AS calls_denied
          FROM arbiter.session_events e
         CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
         WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
           AND e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
         GROUP BY 1, 2, 3, 4) per_session
 GROUP BY per_session.day, per_session.agent_id, per_session.tool;
