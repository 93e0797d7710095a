-- Each budget's periods that end after the UTC day $1 began and start before the day
-- after $2 began (either open), after the position ($3, $4) = (budget_id, period_start) if
-- set, at most $5 rows (every one for NULL).
SELECT budget_id AS "budget_id!", period_start AS "period_start!", period_end,
       unit_limit AS "unit_limit!", unit AS "unit!", used AS "used!", allocated AS "allocated!",
       reserved AS "reserved!", overrun AS "overrun!"
  FROM arbiter.budget_usage
 WHERE ($1::date IS NULL OR period_end IS NULL OR period_end > $1::date::timestamp AT TIME ZONE 'UTC')
   AND ($2::date IS NULL OR period_start < ($2::date + 1)::timestamp AT TIME ZONE 'UTC')
   AND ($3::text IS NULL OR (budget_id, period_start) > ($3, $4::timestamptz))
 ORDER BY budget_id, period_start
 LIMIT $5::bigint
