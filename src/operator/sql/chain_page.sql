SELECT event_id, event_key, session_id, agent_id, kind,
       tools AS "tools: Vec<Option<String>>", calls_made, rate_window_calls,
       status, session_version, occurred_at, recorded_at, instance_id, reason,
       limited_tools AS "limited_tools?: Vec<Option<String>>",
       tool_calls AS "tool_calls?: Vec<Option<i64>>", presented_agent_id, tool_count,
       cost, share_id, budget_id, prev_hash, hash
  FROM arbiter.session_events
 WHERE (session_id, event_id) > ($1, $2)
 ORDER BY session_id, event_id
 LIMIT $3
