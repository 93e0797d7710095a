SELECT budget_id AS "budget_id!", period_start AS "period_start!", period_end,
       unit_limit AS "unit_limit!", unit AS "unit!", used AS "used!", allocated AS "allocated!",
       reserved AS "reserved!", overrun AS "overrun!"
  FROM arbiter.budget_usage
 WHERE ($1::date IS NULL OR period_end IS NULL OR period_end > $1::date::timestamp AT TIME ZONE 'UTC')
 ORDER BY budget_id, period_start
