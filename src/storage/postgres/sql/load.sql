SELECT session_id, agent_id, delegation_chain, declared_intent,
       authorized_tools, authorized_credentials, call_budget, calls_made,
       rate_limit, rate_window_secs, rate_window_started_at,
       rate_window_calls, data_sensitivity_ceiling, status, created_at,
       expires_at, version, limited_tools, tool_limits, tool_calls,
       budget_id, cost_tools, tool_costs, reservation_ids, reservations_until,
       token_digest
  FROM arbiter.sessions
 WHERE session_id = $1
