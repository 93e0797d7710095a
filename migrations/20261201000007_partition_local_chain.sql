-- The audit chain's trigger, partition by partition. Same encoding, same hashes: every
-- stored chain stays valid and `verify` is unchanged.
--
-- Why. Since migration 20261201000001 the trigger found an event's predecessor by reading
-- the parent table with the session's day as a parameter. The lookup's plan is cached
-- (generic), so it prunes partitions only when it runs, and PostgreSQL 15 locks every
-- partition in such a plan before pruning: one lock per partition for every event written,
-- and past the 16 locks a backend keeps to itself, each goes through the shared lock
-- table. An insert's cost grew with the days stored. Measured with pgbench (16 clients,
-- single-event inserts through the trigger, 15 s runs alternating the two triggers,
-- 2026-12-01): with 40 partitions, 4,572–5,131 inserts/s through the parent and
-- 6,069–6,245 with the lookup naming the event's own partition (with 10 partitions,
-- through the parent: 5,783–6,418).
--
-- So each partition (the default one included) gets a trigger function of its own, whose
-- lookup names that partition: its cached plan locks the partition the row goes to and
-- nothing else. A session's events all live in one partition (the partition key is the
-- session's creation day), so the predecessor is always there. The functions are made from
-- one template, `install_event_partition_chain`; a change of the chain changes the template
-- and installs it again on every partition.
--
-- The function keeps the settings of migration 20261201000003 (generic plans, no sort, no
-- bitmap scan), for the reasons given there: the store's connections plan custom plans
-- otherwise (every row would plan its lookups again), and with a partition's statistics
-- behind a session of many denials the planner fetched and sorted all of them.

DROP TRIGGER session_events_chain ON arbiter.session_events;
DROP FUNCTION arbiter.session_events_chain();

-- Installs (or reinstalls) the chain trigger of one partition: the function
-- `arbiter.<partition>_chain()` and the trigger `session_events_chain` that runs it. The body
-- is that of migration 20261201000006 with the lookup reading `partition` alone.
CREATE FUNCTION arbiter.install_event_partition_chain(partition regclass) RETURNS void
LANGUAGE plpgsql AS $install$
DECLARE
    table_name name;
    chain name;
BEGIN
    SELECT c.relname INTO table_name
      FROM pg_class c
      JOIN pg_inherits i ON i.inhrelid = c.oid
     WHERE c.oid = partition AND i.inhparent = 'arbiter.session_events'::regclass;
    IF table_name IS NULL THEN
        RAISE EXCEPTION '% is not a partition of arbiter.session_events', partition
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    chain := table_name || '_chain';
    EXECUTE format($source$
CREATE OR REPLACE FUNCTION arbiter.%1$I() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_bitmapscan = off
AS $chain$
DECLARE
    occurred_day date := (NEW.occurred_at AT TIME ZONE 'UTC')::date;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup'),
                                         arbiter.rollup_lock_key(occurred_day));
    IF occurred_day < (clock_timestamp() AT TIME ZONE 'UTC')::date THEN
        PERFORM arbiter.rollup_unseal(occurred_day);
    END IF;
    IF NEW.kind = 'denied' THEN
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.denials'), hashtext(NEW.session_id::text));
        -- Taken under the lock: a later link always has a larger id.
        NEW.event_id := nextval('arbiter.session_events_event_id_seq');
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.%2$I e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind = 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    ELSE
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.%2$I e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind <> 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    END IF;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := arbiter.audit_link_hash(
        NEW.prev_hash, NEW.event_key, NEW.session_id, NEW.agent_id, NEW.kind, NEW.tools,
        NEW.calls_made, NEW.rate_window_calls, NEW.status, NEW.session_version,
        NEW.occurred_at, NEW.recorded_at, NEW.instance_id, NEW.reason,
        NEW.limited_tools, NEW.tool_calls);
    RETURN NEW;
