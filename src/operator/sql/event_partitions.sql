SELECT p.partition::text AS "name!",
       p.day,
       -- The planner's estimate: counting a month of partitions would read them all.
       greatest(c.reltuples, 0)::bigint AS "estimated_rows!",
       pg_total_relation_size(p.partition) AS "bytes!"
  FROM arbiter.event_partitions() p
  JOIN pg_class c ON c.oid = p.partition
 ORDER BY p.day NULLS FIRST
