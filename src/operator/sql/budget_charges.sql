-- Every share, and every share an event names, with the units charged to it (its used, less
-- what settlements released, plus their overruns) and the sum of the costs of the events
-- naming it (a settlement's is negative when it released units).
SELECT coalesce(s.share_id, e.share_id) AS "share_id!",
       s.used - s.credited + s.overrun AS "used?",
       coalesce(e.costs, 0)::bigint AS "costs!"
  FROM arbiter.budget_shares s
  FULL JOIN (SELECT share_id, sum(cost)::bigint AS costs
               FROM arbiter.session_events
              WHERE share_id IS NOT NULL
              GROUP BY share_id) e
    ON e.share_id = s.share_id
 ORDER BY 1
