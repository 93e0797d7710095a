SELECT day AS "day!", tool AS "tool!",
       sum(calls_allowed)::bigint AS "calls_allowed!",
       sum(calls_denied)::bigint AS "calls_denied!",
       count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
  FROM arbiter.tool_daily_usage
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::date IS NULL OR day >= $2)
 GROUP BY day, tool
 ORDER BY day, tool
