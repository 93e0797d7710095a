-- Sessions that draw on a shared budget (migration 20261206000005), and calls that cost
-- units of it.
--
-- A session names at most one budget (budget_id) and, per tool, what a call of it costs in
-- the budget's units (cost_tools and tool_costs, parallel arrays sorted by tool; a tool
-- without an entry costs 1, an explicit cost given with a call overrides both). Both are
-- fixed at creation, like the tool limits.
--
-- An allowed call's event records what it cost (cost) and which share it was charged to
-- (share_id); the statement that writes it adds the costs of its events to their shares
-- (arbiter.budget_charge), in the same transaction as the session's row. So, for every
-- share, used is the sum of the costs of the events that name it: the trail explains every
-- unit. A denial by a shared budget names the budget that had no room (budget_id). The
-- three columns are hashed into the audit chain when any is set; events without them hash
-- as before, so no stored hash changes.

ALTER TABLE arbiter.sessions
    ADD COLUMN budget_id  text     REFERENCES arbiter.budgets (budget_id),
    ADD COLUMN cost_tools text[]   NOT NULL DEFAULT '{}',
    ADD COLUMN tool_costs bigint[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT sessions_tool_costs_named
        CHECK (cardinality(cost_tools) = cardinality(tool_costs)
               AND array_position(cost_tools, NULL) IS NULL
               AND array_position(tool_costs, NULL) IS NULL
               AND 0 <= ALL (tool_costs));

COMMENT ON COLUMN arbiter.sessions.budget_id IS
    'The shared budget the session''s calls are charged to (and so its ancestors); NULL: none.';
COMMENT ON COLUMN arbiter.sessions.cost_tools IS
    'Tools whose calls cost other than 1 unit of the shared budget, sorted by name; tool_costs holds, at the same positions, what each costs.';

CREATE FUNCTION arbiter.sessions_budget_fixed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
BEGIN
    IF NEW.budget_id IS DISTINCT FROM OLD.budget_id
       OR NEW.cost_tools IS DISTINCT FROM OLD.cost_tools
       OR NEW.tool_costs IS DISTINCT FROM OLD.tool_costs THEN
        RAISE EXCEPTION 'the budget and tool costs of session % cannot change', OLD.session_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sessions_budget_fixed',
                  TABLE = 'sessions', SCHEMA = 'arbiter';
    END IF;
    RETURN NEW;
END
$$;

-- Fires only for an UPDATE that names these columns; the library's never does.
CREATE TRIGGER sessions_budget_fixed
    BEFORE UPDATE OF budget_id, cost_tools, tool_costs ON arbiter.sessions
    FOR EACH ROW EXECUTE FUNCTION arbiter.sessions_budget_fixed();

-- A denial by a shared budget has a reason of its own. Re-adding the reason's check reads
-- every event once, as migration 20261201000005 did.
ALTER TABLE arbiter.session_events
    ADD COLUMN cost      bigint,
    ADD COLUMN share_id  uuid,
    ADD COLUMN budget_id text,
    ADD CONSTRAINT session_events_cost_not_negative CHECK (cost >= 0),
    DROP CONSTRAINT session_events_reason_known,
    ADD CONSTRAINT session_events_reason_known CHECK (reason IN
        ('agent_mismatch', 'closed', 'expired', 'budget', 'tool_budget', 'tool', 'rate',
         'write_through', 'invalid', 'shared_budget'));

COMMENT ON COLUMN arbiter.session_events.reason IS
    'Why a call was denied (kind = denied only): agent_mismatch, closed, expired, budget, tool_budget (a tool''s own limit), tool, rate, write_through, invalid, shared_budget (budget_id names the budget that had no room).';

COMMENT ON COLUMN arbiter.session_events.cost IS
    'Allowed calls of a session with a shared budget: the units the call cost, charged to share_id. NULL otherwise.';
COMMENT ON COLUMN arbiter.session_events.share_id IS
    'Allowed calls of a session with a shared budget: the share (arbiter.budget_shares) the cost was charged to.';
COMMENT ON COLUMN arbiter.session_events.budget_id IS
    'Allowed calls: the session''s shared budget. Denials for reason shared_budget: the budget (the session''s or an ancestor) that had no room.';

-- Adds `units` to each of `shares` (distinct), in share order so that two statements
-- charging the same shares lock them in the same order. A share that is closed, whose
-- lease ran out, or that does not exist refuses the whole statement
-- (budget_shares_live, the share in the DETAIL): its units may have gone back to the
-- budget. Called once by each statement that writes allowed calls
-- (storage/postgres/sql/update.sql, update_batch.sql).
CREATE FUNCTION arbiter.budget_charge(shares uuid[], units bigint[]) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    charge record;
    charged integer := 0;
BEGIN
    FOR charge IN
        SELECT c.share_id, c.units FROM unnest(shares, units) AS c(share_id, units)
         ORDER BY c.share_id
    LOOP
        UPDATE arbiter.budget_shares s
           SET used = s.used + charge.units
         WHERE s.share_id = charge.share_id AND s.closed_at IS NULL
           AND s.lease_until > now();
        IF NOT FOUND THEN
            RAISE EXCEPTION 'share % is closed, expired or unknown', charge.share_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'budget_shares_live',
                      TABLE = 'budget_shares', SCHEMA = 'arbiter',
                      DETAIL = charge.share_id::text;
        END IF;
        charged := charged + 1;
    END LOOP;
    RETURN charged;
END
$$;

REVOKE EXECUTE ON FUNCTION arbiter.budget_charge(uuid[], bigint[]) FROM PUBLIC;

-- The link hash of migration 20261206000001, followed, for an event that records any of
-- cost, share_id and budget_id, by a byte 0xfe, the cost (-1 when NULL), the share (the
-- nil UUID when NULL) and the budget id ('' when NULL). What may come before it ends
-- either with the reason or the limited tools' section (a count that is never negative,
-- so never starts with 0xfe or 0xff), or with the 0xff section of fixed length: no two
-- rows encode alike. Events without the three columns hash as before.
CREATE FUNCTION arbiter.audit_link_hash(
    prev bytea, event_key uuid, session_id uuid, agent_id uuid, kind text, tools text[],
    calls_made bigint, rate_window_calls bigint, status text, session_version bigint,
    occurred_at timestamptz, recorded_at timestamptz, instance_id uuid, reason text,
    limited_tools text[], tool_calls bigint[], presented_agent_id uuid, tool_count integer,
    cost bigint, share_id uuid, budget_id text)
RETURNS bytea
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    folded    bytea := int4send(cardinality(tools));
    counted   bytea := ''::bytea;
    presented bytea := ''::bytea;
    charged   bytea := ''::bytea;
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
    IF cost IS NOT NULL OR share_id IS NOT NULL OR budget_id IS NOT NULL THEN
        charged := '\xfe'::bytea
            || int8send(coalesce(cost, -1))
            || uuid_send(coalesce(share_id, '00000000-0000-0000-0000-000000000000'::uuid))
            || arbiter.audit_text(coalesce(budget_id, ''));
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
        || presented
        || charged);
END
$$;

-- The chain trigger's template of migration 20261206000001, hashing the three new columns.
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
        NEW.limited_tools, NEW.tool_calls, NEW.presented_agent_id, NEW.tool_count,
        NEW.cost, NEW.share_id, NEW.budget_id);
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
                                      text[], bigint[], uuid, integer);
