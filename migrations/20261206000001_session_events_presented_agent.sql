-- A denial records who presented the session and how many tools the denied call named.
--
-- session_events.agent_id is the session's agent: a denial is filed with the session it is
-- about. The agent that presented the session may be another one (agent_mismatch), and
-- until now the trail never said which. A denied call may also name up to 1,024 tools;
-- its denial now keeps the first 16 of them in `tools` and the number it named in
-- `tool_count`, so that an agent cannot make each denial row as large as its request.
--
-- Both columns are written for denials only, and are NULL on every other event and on the
-- denials recorded before this migration. Adding nullable columns without a default
-- rewrites nothing.
ALTER TABLE arbiter.session_events
    ADD COLUMN presented_agent_id uuid,
    ADD COLUMN tool_count integer;

COMMENT ON COLUMN arbiter.session_events.presented_agent_id IS
    'Denials: the agent that presented the session (agent_id is the session''s own); NULL when the caller did not name one, and on other events.';
COMMENT ON COLUMN arbiter.session_events.tool_count IS
    'Denials: how many tools the denied call named; tools holds the first 16 of them. NULL on other events.';

-- The link hash of migration 20261201000006, followed, for a denial that records them, by
-- a byte 0xff, the presenting agent (the nil UUID when NULL) and the tool count (-1 when
-- NULL). A count of limited tools, the only other section that may follow the reason, is
-- never negative, so it never starts with 0xff: no two rows encode alike. Events without
-- either column hash as before, so no stored hash changes.
CREATE FUNCTION arbiter.audit_link_hash(
    prev bytea, event_key uuid, session_id uuid, agent_id uuid, kind text, tools text[],
    calls_made bigint, rate_window_calls bigint, status text, session_version bigint,
    occurred_at timestamptz, recorded_at timestamptz, instance_id uuid, reason text,
    limited_tools text[], tool_calls bigint[], presented_agent_id uuid, tool_count integer)
RETURNS bytea
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    folded    bytea := int4send(cardinality(tools));
    counted   bytea := ''::bytea;
    presented bytea := ''::bytea;
    tool      text;
    i         integer;
BEGIN
    FOREACH tool IN ARRAY tools LOOP
        folded := folded || arbiter.audit_text(tool);
    END LOOP;
    IF limited_tools IS NOT NULL THEN
        counted := int4send(cardinality(limited_tools));
        FOR i IN 1 .. cardinality(limited_tools) LOOP
            counted := counted || arbiter.audit_text(limited_tools[i])
                               || int8send(tool_calls[i]);
        END LOOP;
    END IF;
    IF presented_agent_id IS NOT NULL OR tool_count IS NOT NULL THEN
        presented := '\xff'::bytea
            || uuid_send(coalesce(presented_agent_id, '00000000-0000-0000-0000-000000000000'::uuid))
            || int4send(coalesce(tool_count, -1));
    END IF;
    RETURN sha256(
        prev
        || uuid_send(event_key) || uuid_send(session_id) || uuid_send(agent_id)
        || arbiter.audit_text(kind)
        || folded
        || int8send(calls_made) || int8send(rate_window_calls)
        || arbiter.audit_text(status)
        || int8send(coalesce(session_version, -1))
        || arbiter.audit_micros(occurred_at) || arbiter.audit_micros(recorded_at)
        || uuid_send(instance_id)
        || CASE WHEN kind = 'denied' THEN arbiter.audit_text(reason) ELSE ''::bytea END
        || counted
        || presented);
END
$$;

-- The chain trigger's template of migration 20261201000009, hashing the two new columns.
-- Each partition's chain function now runs with its owner's rights (SECURITY DEFINER, with
-- a fixed search_path): it reads its partition directly and keeps the rollups' bookkeeping
-- (rollup_days, rollup_today), which the gateways' role then needs no grant on; a role
-- that may INSERT into arbiter.session_events is all a gateway is. A trigger function
-- cannot be called except as a trigger, so it lends those rights to nothing else.
-- Installed again on every partition below.
CREATE OR REPLACE FUNCTION arbiter.install_event_partition_chain(partition regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $install$
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
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_bitmapscan = off
AS $chain$
DECLARE
    occurred_day date := (NEW.occurred_at AT TIME ZONE 'UTC')::date;
    read_at timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('arbiter.rollup'),
                                         arbiter.rollup_lock_key(occurred_day));
    read_at := clock_timestamp();
    IF NEW.occurred_at < read_at - arbiter.rollup_today_lag() THEN
        PERFORM arbiter.rollup_today_late(NEW.occurred_at);
    END IF;
    IF occurred_day < (read_at AT TIME ZONE 'UTC')::date THEN
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
        NEW.limited_tools, NEW.tool_calls, NEW.presented_agent_id, NEW.tool_count);
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

SELECT arbiter.install_event_partition_chain(p.partition) FROM arbiter.event_partitions() p;

DROP FUNCTION arbiter.audit_link_hash(bytea, uuid, uuid, uuid, text, text[], bigint, bigint,
                                      text, bigint, timestamptz, timestamptz, uuid, text,
                                      text[], bigint[]);
