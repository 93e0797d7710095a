-- arbiter-session: durable task sessions and their append-only audit trail.
--
-- The database defends the library's invariants on its own (DESIGN.md §4), so that a bug in
-- one process, or an operator's hand-written SQL, cannot break them either:
--   * sessions_calls_within_budget: calls_made never exceeds call_budget;
--   * sessions_status_monotonic (trigger): closed or expired never becomes active again;
--   * sessions_version_advance (trigger): every UPDATE advances `version`, so a change made
--     with plain SQL is seen by every cache as a version conflict, never overwritten;
--   * session_events_append_only (trigger): the audit trail refuses UPDATE, DELETE, TRUNCATE.
-- Every constraint and trigger is named: the library classifies errors by these names.

CREATE SCHEMA IF NOT EXISTS arbiter;

CREATE TABLE arbiter.sessions (
    session_id               uuid        PRIMARY KEY,
    agent_id                 uuid        NOT NULL,
    delegation_chain         text[]      NOT NULL,
    declared_intent          text        NOT NULL,
    authorized_tools         text[]      NOT NULL,
    authorized_credentials   text[]      NOT NULL,
    call_budget              bigint      NOT NULL,
    calls_made               bigint      NOT NULL DEFAULT 0,
    -- At most `rate_limit` calls per window of `rate_window_secs`; NULL means unlimited.
    rate_limit               bigint,
    rate_window_secs         bigint      NOT NULL,
    -- The current fixed rate window: when it started and how many calls it has seen.
    rate_window_started_at   timestamptz,
    rate_window_calls        bigint      NOT NULL DEFAULT 0,
    data_sensitivity_ceiling text        NOT NULL,
    status                   text        NOT NULL DEFAULT 'active',
    created_at               timestamptz NOT NULL,
    expires_at               timestamptz NOT NULL,
    -- Advanced by trigger on every UPDATE; the library writes `WHERE version = <expected>`.
    version                  bigint      NOT NULL DEFAULT 1,
    updated_at               timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT sessions_budget_positive      CHECK (call_budget >= 1),
    CONSTRAINT sessions_calls_nonnegative    CHECK (calls_made >= 0),
    CONSTRAINT sessions_calls_within_budget  CHECK (calls_made <= call_budget),
    CONSTRAINT sessions_rate_limit_positive  CHECK (rate_limit IS NULL OR rate_limit >= 1),
    CONSTRAINT sessions_rate_window_positive CHECK (rate_window_secs >= 1),
    CONSTRAINT sessions_rate_calls_bounded   CHECK (rate_window_calls >= 0
                                                    AND (rate_limit IS NULL OR rate_window_calls <= rate_limit)),
    CONSTRAINT sessions_status_known         CHECK (status IN ('active', 'closed', 'expired')),
    CONSTRAINT sessions_sensitivity_known    CHECK (data_sensitivity_ceiling IN
                                                    ('public', 'internal', 'confidential', 'restricted')),
    CONSTRAINT sessions_expiry_after_start   CHECK (expires_at > created_at)
);

COMMENT ON TABLE arbiter.sessions IS
    'One row per task session. Mutated only through versioned UPDATEs; see session_events for history.';

-- Agent caps and per-agent listings look only at sessions still marked active.
CREATE INDEX sessions_active_by_agent ON arbiter.sessions (agent_id, expires_at)
    WHERE status = 'active';
-- expire_due() walks active sessions in expiry order.
CREATE INDEX sessions_active_by_expiry ON arbiter.sessions (expires_at)
    WHERE status = 'active';

CREATE FUNCTION arbiter.sessions_before_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'active' AND NEW.status <> OLD.status THEN
        RAISE EXCEPTION 'session % is %, its status cannot become %', OLD.session_id, OLD.status, NEW.status
            USING ERRCODE = 'check_violation', CONSTRAINT = 'sessions_status_monotonic',
                  TABLE = 'sessions', SCHEMA = 'arbiter';
    END IF;
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER sessions_version_advance
    BEFORE UPDATE ON arbiter.sessions
    FOR EACH ROW EXECUTE FUNCTION arbiter.sessions_before_update();

CREATE TABLE arbiter.session_events (
    event_id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Chosen by the writer. After a write whose outcome it did not learn (the commit may
    -- have happened), the writer looks its keys up here, so a change is never applied twice.
    event_key         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    agent_id          uuid        NOT NULL,
    kind              text        NOT NULL,
    -- The tool(s) of a call or batch; empty for other kinds.
    tools             text[]      NOT NULL DEFAULT '{}',
    -- Counters and status after the event.
    calls_made        bigint      NOT NULL,
    rate_window_calls bigint      NOT NULL,
    status            text        NOT NULL,
    -- The session's version after the statement that wrote this event.
    session_version   bigint      NOT NULL,
    -- When the library decided (its injectable clock) and when PostgreSQL recorded it.
    occurred_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    -- The process that wrote the event (SessionStore instance id).
    instance_id       uuid        NOT NULL,

    CONSTRAINT session_events_key_unique UNIQUE (event_key),
    CONSTRAINT session_events_kind_known CHECK (kind IN
        ('created', 'call_allowed', 'batch_allowed', 'closed', 'expired', 'reconciled'))
);

COMMENT ON TABLE arbiter.session_events IS
    'Append-only audit trail: one row per session state change, written in the same statement as the change.';

CREATE INDEX session_events_by_session ON arbiter.session_events (session_id, event_id);

CREATE FUNCTION arbiter.session_events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'arbiter.session_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'session_events_append_only',
              TABLE = 'session_events', SCHEMA = 'arbiter';
END
$$;

CREATE TRIGGER session_events_append_only
    BEFORE UPDATE OR DELETE ON arbiter.session_events
    FOR EACH ROW EXECUTE FUNCTION arbiter.session_events_refuse_change();

CREATE TRIGGER session_events_append_only_truncate
    BEFORE TRUNCATE ON arbiter.session_events
    FOR EACH STATEMENT EXECUTE FUNCTION arbiter.session_events_refuse_change();
