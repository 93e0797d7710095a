SELECT day AS "day!", reason AS "reason!", sum(denials)::bigint AS "denials!",
       count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
  FROM arbiter.denials_by_reason
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::date IS NULL OR day >= $2)
 GROUP BY day, reason
 ORDER BY day, reason
