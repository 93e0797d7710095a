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
        tool_calls, cost, share_id, budget_id)
    SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
           e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id,
           u.session_day, e.limited_tools, e.tool_calls, e.cost, e.share_id, e.budget_id
      FROM updated u
     CROSS JOIN ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
           event_key uuid, kind text, tools text[], calls_made bigint,
           rate_window_calls bigint, status text, occurred_at timestamptz,
           instance_id uuid, limited_tools text[], tool_calls bigint[], cost bigint,
           share_id uuid, budget_id text)) WITH ORDINALITY AS e(
           event_key, kind, tools, calls_made, rate_window_calls, status,
           occurred_at, instance_id, limited_tools, tool_calls, cost, share_id, budget_id,
           position)
     -- In order: event ids, and so the audit chain, follow the events' order.
     ORDER BY e.position
    RETURNING share_id, cost
), charged AS (
    -- The written calls' costs, added to their shares in the same transaction
    -- (arbiter.budget_charge refuses the statement if a share is no longer live); no call
    -- for a statement that charges nothing.
    SELECT CASE WHEN count(*) = 0 THEN 0
                ELSE arbiter.budget_charge(array_agg(c.share_id), array_agg(c.units)) END
           AS shares
      FROM (SELECT share_id, sum(cost)::bigint AS units
              FROM events WHERE share_id IS NOT NULL GROUP BY share_id) c
)
SELECT u.version FROM updated u CROSS JOIN charged
