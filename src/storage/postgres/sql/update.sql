WITH updated AS (
    UPDATE arbiter.sessions
       SET calls_made = $3,
           rate_window_started_at = $4,
           rate_window_calls = $5,
           status = $6,
           tool_calls = $8
     WHERE session_id = $1 AND version = $2
       AND session_id = (SELECT l.session_id FROM arbiter.sessions l
                          WHERE l.session_id = $1 FOR UPDATE SKIP LOCKED)
    RETURNING session_id, agent_id, version,
              (created_at AT TIME ZONE 'UTC')::date AS session_day
), events AS (
    INSERT INTO arbiter.session_events (
        event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
        status, session_version, occurred_at, instance_id, session_day, limited_tools,
        tool_calls)
    SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
           e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id,
           u.session_day, e.limited_tools, e.tool_calls
      FROM updated u
     CROSS JOIN ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
           event_key uuid, kind text, tools text[], calls_made bigint,
           rate_window_calls bigint, status text, occurred_at timestamptz,
           instance_id uuid, limited_tools text[], tool_calls bigint[])) WITH ORDINALITY AS e(
           event_key, kind, tools, calls_made, rate_window_calls, status,
           occurred_at, instance_id, limited_tools, tool_calls, position)
     -- In order: event ids, and so the audit chain, follow the events' order.
     ORDER BY e.position
)
SELECT version FROM updated
