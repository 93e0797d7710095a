SELECT session_id
  FROM arbiter.sessions
 WHERE status = 'active' AND expires_at <= $1
 ORDER BY expires_at
 LIMIT $2
