-- Denials per reason on the UTC days $2 to $3 (either open), of agent $1 if set, after the
-- position ($4, $5) = (day, reason) if set, at most $6 rows (every one for NULL).
SELECT day AS "day!", reason AS "reason!", sum(denials)::bigint AS "denials!",
       count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
  FROM arbiter.denials_by_reason
 WHERE ($1::uuid IS NULL OR agent_id = $1)
   AND ($2::date IS NULL OR day >= $2)
   AND ($3::date IS NULL OR day <= $3)
   AND ($4::date IS NULL OR (day, reason) > ($4, $5::text))
 GROUP BY day, reason
 ORDER BY day, reason
 LIMIT $6::bigint
