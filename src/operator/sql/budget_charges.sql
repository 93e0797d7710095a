-- Every share, and every share an event names, with its used and the sum of the costs of
-- the events naming it.
SELECT coalesce(s.share_id, e.share_id) AS "share_id!",
       s.used AS "used?",
       coalesce(e.costs, 0)::bigint AS "costs!"
  FROM arbiter.budget_shares s
  FULL JOIN (SELECT share_id, sum(cost)::bigint AS costs
               FROM arbiter.session_events
              WHERE share_id IS NOT NULL
              GROUP BY share_id) e
    ON e.share_id = s.share_id
 ORDER BY 1
