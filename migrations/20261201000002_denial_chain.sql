-- Denials become tamper-evident: the denials of a session form a SHA-256 chain of their
-- own, beside the chain of its state-changing events (migration 20261124000004).
--
-- Why a chain of their own: a denial is recorded after the fact, in batches, without the
-- session's row lock, so it cannot take a place in the state chain without making the
-- hot path wait for the denial path. Why per session: retention removes a session's
-- events whole (purge_before below), so a session's denial chain is kept or removed whole
-- too, and `verify` can demand that every chain starts at the genesis hash.
--
-- Serialization: the state chain is ordered by the session row's lock. A denial takes a
-- transaction-level advisory lock on its session (key space 'arbiter.denials') in the
-- chain trigger, and only then takes its event_id, so the chain's order is the event_id
-- order even when two processes record denials of one session at once. record_denials
-- inserts a batch in session order, so two batches never wait for each other in a cycle.
-- Nothing of this is on a call's path: denials are written by each store's denial log.
--
-- Encoding of a denial link (state links are unchanged, version 1): the version-1 fields,
-- with session_version (NULL for a denial) as -1, followed by the reason as text.

-- The hash of one link: the one place the encoding is written in SQL (the library's
-- `operator::chain::link_hash` is the independent implementation).
CREATE FUNCTION arbiter.audit_link_hash(
    prev bytea, event_key uuid, session_id uuid, agent_id uuid, kind text, tools text[],
    calls_made bigint, rate_window_calls bigint, status text, session_version bigint,
    occurred_at timestamptz, recorded_at timestamptz, instance_id uuid, reason text)
RETURNS bytea
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    folded bytea := int4send(cardinality(tools));
    tool text;
BEGIN
    FOREACH tool IN ARRAY tools LOOP
        folded := folded || arbiter.audit_text(tool);
    END LOOP;
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
        || CASE WHEN kind = 'denied' THEN arbiter.audit_text(reason) ELSE ''::bytea END);
END
$$;

-- A session's newest denial, found without walking its other events.
CREATE INDEX session_events_denials ON arbiter.session_events (session_id, event_id)
    WHERE kind = 'denied';

CREATE OR REPLACE FUNCTION arbiter.session_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'denied' THEN
        PERFORM pg_advisory_xact_lock(hashtext('arbiter.denials'), hashtext(NEW.session_id::text));
        -- Taken under the lock: a later link always has a larger id.
        NEW.event_id := nextval('arbiter.session_events_event_id_seq');
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.session_events e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind = 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    ELSE
        SELECT e.hash INTO NEW.prev_hash
          FROM arbiter.session_events e
         WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
           AND e.kind <> 'denied'
         ORDER BY e.event_id DESC
         LIMIT 1;
    END IF;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := arbiter.audit_link_hash(
        NEW.prev_hash, NEW.event_key, NEW.session_id, NEW.agent_id, NEW.kind, NEW.tools,
        NEW.calls_made, NEW.rate_window_calls, NEW.status, NEW.session_version,
        NEW.occurred_at, NEW.recorded_at, NEW.instance_id, NEW.reason);
    RETURN NEW;
END
$$;

-- The denials recorded before this migration get their chain now, oldest first.
ALTER TABLE arbiter.session_events DROP CONSTRAINT session_events_chained_unless_denied;
ALTER TABLE arbiter.session_events DISABLE TRIGGER session_events_append_only;
DO $$
DECLARE
    e record;
    previous_session uuid;
    head bytea;
BEGIN
    FOR e IN SELECT * FROM arbiter.session_events WHERE kind = 'denied'
              ORDER BY session_id, event_id
    LOOP
        IF previous_session IS DISTINCT FROM e.session_id THEN
            head := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
            previous_session := e.session_id;
        END IF;
        UPDATE arbiter.session_events
           SET prev_hash = head,
               hash = arbiter.audit_link_hash(
                   head, e.event_key, e.session_id, e.agent_id, e.kind, e.tools,
                   e.calls_made, e.rate_window_calls, e.status, e.session_version,
                   e.occurred_at, e.recorded_at, e.instance_id, e.reason)
         WHERE session_id = e.session_id AND event_id = e.event_id
           AND session_day = e.session_day
        RETURNING hash INTO head;
    END LOOP;
END
$$;
ALTER TABLE arbiter.session_events ENABLE TRIGGER session_events_append_only;

ALTER TABLE arbiter.session_events
    ADD CONSTRAINT session_events_chained CHECK (hash IS NOT NULL AND prev_hash IS NOT NULL);

