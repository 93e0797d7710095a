-- One session's audit trail in totals: its denials by reason (the row without a reason
-- carries no denial) and the units its events charged to its shared budget (allowed calls'
-- and reservations' costs, settlements' signed differences).
SELECT e.reason,
       count(*) FILTER (WHERE e.kind = 'denied') AS "denials!",
       coalesce(sum(e.cost) FILTER (WHERE e.kind <> 'denied'), 0)::bigint AS "units!"
  FROM arbiter.session_events e
 WHERE e.session_id = $1
   -- The session's partition only.
   AND e.session_day = ($2::timestamptz AT TIME ZONE 'UTC')::date
 GROUP BY e.reason
