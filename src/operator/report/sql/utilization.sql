SELECT session_id AS "session_id!", agent_id AS "agent_id!", status AS "status!",
       call_budget AS "call_budget!", calls_made AS "calls_made!",
       budget_used_pct::float8 AS "budget_used_pct!",
       budget_exhausted AS "budget_exhausted!", created_at AS "created_at!",
       ended_at, extract(epoch FROM duration)::bigint AS duration_secs,
       denials AS "denials!",
       tool_use AS "tool_use: Json<BTreeMap<String, ToolUse>>"
  FROM arbiter.session_utilization_since(
           coalesce(($2::date)::timestamp AT TIME ZONE 'UTC', '-infinity'))
 WHERE ($1::uuid IS NULL OR agent_id = $1)
 ORDER BY created_at, session_id
