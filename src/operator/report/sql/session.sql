SELECT session_id, agent_id, status, authorized_tools, call_budget, calls_made,
       rate_limit, rate_window_secs, rate_window_started_at, rate_window_calls,
       declared_intent, delegation_chain, authorized_credentials,
       data_sensitivity_ceiling, created_at, expires_at, version, updated_at,
       limited_tools, tool_limits, tool_calls
  FROM arbiter.sessions
 WHERE session_id = $1
