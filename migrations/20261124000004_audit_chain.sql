-- Tamper evidence (DESIGN.md §5): the state-changing events of a session (every kind but
-- `denied`) form a SHA-256 hash chain. Each such event stores the hash of its predecessor
-- in the session's chain (`prev_hash`, 32 zero bytes for the first) and its own
-- `hash = sha256(prev_hash || canonical encoding of the row)`.
--
-- The chain is computed here, by a trigger, so that every writer is chained the same way
-- (the library, another version of it, an operator's INSERT). Writers of one session are
-- serialized by the session row's lock (every state-changing event is inserted by the
-- statement that inserts or updates that row), and a row-level BEFORE trigger sees the rows
-- its own statement inserted before it, so the predecessor lookup is exact.
--
-- The library's `verify_audit_chain` recomputes every hash with its own implementation of
-- the encoding below; an edit made with the append-only trigger disabled breaks the chain at
-- the edited row (its hash) or at its successor (a removed or reordered predecessor).
--
-- Canonical encoding, version 1 (all integers big-endian, as int4send/int8send give them):
--   event_key, session_id, agent_id             16 bytes each (uuid_send)
--   kind                                        text
--   tools                                       int4 count, then each element as text
--   calls_made, rate_window_calls               int8 each
--   status                                      text
--   session_version                             int8
--   occurred_at, recorded_at                    int8 microseconds since 1970-01-01 UTC
--   instance_id                                 16 bytes
-- where text is an int4 byte length followed by the UTF-8 bytes (a NULL array element is
-- length -1 and no bytes).

ALTER TABLE arbiter.session_events
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash      bytea;

COMMENT ON COLUMN arbiter.session_events.prev_hash IS
    'Hash of the previous state-changing event of the session (32 zero bytes for the first); NULL for denials.';
COMMENT ON COLUMN arbiter.session_events.hash IS
    'sha256(prev_hash || canonical encoding of this row), see migration 20261124000004; NULL for denials.';

CREATE FUNCTION arbiter.audit_text(value text) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN int4send(-1)
                ELSE int4send(octet_length(convert_to(value, 'UTF8'))) || convert_to(value, 'UTF8')
           END
$$;

CREATE FUNCTION arbiter.audit_micros(at timestamptz) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT int8send((extract(epoch FROM at) * 1000000)::bigint)
$$;

-- The hash of event `e` whose predecessor's hash is `prev`.
CREATE FUNCTION arbiter.audit_event_hash(prev bytea, e arbiter.session_events) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(
        prev
        || uuid_send(e.event_key) || uuid_send(e.session_id) || uuid_send(e.agent_id)
        || arbiter.audit_text(e.kind)
        || int4send(cardinality(e.tools))
        || coalesce((SELECT string_agg(arbiter.audit_text(tool), ''::bytea ORDER BY position)
                       FROM unnest(e.tools) WITH ORDINALITY AS t(tool, position)), ''::bytea)
        || int8send(e.calls_made) || int8send(e.rate_window_calls)
        || arbiter.audit_text(e.status)
        || int8send(e.session_version)
        || arbiter.audit_micros(e.occurred_at) || arbiter.audit_micros(e.recorded_at)
        || uuid_send(e.instance_id))
$$;

-- The chain's predecessor lookup: the newest state-changing event of one session, found
-- without walking over the denials recorded after it.
CREATE INDEX session_events_chain ON arbiter.session_events (session_id, event_id)
    WHERE kind <> 'denied';

CREATE FUNCTION arbiter.session_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'denied' THEN
        NEW.prev_hash := NULL;
        NEW.hash := NULL;
        RETURN NEW;
    END IF;
    SELECT e.hash INTO NEW.prev_hash
      FROM arbiter.session_events e
     WHERE e.session_id = NEW.session_id AND e.kind <> 'denied'
     ORDER BY e.event_id DESC
     LIMIT 1;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    NEW.hash := arbiter.audit_event_hash(NEW.prev_hash, NEW);
    RETURN NEW;
END
$$;

-- Events written before this migration get their chain now, oldest first per session.
ALTER TABLE arbiter.session_events DISABLE TRIGGER session_events_append_only;
DO $$
DECLARE
    e arbiter.session_events;
    previous_session uuid;
    head bytea;
BEGIN
    FOR e IN SELECT * FROM arbiter.session_events WHERE kind <> 'denied'
              ORDER BY session_id, event_id
    LOOP
        IF previous_session IS DISTINCT FROM e.session_id THEN
            head := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
            previous_session := e.session_id;
        END IF;
        UPDATE arbiter.session_events
           SET prev_hash = head, hash = arbiter.audit_event_hash(head, e)
         WHERE event_id = e.event_id
        RETURNING hash INTO head;
    END LOOP;
END
$$;
ALTER TABLE arbiter.session_events ENABLE TRIGGER session_events_append_only;

CREATE TRIGGER session_events_chain
    BEFORE INSERT ON arbiter.session_events
    FOR EACH ROW EXECUTE FUNCTION arbiter.session_events_chain();

ALTER TABLE arbiter.session_events
    ADD CONSTRAINT session_events_chained_unless_denied CHECK
        ((kind = 'denied') = (hash IS NULL) AND (hash IS NULL) = (prev_hash IS NULL));
