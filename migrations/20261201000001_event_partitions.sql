-- The audit trail, partitioned by the owning session's creation day (docs/reporting.md,
-- "Partitions" and "Retention").
--
--   * `session_day` is the UTC day of the session's `created_at`, carried on each of its
--     events by the writer. A session lives at most 24 h, so its whole chain, its event keys
--     and the ambiguous-commit probe stay inside one partition; every lookup the hot path
--     makes names the day, so it touches one partition however many months are stored.
--   * Partitions are daily, named `session_events_YYYYMMDD`, created ahead by
--     `arbiter.ensure_event_partitions()` (the store calls it at start and daily;
--     `arbiter-session partitions ensure` calls it by hand). `session_events_default`
--     catches a day that has no partition yet; `inspect` warns when it holds rows.
--   * Retention drops whole partitions (`arbiter.purge_before`, migration
--     20261201000002_denial_chain.sql, which lists them with `event_partitions()` below).
--   * Every guarantee of the unpartitioned table holds: append-only (row triggers are cloned
--     to every partition; the TRUNCATE trigger is created on each, since statement triggers
--     are not), the hash chain (same encoding, same hashes: existing chains stay valid), the
--     named constraints the library classifies errors by.
--
-- Indexes (each one costs every call; each is here for a query that needs it):
--   * session_events_pkey (session_id, event_id, session_day): one session's trail in
--     order (`inspect`, `report session`, utilization's close time and denial count); it
--     replaces both the old primary key on event_id alone, which no query used, and
--     session_events_by_session.
--   * session_events_key_unique (event_key, session_day): an event is stored once; the
--     ambiguous-commit probe and `record_denials`' ON CONFLICT use it.
--   * session_events_chain (session_id, event_id) WHERE kind <> 'denied': the chain's
--     predecessor lookup at every insert, and `verify`.
--   * session_events_by_agent_day (agent_id, day): one agent's day in the activity views.
--   * session_events_occurred_brin, BRIN (occurred_at): `export` of a time range reads only
--     the blocks of that range. A BRIN index stores a summary per 32 blocks and is
--     summarized by vacuum, so an insert costs it next to nothing.
--
-- The existing rows are copied in one pass, with their ids, times and hashes unchanged.
-- An event whose session row was already purged takes the day of its session's first event.

ALTER TABLE arbiter.session_events RENAME TO session_events_unpartitioned;
ALTER TABLE arbiter.session_events_unpartitioned ALTER COLUMN event_id DROP IDENTITY;
ALTER TABLE arbiter.session_events_unpartitioned
    DROP CONSTRAINT session_events_key_unique,
    DROP CONSTRAINT session_events_pkey;
DROP INDEX arbiter.session_events_by_session;
DROP INDEX arbiter.session_events_chain;
DROP INDEX arbiter.session_events_by_agent_day;
DROP TRIGGER session_events_chain ON arbiter.session_events_unpartitioned;

-- PostgreSQL 15 has no identity columns on partitioned tables: a sequence, continuing the
-- old one, is the default of event_id.
CREATE SEQUENCE arbiter.session_events_event_id_seq AS bigint;
DO $$
BEGIN
    PERFORM setval('arbiter.session_events_event_id_seq',
                   coalesce((SELECT max(event_id) FROM arbiter.session_events_unpartitioned), 0) + 1,
                   false);
END
$$;

CREATE TABLE arbiter.session_events (
    event_id          bigint      NOT NULL DEFAULT nextval('arbiter.session_events_event_id_seq'),
    event_key         uuid        NOT NULL,
    session_id        uuid        NOT NULL,
    agent_id          uuid        NOT NULL,
    kind              text        NOT NULL,
    tools             text[]      NOT NULL DEFAULT '{}',
    calls_made        bigint      NOT NULL,
    rate_window_calls bigint      NOT NULL,
    status            text        NOT NULL,
    session_version   bigint,
    occurred_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    instance_id       uuid        NOT NULL,
    reason            text,
    prev_hash         bytea,
    hash              bytea,
    -- The UTC day of the owning session's created_at: the partition key.
    session_day       date        NOT NULL,

    CONSTRAINT session_events_pkey PRIMARY KEY (session_id, event_id, session_day),
    CONSTRAINT session_events_key_unique UNIQUE (event_key, session_day),
    CONSTRAINT session_events_kind_known CHECK (kind IN
        ('created', 'call_allowed', 'batch_allowed', 'closed', 'expired', 'reconciled', 'denied')),
    CONSTRAINT session_events_reason_iff_denied CHECK ((kind = 'denied') = (reason IS NOT NULL)),
    CONSTRAINT session_events_reason_known CHECK (reason IN
        ('agent_mismatch', 'closed', 'expired', 'budget', 'tool', 'rate', 'write_through',
         'invalid')),
    CONSTRAINT session_events_version_unless_denied CHECK
        ((kind = 'denied') = (session_version IS NULL)),
    CONSTRAINT session_events_chained_unless_denied CHECK
        ((kind = 'denied') = (hash IS NULL) AND (hash IS NULL) = (prev_hash IS NULL))
) PARTITION BY RANGE (session_day);

ALTER SEQUENCE arbiter.session_events_event_id_seq OWNED BY arbiter.session_events.event_id;

COMMENT ON TABLE arbiter.session_events IS
    'Append-only audit trail: one row per session state change (written in the same statement as the change) or denied call. Partitioned by session_day.';
COMMENT ON COLUMN arbiter.session_events.session_day IS
    'UTC day of the owning session''s created_at: the partition key. All events of a session share it.';
COMMENT ON COLUMN arbiter.session_events.reason IS
    'Why a call was denied (kind = denied only): agent_mismatch, closed, expired, budget, tool, rate, write_through, invalid.';
COMMENT ON COLUMN arbiter.session_events.prev_hash IS
    'Hash of the previous state-changing event of the session (32 zero bytes for the first); NULL for denials.';
COMMENT ON COLUMN arbiter.session_events.hash IS
    'sha256(prev_hash || canonical encoding of this row), see migration 20261124000004; NULL for denials.';

CREATE INDEX session_events_chain ON arbiter.session_events (session_id, event_id)
    WHERE kind <> 'denied';
CREATE INDEX session_events_by_agent_day
    ON arbiter.session_events (agent_id, ((occurred_at AT TIME ZONE 'UTC')::date));
CREATE INDEX session_events_occurred_brin ON arbiter.session_events
    USING brin (occurred_at) WITH (pages_per_range = 32);

-- A partition's unique constraints are named after the parent's: `<partition>_pkey` and
-- `<partition>_key_unique`. PostgreSQL reports a violation under the partition's name, and
-- the library maps `session_events_<day>_key_unique` back to `session_events_key_unique`.
-- Made before ATTACH, which then adopts them instead of building its own.
CREATE FUNCTION arbiter.name_event_partition_keys(name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('ALTER TABLE arbiter.%I ADD CONSTRAINT %I PRIMARY KEY (session_id, event_id, session_day), '
                   'ADD CONSTRAINT %I UNIQUE (event_key, session_day)',
                   name, name || '_pkey', name || '_key_unique');
END
$$;

CREATE TABLE arbiter.session_events_default
    (LIKE arbiter.session_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
SELECT arbiter.name_event_partition_keys('session_events_default');
ALTER TABLE arbiter.session_events ATTACH PARTITION arbiter.session_events_default DEFAULT;

-- The chain trigger. It now fires on each partition, where NEW has the partition's row type,
-- so the hash is computed here rather than by a function over the parent's row type. Same
-- encoding (version 1, migration 20261124000004; session_day is not part of it), so every
-- stored hash stays valid. The predecessor lookup names the day: it reads one partition.
CREATE OR REPLACE FUNCTION arbiter.session_events_chain() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    tools bytea;
    tool text;
BEGIN
    IF NEW.kind = 'denied' THEN
        NEW.prev_hash := NULL;
        NEW.hash := NULL;
        RETURN NEW;
    END IF;
    SELECT e.hash INTO NEW.prev_hash
      FROM arbiter.session_events e
     WHERE e.session_id = NEW.session_id AND e.session_day = NEW.session_day
       AND e.kind <> 'denied'
     ORDER BY e.event_id DESC
     LIMIT 1;
    NEW.prev_hash := coalesce(NEW.prev_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    tools := int4send(cardinality(NEW.tools));
    FOREACH tool IN ARRAY NEW.tools LOOP
        tools := tools || arbiter.audit_text(tool);
    END LOOP;
    NEW.hash := sha256(
        NEW.prev_hash
        || uuid_send(NEW.event_key) || uuid_send(NEW.session_id) || uuid_send(NEW.agent_id)
        || arbiter.audit_text(NEW.kind)
        || tools
        || int8send(NEW.calls_made) || int8send(NEW.rate_window_calls)
        || arbiter.audit_text(NEW.status)
        || int8send(NEW.session_version)
        || arbiter.audit_micros(NEW.occurred_at) || arbiter.audit_micros(NEW.recorded_at)
        || uuid_send(NEW.instance_id));
    RETURN NEW;
END
$$;

-- Creates the partition of `day` unless it exists; true when it made one. A day whose rows
-- already sit in the default partition is left there (attaching would fail): the function
-- warns, and `inspect` reports the default partition's rows.
CREATE FUNCTION arbiter.create_event_partition(day date) RETURNS boolean
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
    EXECUTE format('CREATE TRIGGER session_events_append_only_truncate BEFORE TRUNCATE ON arbiter.%I '
                   'FOR EACH STATEMENT EXECUTE FUNCTION arbiter.session_events_refuse_change()', name);
    RETURN true;
END
$$;

-- Makes sure the partitions from yesterday to `days_ahead` days from today (UTC) exist;
-- returns how many it created. Safe to call from several processes at once.
CREATE FUNCTION arbiter.ensure_event_partitions(days_ahead integer DEFAULT 7) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    created integer := 0;
    day date;
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
    RETURN created;
END
$$;

COMMENT ON FUNCTION arbiter.ensure_event_partitions(integer) IS
    'Creates the daily partitions of arbiter.session_events from yesterday to days_ahead days ahead (UTC) that do not exist yet; returns how many it created.';

-- The existing rows: one partition per day that has events, then one copy.
CREATE TEMPORARY TABLE session_days AS
SELECT e.session_id,
       coalesce((s.created_at AT TIME ZONE 'UTC')::date,
                (min(e.occurred_at) AT TIME ZONE 'UTC')::date) AS session_day
  FROM arbiter.session_events_unpartitioned e
  LEFT JOIN arbiter.sessions s ON s.session_id = e.session_id
 GROUP BY e.session_id, s.created_at;

DO $$
BEGIN
    PERFORM arbiter.create_event_partition(day)
       FROM (SELECT DISTINCT session_day AS day FROM session_days) AS days;
END
$$;

INSERT INTO arbiter.session_events (
    event_id, event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
    status, session_version, occurred_at, recorded_at, instance_id, reason, prev_hash, hash,
    session_day)
SELECT e.event_id, e.event_key, e.session_id, e.agent_id, e.kind, e.tools, e.calls_made,
       e.rate_window_calls, e.status, e.session_version, e.occurred_at, e.recorded_at,
       e.instance_id, e.reason, e.prev_hash, e.hash, d.session_day
  FROM arbiter.session_events_unpartitioned e
  JOIN session_days d ON d.session_id = e.session_id;
DROP TABLE session_days;

DO $$
BEGIN
    PERFORM arbiter.ensure_event_partitions();
END
$$;

-- Only now: the copied rows keep the hashes they had.
CREATE TRIGGER session_events_chain
    BEFORE INSERT ON arbiter.session_events
    FOR EACH ROW EXECUTE FUNCTION arbiter.session_events_chain();
CREATE TRIGGER session_events_append_only
    BEFORE UPDATE OR DELETE ON arbiter.session_events
    FOR EACH ROW EXECUTE FUNCTION arbiter.session_events_refuse_change();
CREATE TRIGGER session_events_append_only_truncate
    BEFORE TRUNCATE ON arbiter.session_events
    FOR EACH STATEMENT EXECUTE FUNCTION arbiter.session_events_refuse_change();
CREATE TRIGGER session_events_append_only_truncate
    BEFORE TRUNCATE ON arbiter.session_events_default
    FOR EACH STATEMENT EXECUTE FUNCTION arbiter.session_events_refuse_change();

-- The views read the old table; they are made again, unchanged, over the new one.
DROP VIEW arbiter.session_utilization, arbiter.agent_daily_activity,
          arbiter.tool_daily_usage, arbiter.denials_by_reason;
-- Its row type goes with the old table; the trigger above computes the hash itself.
DROP FUNCTION arbiter.audit_event_hash(bytea, arbiter.session_events_unpartitioned);
DROP TABLE arbiter.session_events_unpartitioned;

-- The four views of migration 20261124000006, unchanged.
CREATE VIEW arbiter.session_utilization AS
SELECT s.session_id,
       s.agent_id,
       -- A session past its time limit is expired whether or not expire_due marked it.
       CASE WHEN s.status = 'active' AND s.expires_at <= now() THEN 'expired'
            ELSE s.status END                                  AS status,
       s.call_budget,
       s.calls_made,
       round(100.0 * s.calls_made / s.call_budget, 1)          AS budget_used_pct,
       s.calls_made >= s.call_budget                           AS budget_exhausted,
       s.created_at,
       ended.at                                                AS ended_at,
       ended.at - s.created_at                                 AS duration,
       coalesce(denied.count, 0)                               AS denials
  FROM arbiter.sessions s
  -- When it ended: a close at its event's time (or at the row's last change, for a close
  -- made with plain SQL, which writes no event); an expiry at its time limit; NULL while live.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN s.status = 'closed' THEN coalesce(
                     (SELECT min(e.occurred_at) FROM arbiter.session_events e
                       WHERE e.session_id = s.session_id AND e.kind = 'closed'),
                     s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended
  LEFT JOIN LATERAL (
      SELECT count(*) AS count FROM arbiter.session_events e
       WHERE e.session_id = s.session_id AND e.kind = 'denied'
  ) denied ON true;

COMMENT ON VIEW arbiter.session_utilization IS
    'One row per stored session: budget, calls made, percentage used, effective status (expired once past the time limit), when it ended, how long it ran, and how many calls were denied.';

CREATE VIEW arbiter.agent_daily_activity AS
SELECT e.agent_id,
       (e.occurred_at AT TIME ZONE 'UTC')::date                               AS day,
       count(*) FILTER (WHERE e.kind = 'created')                              AS sessions_opened,
       coalesce(sum(cardinality(e.tools))
                FILTER (WHERE e.kind IN ('call_allowed', 'batch_allowed')), 0) AS calls_allowed,
       count(*) FILTER (WHERE e.kind = 'denied')                               AS calls_denied,
       count(*) FILTER (WHERE e.reason = 'agent_mismatch')                     AS denied_agent_mismatch,
       count(*) FILTER (WHERE e.reason = 'closed')                             AS denied_closed,
       count(*) FILTER (WHERE e.reason = 'expired')                            AS denied_expired,
       count(*) FILTER (WHERE e.reason = 'budget')                             AS denied_budget,
       count(*) FILTER (WHERE e.reason = 'tool')                               AS denied_tool,
       count(*) FILTER (WHERE e.reason = 'rate')                               AS denied_rate,
       count(*) FILTER (WHERE e.reason = 'write_through')                      AS denied_write_through,
       count(*) FILTER (WHERE e.reason = 'invalid')                            AS denied_invalid
  FROM arbiter.session_events e
 GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date;

COMMENT ON VIEW arbiter.agent_daily_activity IS
    'One row per agent and UTC day with activity: sessions opened, calls allowed (one per tool), calls denied in all and by reason.';

CREATE VIEW arbiter.tool_daily_usage AS
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date                   AS day,
       e.agent_id,
       t.tool,
       count(*) FILTER (WHERE e.kind <> 'denied')                  AS calls_allowed,
       count(*) FILTER (WHERE e.kind = 'denied')                   AS calls_denied,
       count(DISTINCT e.session_id)                                AS sessions
  FROM arbiter.session_events e
 CROSS JOIN LATERAL unnest(e.tools) AS t(tool)
 WHERE e.kind IN ('call_allowed', 'batch_allowed', 'denied')
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, t.tool;

COMMENT ON VIEW arbiter.tool_daily_usage IS
    'One row per UTC day, agent and tool: calls allowed and requests denied that named the tool, and in how many sessions. Sum over agent_id for a tool''s whole day.';

CREATE VIEW arbiter.denials_by_reason AS
SELECT (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
       e.agent_id,
       e.reason,
       count(*)                                 AS denials,
       count(DISTINCT e.session_id)             AS sessions
  FROM arbiter.session_events e
 WHERE e.kind = 'denied'
 GROUP BY (e.occurred_at AT TIME ZONE 'UTC')::date, e.agent_id, e.reason;

COMMENT ON VIEW arbiter.denials_by_reason IS
    'One row per UTC day, agent and denial reason: denied requests and the sessions they were made on.';

-- The partitions of the audit trail: each one's day (NULL for the default partition) and
-- name, oldest first. `partitions list` and purge_before read it.
CREATE FUNCTION arbiter.event_partitions()
RETURNS TABLE (partition regclass, day date)
LANGUAGE sql STABLE AS $$
    SELECT c.oid::regclass,
           CASE WHEN c.relname ~ '^session_events_[0-9]{8}$'
                THEN to_date(right(c.relname, 8), 'YYYYMMDD') END
      FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'arbiter.session_events'::regclass
     ORDER BY 2 NULLS FIRST
$$;
