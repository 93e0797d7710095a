-- One page of the sessions, newest first, narrowed by any of agent ($1), status at $8
-- ($2: an active session past its time limit is expired, marked or not), shared budget
-- ($3) and creation instant ($4): those created before the position ($5, $6) =
-- (created_at, session_id), at most $7 of them.
SELECT session_id, agent_id,
       CASE WHEN status = 'active' AND expires_at <= $8 THEN 'expired' ELSE status END
           AS "status!",
       calls_made, call_budget, created_at, expires_at, budget_id
  FROM arbiter.sessions
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::text IS NULL
        OR CASE WHEN status = 'active' AND expires_at <= $8 THEN 'expired' ELSE status END = $2)
   AND ($3::text IS NULL OR budget_id = $3)
   AND ($4::timestamptz IS NULL OR created_at >= $4)
   AND (created_at, session_id) < ($5, $6)
 ORDER BY created_at DESC, session_id DESC
 LIMIT $7
