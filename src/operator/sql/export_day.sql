SELECT event_id, event_key, session_id, agent_id, kind, reason,
       tools AS "tools: Vec<Option<String>>", calls_made, rate_window_calls, status,
       session_version, occurred_at, recorded_at, instance_id, session_day,
       limited_tools AS "limited_tools?: Vec<Option<String>>",
       tool_calls AS "tool_calls?: Vec<Option<i64>>",
       encode(prev_hash, 'hex') AS prev_hash, encode(hash, 'hex') AS hash,
       presented_agent_id, tool_count, cost, share_id, budget_id
  FROM arbiter.session_events
 WHERE session_day = $1
 ORDER BY event_id
