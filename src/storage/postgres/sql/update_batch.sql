WITH input AS (
    -- tool_calls: each session's bigint[] as text (an array of arrays must be rectangular).
    -- reservation_ids and reservations_until too, for the same reason.
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::timestamptz[],
                         $5::int8[], $6::text[], $8::text[], $9::text[], $10::text[])
        AS i(session_id, expected, calls_made, rate_window_started_at,
             rate_window_calls, status, tool_calls, reservation_ids, reservations_until)
), locked AS (
    -- Each input row whose session row this statement could lock; a row another
    -- transaction holds is skipped, never waited for, and its write reported as a conflict
    -- (storage/postgres/mod.rs).
    SELECT i.*
      FROM input i
      JOIN arbiter.sessions s ON s.session_id = i.session_id
       FOR UPDATE OF s SKIP LOCKED
), updated AS (
    -- One primary-key lookup per locked row, whatever the planner knows of the table: a
    -- join of the sessions with both the input and the locked ids was planned, once the
    -- table had statistics, as a rescan of every locked id per input row.
    UPDATE arbiter.sessions s
       SET calls_made = l.calls_made,
           rate_window_started_at = l.rate_window_started_at,
           rate_window_calls = l.rate_window_calls,
           status = l.status,
           tool_calls = l.tool_calls::int8[],
           reservation_ids = l.reservation_ids::uuid[],
           reservations_until = l.reservations_until::timestamptz[]
      FROM locked l
     WHERE s.session_id = l.session_id
       AND s.version = l.expected
    RETURNING s.session_id, s.agent_id, s.version,
              (s.created_at AT TIME ZONE 'UTC')::date AS session_day
), event_input AS (
    SELECT * FROM ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
           session_id uuid, event_key uuid, kind text, tools text[],
           calls_made bigint, rate_window_calls bigint, status text,
           occurred_at timestamptz, instance_id uuid, limited_tools text[],
           tool_calls bigint[], cost bigint, share_id uuid, budget_id text,
           reserved_until timestamptz, settles uuid, settled_at_cost bigint))
           WITH ORDINALITY AS e(
           session_id, event_key, kind, tools, calls_made, rate_window_calls,
           status, occurred_at, instance_id, limited_tools, tool_calls, cost, share_id,
           budget_id, reserved_until, settles, settled_at_cost, position)
), events AS (
    INSERT INTO arbiter.session_events (
        event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
        status, session_version, occurred_at, instance_id, session_day, limited_tools,
        tool_calls, cost, share_id, budget_id)
    SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
           e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id,
           u.session_day, e.limited_tools, e.tool_calls, e.cost, e.share_id, e.budget_id
      FROM updated u
      JOIN event_input e ON e.session_id = u.session_id
     -- In order: each session's chain follows its events' order.
     ORDER BY e.position
    RETURNING kind, share_id, cost
), reserved AS (
    -- The reservations the written calls make (each one's id is its event's key).
    INSERT INTO arbiter.budget_reservations (
        reservation_id, session_id, budget_id, share_id, estimate, reserved_at, expires_at)
    SELECT e.event_key, u.session_id, e.budget_id, e.share_id, e.cost, e.occurred_at,
           e.reserved_until
      FROM updated u
      JOIN event_input e ON e.session_id = u.session_id
     WHERE e.reserved_until IS NOT NULL
), settled AS (
    -- The reservations settled: the session's row, written here, said they were open.
    UPDATE arbiter.budget_reservations r
       SET settled_at = e.occurred_at, charged = e.settled_at_cost
      FROM updated u
      JOIN event_input e ON e.session_id = u.session_id
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
SELECT u.session_id AS "session_id!", u.version AS "version!" FROM updated u CROSS JOIN charged
