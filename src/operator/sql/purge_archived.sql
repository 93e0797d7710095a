SELECT sessions_deleted AS "sessions!", events_deleted AS "events!"
  FROM arbiter.purge_before($1, true, $2, $3)
