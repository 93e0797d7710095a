SELECT event_id, occurred_at, kind, reason, tools, calls_made, rate_window_calls,
       status, session_version, instance_id, limited_tools, tool_calls,
       presented_agent_id, tool_count, encode(hash, 'hex') AS hash
  FROM arbiter.session_events
 WHERE session_id = $1
 ORDER BY occurred_at, event_id
