-- Per-session utilization of the sessions created on the UTC days $2 to $3 (either open),
-- of agent $1 if set, after the position ($4, $5) = (created_at, session_id) if set, at
-- most $6 of them (every one for NULL). The function reads only the rollups of sessions
-- created since its argument, so a later page starts it at its position.
SELECT session_id AS "session_id!", agent_id AS "agent_id!", status AS "status!",
       call_budget AS "call_budget!", calls_made AS "calls_made!",
       budget_used_pct::float8 AS "budget_used_pct!",
       budget_exhausted AS "budget_exhausted!", created_at AS "created_at!",
       ended_at, extract(epoch FROM duration)::bigint AS duration_secs,
       denials AS "denials!",
       tool_use AS "tool_use: Json<BTreeMap<String, ToolUse>>"
  FROM arbiter.session_utilization_since(
           greatest(coalesce(($2::date)::timestamp AT TIME ZONE 'UTC', '-infinity'),
                    coalesce($4::timestamptz, '-infinity')))
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($3::date IS NULL OR created_at < ($3::date + 1)::timestamp AT TIME ZONE 'UTC')
   AND ($4::timestamptz IS NULL OR (created_at, session_id) > ($4, $5::uuid))
 ORDER BY created_at, session_id
 LIMIT $6::bigint
