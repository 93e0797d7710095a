WITH input AS (
    -- tool_calls: each session's bigint[] as text (an array of arrays must be rectangular).
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::timestamptz[],
                         $5::int8[], $6::text[], $8::text[])
        AS i(session_id, expected, calls_made, rate_window_started_at,
             rate_window_calls, status, tool_calls)
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
           tool_calls = l.tool_calls::int8[]
      FROM locked l
     WHERE s.session_id = l.session_id
       AND s.version = l.expected
    RETURNING s.session_id, s.agent_id, s.version,
              (s.created_at AT TIME ZONE 'UTC')::date AS session_day
), events AS (
    INSERT INTO arbiter.session_events (
        event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
        status, session_version, occurred_at, instance_id, session_day, limited_tools,
        tool_calls, cost, share_id, budget_id)
    SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
           e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id,
           u.session_day, e.limited_tools, e.tool_calls, e.cost, e.share_id, e.budget_id
      FROM updated u
      JOIN ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
           session_id uuid, event_key uuid, kind text, tools text[],
           calls_made bigint, rate_window_calls bigint, status text,
           occurred_at timestamptz, instance_id uuid, limited_tools text[],
           tool_calls bigint[], cost bigint, share_id uuid, budget_id text))
           WITH ORDINALITY AS e(
           session_id, event_key, kind, tools, calls_made, rate_window_calls,
           status, occurred_at, instance_id, limited_tools, tool_calls, cost, share_id,
           budget_id, position)
        ON e.session_id = u.session_id
     -- In order: each session's chain follows its events' order.
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
SELECT u.session_id AS "session_id!", u.version AS "version!" FROM updated u CROSS JOIN charged
