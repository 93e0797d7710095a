SELECT count(*) AS "landed!"
  FROM arbiter.session_events
 WHERE event_key = ANY($1) AND session_id = $2
