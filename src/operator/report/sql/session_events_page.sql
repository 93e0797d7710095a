-- One page of a session's audit trail in the order things happened: the events after the
-- position ($2, $3) = (occurred_at, event_id), at most $4 of them.
SELECT event_id, occurred_at, kind, reason, tools, calls_made, rate_window_calls,
       status, session_version, instance_id, limited_tools, tool_calls,
       presented_agent_id, tool_count, encode(hash, 'hex') AS hash
  FROM arbiter.session_events
 WHERE session_id = $1
   AND (occurred_at, event_id) > ($2, $3)
 ORDER BY occurred_at, event_id
 LIMIT $4
