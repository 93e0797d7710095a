-- Per-agent activity on the UTC days $2 to $3 (either open), of agent $1 if set, after the
-- position ($4, $5) = (day, agent_id) if set, at most $6 rows (every one for NULL).
SELECT agent_id AS "agent_id!", day AS "day!", sessions_opened AS "sessions_opened!",
       calls_allowed::bigint AS "calls_allowed!", calls_denied AS "calls_denied!",
       denied_agent_mismatch AS "denied_agent_mismatch!",
       denied_closed AS "denied_closed!", denied_expired AS "denied_expired!",
       denied_budget AS "denied_budget!", denied_tool AS "denied_tool!",
       denied_rate AS "denied_rate!", denied_write_through AS "denied_write_through!",
       denied_invalid AS "denied_invalid!", denied_tool_budget AS "denied_tool_budget!"
  FROM arbiter.agent_daily_activity
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::date IS NULL OR day >= $2)
   AND ($3::date IS NULL OR day <= $3)
   AND ($4::date IS NULL OR (day, agent_id) > ($4, $5::uuid))
 ORDER BY day, agent_id
 LIMIT $6::bigint
