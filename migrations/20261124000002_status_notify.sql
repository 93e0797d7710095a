-- Cache invalidation across processes (DESIGN.md §6): every status change of a session,
-- whoever makes it (a store, the reconciler, an operator's plain SQL), notifies the channel
-- `arbiter_session_status` with the session id as payload. Each store listens and drops
-- that session from its cache. NOTIFY is delivered at commit, so a listener never sees a
-- change that rolled back.

CREATE FUNCTION arbiter.sessions_notify_status() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('arbiter_session_status', NEW.session_id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_status_notify
    AFTER UPDATE OF status ON arbiter.sessions
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION arbiter.sessions_notify_status();
