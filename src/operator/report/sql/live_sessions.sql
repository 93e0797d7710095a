-- Sessions live at $1 (active and not past their time limit), over every process.
SELECT count(*) AS "live!"
  FROM arbiter.sessions
 WHERE status = 'active' AND expires_at > $1
