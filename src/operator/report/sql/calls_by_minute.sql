-- Calls allowed and denied requests per minute among the events that occurred at or after
-- $1: a row per minute and outcome (`allowed`, or the denial's reason) that has any. Calls
-- are counted as the daily reports count them, one per tool of a batch. The BRIN index on
-- occurred_at keeps this to the last pages of each partition.
SELECT date_trunc('minute', occurred_at) AS "minute!",
       coalesce(reason, 'allowed') AS "outcome!",
       sum(CASE WHEN kind = 'denied' THEN 1 ELSE cardinality(tools) END)::bigint AS "count!"
  FROM arbiter.session_events
 WHERE occurred_at >= $1
   AND kind IN ('call_allowed', 'batch_allowed', 'denied')
 GROUP BY 1, 2
 ORDER BY 1, 2
