WITH inserted AS (
    INSERT INTO arbiter.sessions (
        session_id, agent_id, delegation_chain, declared_intent, authorized_tools,
        authorized_credentials, call_budget, calls_made, rate_limit, rate_window_secs,
        rate_window_started_at, rate_window_calls, data_sensitivity_ceiling, status,
        created_at, expires_at, limited_tools, tool_limits, tool_calls, budget_id,
        cost_tools, tool_costs, token_digest)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $21,
            $22, $23, $24, $25, $26, $27)
    RETURNING session_id, agent_id, version, created_at
)
INSERT INTO arbiter.session_events (
    event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
    status, session_version, occurred_at, instance_id, session_day)
SELECT $20, session_id, agent_id, $17, '{}', $8, $12, $14, version, $18, $19,
       (created_at AT TIME ZONE 'UTC')::date
  FROM inserted
RETURNING session_version AS "session_version!"
