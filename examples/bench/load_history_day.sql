-- One day of the bench's history ($1): $2 ended sessions of 100 events each (created, 97
-- calls, a denial, closed), agents from $3, written by instance $4 through the chain
-- trigger, in chain order.
WITH s AS MATERIALIZED (
    SELECT gen_random_uuid() AS session_id,
           ($3::uuid[])[1 + i % cardinality($3::uuid[])] AS agent_id,
           $1::date::timestamp AT TIME ZONE 'UTC'
               + i * (86000.0 / $2::int) * interval '1 second' AS created_at,
           i
      FROM generate_series(0, $2::int - 1) AS i
), sessions AS (
    INSERT INTO arbiter.sessions (
        session_id, agent_id, delegation_chain, declared_intent, authorized_tools,
        authorized_credentials, call_budget, calls_made, rate_window_secs,
        data_sensitivity_ceiling, status, created_at, expires_at, version, updated_at)
    SELECT session_id, agent_id, '{}', 'history', '{search,fetch,read,write,list}', '{}',
           100, 97, 60, 'internal', 'closed', created_at, created_at + interval '1 hour', 99,
           created_at + interval '99 seconds'
      FROM s
)
INSERT INTO arbiter.session_events (
    event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls, status,
    session_version, occurred_at, recorded_at, instance_id, reason, session_day)
SELECT gen_random_uuid(), s.session_id, s.agent_id,
       CASE k WHEN 0 THEN 'created' WHEN 50 THEN 'denied' WHEN 99 THEN 'closed'
              ELSE 'call_allowed' END,
       CASE WHEN k IN (0, 99) THEN '{}'::text[]
            WHEN k = 50 THEN '{delete}'::text[]
            ELSE ARRAY[(ARRAY['search', 'fetch', 'read', 'write', 'list'])[1 + k % 5]] END,
       CASE WHEN k <= 49 THEN k WHEN k = 50 THEN 49 WHEN k < 99 THEN k - 1 ELSE 97 END,
       0,
       CASE WHEN k = 99 THEN 'closed' ELSE 'active' END,
       CASE WHEN k = 50 THEN NULL WHEN k < 50 THEN k + 1 ELSE k END,
       s.created_at + k * interval '1 second',
       s.created_at + k * interval '1 second',
       $4::uuid,
       CASE WHEN k = 50 THEN 'tool' END,
       $1::date
  FROM s CROSS JOIN generate_series(0, 99) AS k
 ORDER BY s.i, k
