-- Retention (DESIGN.md §5): deletion is an explicit call, `arbiter.purge_before(cutoff,
-- with_events)`, and the database allows no other.
--
--   * A session may be deleted only when it is over: closed or expired and last changed
--     before the cutoff, or still marked active but past its time limit (before the cutoff
--     and before now). A live session is never deleted.
--   * An event may be deleted only when its session row is gone and it was recorded before
--     the cutoff, and only when the purge was asked to delete events. The audit trail is
--     otherwise append-only, as before; TRUNCATE stays refused.
--
-- The triggers enforce exactly what purge_before does: it sets the transaction-local
-- settings `arbiter.purge_cutoff` and `arbiter.purge_events`, deletes, and clears them. A
-- session that sets them by hand can delete only what purge_before would have deleted.

-- Whether a session with this status and these times may be purged at `cutoff`.
CREATE FUNCTION arbiter.session_purgeable(
    status text, updated_at timestamptz, expires_at timestamptz, cutoff timestamptz)
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN status = 'active' THEN expires_at < least(cutoff, now())
                ELSE updated_at < cutoff
           END
$$;

CREATE FUNCTION arbiter.purge_setting(name text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT nullif(current_setting(name, true), '')
$$;

CREATE FUNCTION arbiter.sessions_guard_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := arbiter.purge_setting('arbiter.purge_cutoff')::timestamptz;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        RAISE EXCEPTION 'arbiter.sessions may not be truncated; sessions are deleted only by arbiter.purge_before'
            USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'sessions_retention_only',
                  TABLE = 'sessions', SCHEMA = 'arbiter';
    END IF;
    IF cutoff IS NULL
       OR NOT arbiter.session_purgeable(OLD.status, OLD.updated_at, OLD.expires_at, cutoff) THEN
        RAISE EXCEPTION 'session % may be deleted only by arbiter.purge_before, once it is over', OLD.session_id
            USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'sessions_retention_only',
                  TABLE = 'sessions', SCHEMA = 'arbiter';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER sessions_retention_only
    BEFORE DELETE ON arbiter.sessions
    FOR EACH ROW EXECUTE FUNCTION arbiter.sessions_guard_delete();

CREATE TRIGGER sessions_retention_only_truncate
    BEFORE TRUNCATE ON arbiter.sessions
    FOR EACH STATEMENT EXECUTE FUNCTION arbiter.sessions_guard_delete();

-- The append-only trigger of migration 1, now with the one exception of a purge.
CREATE OR REPLACE FUNCTION arbiter.session_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := arbiter.purge_setting('arbiter.purge_cutoff')::timestamptz;
BEGIN
    IF TG_OP = 'DELETE' AND TG_LEVEL = 'ROW'
       AND cutoff IS NOT NULL
       AND arbiter.purge_setting('arbiter.purge_events') = 'on'
       AND OLD.recorded_at < cutoff
       AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = OLD.session_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'arbiter.session_events is append-only (% refused; only arbiter.purge_before deletes)', TG_OP
        USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'session_events_append_only',
              TABLE = 'session_events', SCHEMA = 'arbiter';
END
$$;

-- No index on updated_at: it changes with every call, and an indexed column would turn
-- every hot-path UPDATE from a HOT update into one that writes every index. A purge is a
-- batch job; it may scan.

CREATE FUNCTION arbiter.purge_before(
    cutoff timestamptz, with_events boolean DEFAULT false,
    OUT sessions_deleted bigint, OUT events_deleted bigint)
LANGUAGE plpgsql AS $$
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
        DELETE FROM arbiter.session_events e
         WHERE e.recorded_at < cutoff
           AND NOT EXISTS (SELECT 1 FROM arbiter.sessions s WHERE s.session_id = e.session_id);
        GET DIAGNOSTICS events_deleted = ROW_COUNT;
    END IF;

    PERFORM set_config('arbiter.purge_cutoff', '', true);
    PERFORM set_config('arbiter.purge_events', '', true);
END
$$;

COMMENT ON FUNCTION arbiter.purge_before(timestamptz, boolean) IS
    'Deletes sessions that ended before the cutoff (never a live one) and, with_events = true, the events of sessions that no longer exist recorded before it. The only way to delete either.';
