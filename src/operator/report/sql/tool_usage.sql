-- Calls per tool on the UTC days $2 to $3 (either open), of agent $1 if set, after the
-- position ($4, $5) = (day, tool) if set, at most $6 rows (every one for NULL).
SELECT day AS "day!", tool AS "tool!",
       sum(calls_allowed)::bigint AS "calls_allowed!",
       sum(calls_denied)::bigint AS "calls_denied!",
       count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
  FROM arbiter.tool_daily_usage
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::date IS NULL OR day >= $2)
   AND ($3::date IS NULL OR day <= $3)
   AND ($4::date IS NULL OR (day, tool) > ($4, $5::text))
 GROUP BY day, tool
 ORDER BY day, tool
 LIMIT $6::bigint