COMMENT ON COLUMN arbiter.session_events.prev_hash IS
    'Hash of the previous link of the session''s chain (32 zero bytes for the first): state-changing events and denials are two chains.';
COMMENT ON COLUMN arbiter.session_events.hash IS
    'sha256(prev_hash || canonical encoding of this row), see arbiter.audit_link_hash.';

-- Retention by partition. The rules of migration 20261124000005 hold; only the way events
-- go changes. A partition goes whole (DROP TABLE: no row-by-row delete, no bloat) when its
-- day is over (before the cutoff's day and before yesterday), no session created on its
-- day is left, and none of its events was recorded at or after the cutoff: then every one
-- of its rows is one the row-by-row rule would delete. Rows are
-- deleted one by one only in the partitions that fail that test (the day that straddles the
-- cutoff, a day that still holds a live session) and in the default partition.
--
-- Retention removes a session's events whole: the events of a session whose row is gone
-- are deleted only when every one of them was recorded before the cutoff (a denial recorded
-- later keeps the whole trail until a later purge). Chains are never cut in the middle.
CREATE OR REPLACE FUNCTION arbiter.purge_before(
    cutoff timestamptz, with_events boolean DEFAULT false,
    OUT sessions_deleted bigint, OUT events_deleted bigint)
LANGUAGE plpgsql
-- A batch job over whole days: the planner, which cannot know how many sessions have late
-- events, would loop over them for every row; hash joins are what every step here needs.
SET enable_nestloop = off
AS $$
DECLARE
    partition regclass;
    partition_day date;
    rows bigint;
    days_with_sessions date[];
    recorded_late boolean;
BEGIN
    IF cutoff IS NULL OR cutoff > now() THEN
        RAISE EXCEPTION 'purge cutoff % is not in the past', cutoff
            USING ERRCODE = 'invalid_parameter_value', CONSTRAINT = 'purge_cutoff_in_past';
    END IF;
    PERFORM set_config('arbiter.purge_cutoff', cutoff::text, true);
    PERFORM set_config('arbiter.purge_events', CASE WHEN with_events THEN 'on' ELSE '' END, true);

    DELETE FROM arbiter.sessions s
     WHERE (s.status <> 'active' AND s.updated_at < cutoff)
        OR (s.status = 'active' AND s.expires_at < least(cutoff, now()));
    GET DIAGNOSTICS sessions_deleted = ROW_COUNT;

    events_deleted := 0;
    IF with_events THEN
        SELECT coalesce(array_agg(DISTINCT (s.created_at AT TIME ZONE 'UTC')::date), '{}')
          INTO days_with_sessions
          FROM arbiter.sessions s;
        FOR partition, partition_day IN
            SELECT p.partition, p.day FROM arbiter.event_partitions() p
             WHERE p.day IS NOT NULL
               -- A day before the cutoff's, and before yesterday: no store whose clock
               -- is right still creates sessions of that day, and a session lives at
               -- most a day. Today's and the days ahead stay, however empty.
               AND p.day < least((cutoff AT TIME ZONE 'UTC')::date,
                                 (now() AT TIME ZONE 'UTC')::date - 1)
               AND NOT p.day = ANY (days_with_sessions)
             ORDER BY p.day
        LOOP
            -- One pass over the partition: its rows, and whether any came after the cutoff.
            EXECUTE format('SELECT count(*), coalesce(bool_or(recorded_at >= $1), false) FROM %s',
                           partition)
               INTO rows, recorded_late USING cutoff;
            CONTINUE WHEN recorded_late;
            EXECUTE format('DROP TABLE %s', partition);
            events_deleted := events_deleted + rows;
        END LOOP;

        -- Only the days up to the day after the cutoff's (and the default partition) can
        -- hold an event recorded before the cutoff: a session's events are recorded after
        -- it was created (a day's slack for a store's clock). Later days are not read.
        -- The sessions with an event recorded at or after the cutoff keep their whole
        -- trail: found once, as a set (a probe per row would cost more than the delete).
        WITH late AS MATERIALIZED (
            SELECT DISTINCT l.session_id FROM arbiter.session_events l
             WHERE l.recorded_at >= cutoff
               AND l.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
        )
        DELETE FROM arbiter.session_events e
         WHERE e.recorded_at < cutoff
           AND e.session_day <= (cutoff AT TIME ZONE 'UTC')::date + 1
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = e.session_id)
           AND NOT EXISTS (SELECT 1 FROM late WHERE late.session_id = e.session_id);
        GET DIAGNOSTICS rows = ROW_COUNT;
        events_deleted := events_deleted + rows;
    END IF;

    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
END
$$;
