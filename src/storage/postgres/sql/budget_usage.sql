-- Every budget, or only the one named $1, with its current period (arbiter.budget_period_bounds)
-- and, over every share holding units of the budget in that period (its own sessions' and
-- those of the budgets below it): the units charged net of what settlements released, the
-- estimates of the reservations still open (reserved, left out of used) and the overruns.
SELECT b.budget_id,
       b.parent_id,
       b.unit_limit,
       b.period,
       b.time_zone,
       b.unit,
       bounds.period_start AS "period_start!",
       bounds.period_end,
       (coalesce(u.charged, 0) - coalesce(r.reserved, 0))::bigint AS "used!",
       coalesce(r.reserved, 0)::bigint AS "reserved!",
       coalesce(u.overrun, 0)::bigint AS "overrun!"
  FROM arbiter.budgets b
 CROSS JOIN LATERAL arbiter.budget_period_bounds(b.period, b.time_zone, now()) AS bounds
  LEFT JOIN LATERAL (
       SELECT sum(s.used - s.credited + s.overrun) AS charged, sum(s.overrun) AS overrun
         FROM arbiter.budget_shares s
        CROSS JOIN LATERAL unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
        WHERE b.budget_id = ANY (s.chain)
          AND c.budget_id = b.budget_id
          AND c.period_start = bounds.period_start) u ON true
  LEFT JOIN LATERAL (
       SELECT sum(o.estimate) AS reserved
         FROM arbiter.budget_reservations o
         JOIN arbiter.budget_shares s USING (share_id)
        CROSS JOIN LATERAL unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
        WHERE o.settled_at IS NULL AND o.expires_at > now()
          AND b.budget_id = ANY (s.chain)
          AND c.budget_id = b.budget_id
          AND c.period_start = bounds.period_start) r ON true
 WHERE $1::text IS NULL OR b.budget_id = $1
 ORDER BY b.budget_id
