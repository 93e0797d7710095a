SELECT count(*) AS "live!"
  FROM arbiter.sessions
 WHERE agent_id = $1 AND status = 'active' AND expires_at > $2
