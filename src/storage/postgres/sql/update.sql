WITH updated AS (
    UPDATE arbiter.sessions
       SET calls_made = $3,
           rate_window_started_at = $4,
           rate_window_calls = $5,
           status = $6,
           tool_calls = $8,
           reservation_ids = $9,
           reservations_until = $10
     WHERE session_id = $1 AND version = $2
       AND session_id = (SELECT l.session_id FROM arbiter.sessions l
                          WHERE l.session_id = $1 FOR UPDATE SKIP LOCKED)
    RETURNING session_id, agent_id, version,
              (created_at AT TIME ZONE 'UTC')::date AS session_day
), input AS (
    SELECT * FROM ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
           event_key uuid, kind text, tools text[], calls_made bigint,
           rate_window_calls bigint, status text, occurred_at timestamptz,
           instance_id uuid, limited_tools text[], tool_calls bigint[], cost bigint,
           share_id uuid, budget_id text, reserved_until timestamptz, settles uuid,
           settled_at_cost bigint)) WITH ORDINALITY AS e(
           event_key, kind, tools, calls_made, rate_window_calls, status,
           occurred_at, instance_id, limited_tools, tool_calls, cost, share_id, budget_id,
           reserved_until, settles, settled_at_cost, position)
), events AS (
    INSERT INTO arbiter.session_events (
        event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
        status, session_version, occurred_at, instance_id, session_day, limited_tools,
        tool_calls, cost, share_id, budget_id)
    SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
           e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id,
           u.session_day, e.limited_tools, e.tool_calls, e.cost, e.share_id, e.budget_id
      FROM updated u
     CROSS JOIN input e
     -- In order: event ids, and so the audit chain, follow the events' order.
     ORDER BY e.position
    RETURNING kind, share_id, cost
), reserved AS (
    -- The reservations the written calls make (each one's id is its event's key).
    INSERT INTO arbiter.budget_reservations (
        reservation_id, session_id, budget_id, share_id, estimate, reserved_at, expires_at)
    SELECT e.event_key, u.session_id, e.budget_id, e.share_id, e.cost, e.occurred_at,
           e.reserved_until
      FROM updated u
     CROSS JOIN input e
     WHERE e.reserved_until IS NOT NULL
), settled AS (
    -- The reservations settled: the session's row, written here, said they were open.
    UPDATE arbiter.budget_reservations r
       SET settled_at = e.occurred_at, charged = e.settled_at_cost
      FROM updated u
     CROSS JOIN input e
     WHERE r.reservation_id = e.settles
), charged AS (
    -- The written events' costs, added to their shares in the same transaction: calls'
    -- costs (arbiter.budget_charge refuses the statement if a share is no longer live),
    -- and settlements' releases and overruns; no call for a statement that charges nothing.
    SELECT CASE WHEN count(*) = 0 THEN 0
                ELSE arbiter.budget_charge(array_agg(c.share_id), array_agg(c.units),
                                           array_agg(c.credits), array_agg(c.overruns)) END
           AS shares
      FROM (SELECT share_id,
                   coalesce(sum(cost) FILTER (WHERE kind <> 'settled'), 0)::bigint AS units,
                   coalesce(sum(-cost) FILTER (WHERE kind = 'settled' AND cost < 0), 0)::bigint
                       AS credits,
                   coalesce(sum(cost) FILTER (WHERE kind = 'settled' AND cost > 0), 0)::bigint
                       AS overruns
              FROM events WHERE share_id IS NOT NULL GROUP BY share_id) c
)
SELECT u.version FROM updated u CROSS JOIN charged
