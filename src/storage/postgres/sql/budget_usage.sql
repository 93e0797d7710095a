-- Every budget, or only the one named $1, with its current period (arbiter.budget_period_bounds)
-- and the units spent in it: the used of every share holding units of the budget in that
-- period (its own sessions' and those of the budgets below it).
SELECT b.budget_id,
       b.parent_id,
       b.unit_limit,
       b.period,
       b.time_zone,
       b.unit,
       bounds.period_start AS "period_start!",
       bounds.period_end,
       coalesce((SELECT sum(s.used)
                   FROM arbiter.budget_shares s
                  CROSS JOIN LATERAL unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
                  WHERE b.budget_id = ANY (s.chain)
                    AND c.budget_id = b.budget_id
                    AND c.period_start = bounds.period_start), 0)::bigint AS "used!"
  FROM arbiter.budgets b
 CROSS JOIN LATERAL arbiter.budget_period_bounds(b.period, b.time_zone, now()) AS bounds
 WHERE $1::text IS NULL OR b.budget_id = $1
 ORDER BY b.budget_id
