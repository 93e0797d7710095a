INSERT INTO arbiter.session_events (
    event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
    status, session_version, occurred_at, instance_id, reason, session_day,
    presented_agent_id, tool_count, budget_id)
SELECT d.event_key, d.session_id, d.agent_id, 'denied', d.tools, d.calls_made,
       d.rate_window_calls, d.status, NULL, d.occurred_at, d.instance_id, d.reason,
       (d.session_created_at AT TIME ZONE 'UTC')::date, d.presented_agent_id, d.tool_count,
       d.budget_id
  FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (
       event_key uuid, session_id uuid, agent_id uuid, tools text[],
       calls_made bigint, rate_window_calls bigint, status text,
       occurred_at timestamptz, instance_id uuid, reason text,
       session_created_at timestamptz, presented_agent_id uuid, tool_count integer,
       budget_id text))
       WITH ORDINALITY AS d(
       event_key, session_id, agent_id, tools, calls_made, rate_window_calls, status,
       occurred_at, instance_id, reason, session_created_at, presented_agent_id,
       tool_count, budget_id, position)
 -- Session by session (the chain trigger locks each session's denial chain, so two
 -- batches lock in the same order and never wait for each other in a cycle), and each
 -- session's denials in the order they were decided.
 ORDER BY d.session_id, d.position
-- A retried batch whose first attempt committed unseen: record each denial once.
    ON CONFLICT ON CONSTRAINT session_events_key_unique DO NOTHING
