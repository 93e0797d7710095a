SELECT count(*) AS "landed!"
  FROM arbiter.session_events
 WHERE event_key = ANY($1) AND session_id = $2
   -- The session's partition only.
   AND session_day = ($3::timestamptz AT TIME ZONE 'UTC')::date