END
$chain$
$source$, chain, table_name);
    EXECUTE format('COMMENT ON FUNCTION arbiter.%I() IS %L', chain,
                   'The audit chain trigger of arbiter.' || table_name
                   || ', made by arbiter.install_event_partition_chain: install it again rather than edit it.');
    EXECUTE format('CREATE OR REPLACE TRIGGER session_events_chain BEFORE INSERT ON arbiter.%I '
                   'FOR EACH ROW EXECUTE FUNCTION arbiter.%I()', table_name, chain);
END
$install$;

-- create_event_partition of migration 20261201000001, which now installs the new
-- partition's chain trigger. It is installed in the transaction that attaches the
-- partition, so no event can reach the partition before its trigger does.
CREATE OR REPLACE FUNCTION arbiter.create_event_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text := 'session_events_' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(format('arbiter.%I', name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- Created apart and then attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on
    -- the parent, so the calls writing events meanwhile are not blocked.
    EXECUTE format('CREATE TABLE arbiter.%I (LIKE arbiter.session_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', name);
    PERFORM arbiter.name_event_partition_keys(name);
    BEGIN
        EXECUTE format('ALTER TABLE arbiter.session_events ATTACH PARTITION arbiter.%I FOR VALUES FROM (%L) TO (%L)',
                       name, day, day + 1);
    EXCEPTION WHEN check_violation THEN
        EXECUTE format('DROP TABLE arbiter.%I', name);
        RAISE WARNING 'arbiter.session_events_default holds events of sessions created on %; that day gets no partition', day;
        RETURN false;
    END;
    PERFORM arbiter.install_event_partition_chain(format('arbiter.%I', name)::regclass);
    EXECUTE format('CREATE TRIGGER session_events_append_only_truncate BEFORE TRUNCATE ON arbiter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION arbiter.session_events_refuse_change()', name);
    RETURN true;
END
$$;

-- ensure_event_partitions of migration 20261201000001, which now also keeps the chain
-- triggers in step with the partitions: a partition without one (attached by hand) gets
-- it, and the function of a partition that is gone (dropped by a purge) is dropped. The
-- store calls it at startup and at its daily tick.
CREATE OR REPLACE FUNCTION arbiter.ensure_event_partitions(days_ahead integer DEFAULT 7) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    created integer := 0;
    day date;
    unchained regclass;
    orphan regprocedure;
BEGIN
    IF days_ahead IS NULL OR days_ahead < 0 OR days_ahead > 366 THEN
        RAISE EXCEPTION 'days_ahead must be between 0 and 366, not %', days_ahead
            USING ERRCODE = 'invalid_parameter_value', CONSTRAINT = 'partition_days_ahead_range';
    END IF;
    -- One creator at a time; the lock ends with the transaction.
    PERFORM pg_advisory_xact_lock(hashtext('arbiter.ensure_event_partitions'));
    FOR day IN SELECT d::date FROM generate_series(today - 1, today + days_ahead, interval '1 day') AS d LOOP
        IF arbiter.create_event_partition(day) THEN
            created := created + 1;
        END IF;
    END LOOP;
    FOR unchained IN
        SELECT p.partition FROM arbiter.event_partitions() p
         WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t
                            WHERE t.tgrelid = p.partition AND t.tgname = 'session_events_chain')
    LOOP
        RAISE WARNING '% had no audit chain trigger; installed', unchained;
        PERFORM arbiter.install_event_partition_chain(unchained);
    END LOOP;
    FOR orphan IN
        SELECT f.oid::regprocedure FROM pg_proc f
         WHERE f.pronamespace = 'arbiter'::regnamespace
           AND f.proname ~ '^session_events_([0-9]{8}|default)_chain$'
           AND to_regclass(format('arbiter.%I', left(f.proname, -length('_chain')))) IS NULL
    LOOP
        EXECUTE format('DROP FUNCTION %s', orphan);
    END LOOP;
    RETURN created;
END
$$;

DO $$
DECLARE
    partition regclass;
BEGIN
    FOR partition IN SELECT p.partition FROM arbiter.event_partitions() p LOOP
        PERFORM arbiter.install_event_partition_chain(partition);
    END LOOP;
END
$$;
