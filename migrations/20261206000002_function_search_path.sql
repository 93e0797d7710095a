-- Every function of the schema runs with a search_path of its own, so that an object on a
-- caller's search_path (a table or function of the same name in a schema the caller can
-- write) cannot stand in for one of the schema's inside it. pg_catalog comes first, the
-- schema next, and pg_temp last (where it cannot shadow anything).
--
-- The chain trigger of each partition and the template that installs it
-- (arbiter.install_event_partition_chain) and arbiter.audit_link_hash have theirs since
-- migration 20261206000001.
--
-- Left without one, on purpose: the SQL functions that PostgreSQL inlines into their
-- callers' plans, which it does only for a function without a SET clause. They run on hot
-- paths (audit_text, audit_micros, rollup_lock_key and rollup_today_lag in every event's
-- chain trigger; tool_calls_within_limits in a CHECK on every session update) or shape the
-- reports' plans (rollup_horizon, rollup_horizon_at, rollup_today_day, rollup_raw_from,
-- session_utilization_since, and session_purgeable and purge_setting in the purge). Each
-- names every object of the schema in full and calls only pg_catalog's functions, which
-- PostgreSQL searches first unless a caller's own search_path lists it later: inlined,
-- they are as safe as the caller's own statement. tests/schema.rs holds the list.
ALTER FUNCTION arbiter.create_event_partition(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.ensure_event_partitions(integer)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.name_event_partition_keys(text)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.event_partitions()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.refresh_recent_partitions()
    SET search_path = pg_catalog, arbiter, pg_temp;

ALTER FUNCTION arbiter.purge_before(timestamptz, boolean, date[], bigint[])
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.purge_partition_candidates(timestamptz)
    SET search_path = pg_catalog, arbiter, pg_temp;

ALTER FUNCTION arbiter.rollup_count_day(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_count_day_views(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_day(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_lock_holders(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_pending_days()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_session_totals(date, uuid[])
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_today()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_today_count(date, timestamptz, timestamptz)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_today_late(timestamptz)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.rollup_unseal(date)
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.session_totals_lock()
    SET search_path = pg_catalog, arbiter, pg_temp;

ALTER FUNCTION arbiter.session_events_refuse_change()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.sessions_before_update()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.sessions_guard_delete()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.sessions_notify_status()
    SET search_path = pg_catalog, arbiter, pg_temp;
ALTER FUNCTION arbiter.sessions_tool_limits_fixed()
    SET search_path = pg_catalog, arbiter, pg_temp;
