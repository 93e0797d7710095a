-- Per-tool call limits in the audit trail (migration 20261201000005 put them in the
-- session row):
--   * an event that counted calls of limited tools carries each one's calls after it, in
--     two parallel arrays (limited_tools, tool_calls), and its hash covers them;
--   * agent_daily_activity gains denied_tool_budget, the calls denied by a tool's own
--     limit (reason tool_budget), which so far counted only in calls_denied;
--   * session_utilization builds tool_use only for a session with limits (same answers).
--
-- Which events carry counts: call_allowed and batch_allowed, for the limited tools among
-- their tools; reconciled, for every limited tool of the session (it records the whole
-- merged state, as its calls_made does). Every other event, every event of a session
-- without limits, and every event written before this migration has NULL in both, and
-- its hash is computed exactly as before: the encoding appends the counts only when there
-- are some, so no stored hash changes and the chains verify as they did.
--
-- Encoding of the counts (appended last, after a denial's reason): the number of limited
-- tools as int4, then for each, in the order stored (sorted by name, as the library writes
-- them), the name as length-prefixed UTF-8 and its calls as int8. Every field before it is
-- fixed-width or length-prefixed, so a row with counts never encodes like a row without.

-- Adding the check reads every stored event once, under the table's lock: the columns are
-- new and NULL, so it finds nothing to refuse. On 2,000,000 events (20 rolled-up days) the
-- whole migration took 0.7 s, 0.6 s of it this check.
ALTER TABLE arbiter.session_events
    ADD COLUMN limited_tools text[],
    ADD COLUMN tool_calls    bigint[];

ALTER TABLE arbiter.session_events
    ADD CONSTRAINT session_events_tool_calls_paired CHECK (
        (limited_tools IS NULL AND tool_calls IS NULL)
        OR (cardinality(limited_tools) > 0
            AND cardinality(limited_tools) = cardinality(tool_calls)
            AND array_position(limited_tools, NULL) IS NULL
            AND array_position(tool_calls, NULL) IS NULL));

COMMENT ON COLUMN arbiter.session_events.limited_tools IS
    'The tools with a call limit of their own that this event counted (call_allowed, batch_allowed) or every one of them (reconciled); tool_calls holds, at the same positions, each one''s calls after the event. NULL for every other event.';

-- The hash of one link, with the counts: the one place the encoding is written in SQL (the
-- library's `operator::chain::link_hash` is the independent implementation). It replaces
-- the function of migration 20261201000002, which the chain trigger below called.
CREATE FUNCTION arbiter.audit_link_hash(
    prev bytea, event_key uuid, session_id uuid, agent_id uuid, kind text, tools text[],
    calls_made bigint, rate_window_calls bigint, status text, session_version bigint,
    occurred_at timestamptz, recorded_at timestamptz, instance_id uuid, reason text,
    limited_tools text[], tool_calls bigint[])
RETURNS bytea
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    folded  bytea := int4send(cardinality(tools));
    counted bytea := ''::bytea;
    tool    text;
    i       integer;
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
        || counted);
END
$$;

-- The chain trigger of migration 20261201000003, hashing the counts too.
CREATE OR REPLACE FUNCTION arbiter.session_events_chain() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_bitmapscan = off
AS $$
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
        NEW.occurred_at, NEW.recorded_at, NEW.instance_id, NEW.reason,
        NEW.limited_tools, NEW.tool_calls);
    RETURN NEW;
END
$$;

DROP FUNCTION arbiter.audit_link_hash(bytea, uuid, uuid, uuid, text, text[], bigint, bigint,
                                      text, bigint, timestamptz, timestamptz, uuid, text);

-- Denials past a tool's own limit, per agent and day. A day's rollup takes them from the
-- day's denials by reason, which it has just counted (no second read of the events); the
-- days sealed so far are filled the same way, so the view's answers stay exactly the raw
-- events' answers.
ALTER TABLE arbiter.agent_day_rollup
    ADD COLUMN denied_tool_budget bigint NOT NULL DEFAULT 0;

UPDATE arbiter.agent_day_rollup r
   SET denied_tool_budget = d.denials
  FROM arbiter.denial_day_rollup d
 WHERE d.day = r.day AND d.agent_id = r.agent_id AND d.reason = 'tool_budget';

-- rollup_count_day of migration 20261201000004, with that step added.
CREATE OR REPLACE FUNCTION arbiter.rollup_count_day(rolled_day date) RETURNS bigint
LANGUAGE plpgsql
SET jit = off
-- purge_before, which calls this, turns nested loops off for its own statements; the
-- counts here are planned with the default (see migration 20261201000004).
SET enable_nestloop = on
AS $$
DECLARE
    day_start timestamptz := rolled_day::timestamp AT TIME ZONE 'UTC';
    day_end   timestamptz := (rolled_day + 1)::timestamp AT TIME ZONE 'UTC';
    counted   bigint;
BEGIN
    -- First: it summarizes the day's BRIN ranges, which the count below reads too.
    counted := arbiter.rollup_count_day_views(rolled_day);
    UPDATE arbiter.agent_day_rollup r
       SET denied_tool_budget = d.denials
      FROM arbiter.denial_day_rollup d
     WHERE r.day = rolled_day AND d.day = rolled_day
       AND d.agent_id = r.agent_id AND d.reason = 'tool_budget';
    DELETE FROM arbiter.session_day_rollup WHERE day = rolled_day;
    INSERT INTO arbiter.session_day_rollup (day, session_id, denials, closed_at)
    SELECT rolled_day, e.session_id,
           count(*) FILTER (WHERE e.kind = 'denied'),
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed')
      FROM arbiter.session_events e
     WHERE e.occurred_at >= day_start AND e.occurred_at < day_end
       AND e.kind IN ('denied', 'closed')
     GROUP BY e.session_id;
    RETURN counted;
END
$$;

-- agent_daily_activity of migration 20261201000003 with, last, denied_tool_budget.
CREATE OR REPLACE VIEW arbiter.agent_daily_activity AS
SELECT r.agent_id, r.day, r.sessions_opened, r.calls_allowed, r.calls_denied,
       r.denied_agent_mismatch, r.denied_closed, r.denied_expired, r.denied_budget,
       r.denied_tool, r.denied_rate, r.denied_write_through, r.denied_invalid,
       r.denied_tool_budget
  FROM arbiter.agent_day_rollup r
 WHERE r.day < (SELECT arbiter.rollup_horizon())
UNION ALL
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
       count(*) FILTER (WHERE e.reason = 'invalid')                            AS denied_invalid,
       count(*) FILTER (WHERE e.reason = 'tool_budget')                        AS denied_tool_budget
  FROM arbiter.session_events e
 WHERE e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
 GROUP BY e.agent_id, (e.occurred_at AT TIME ZONE 'UTC')::date;

-- session_utilization of migration 20261201000005, the same answers, with tool_use built
-- only for a session that has limits: the sub-select ran for every row, about a fifth of
-- the 30-day report's time on 20,000 sessions without limits (psql, 2,000,000 events).
CREATE OR REPLACE VIEW arbiter.session_utilization AS
WITH recent AS (
    SELECT e.session_id,
           count(*) FILTER (WHERE e.kind = 'denied')           AS denials,
           min(e.occurred_at) FILTER (WHERE e.kind = 'closed') AS closed_at
      FROM arbiter.session_events e
     WHERE e.kind IN ('denied', 'closed')
       AND e.occurred_at >= (SELECT arbiter.rollup_horizon_at())
     GROUP BY e.session_id
)
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
       coalesce(rolled.denials, 0) + coalesce(recent.denials, 0) AS denials,
       CASE WHEN cardinality(s.limited_tools) > 0 THEN
           (SELECT jsonb_object_agg(t.tool, jsonb_build_object('limit', t.lim, 'calls', t.used))
              FROM unnest(s.limited_tools, s.tool_limits, s.tool_calls) AS t(tool, lim, used))
       END                                                     AS tool_use
  FROM arbiter.sessions s
  LEFT JOIN LATERAL (
      SELECT sum(r.denials)::bigint AS denials, min(r.closed_at) AS closed_at
        FROM arbiter.session_day_rollup r
       WHERE r.session_id = s.session_id
         AND r.day < (SELECT arbiter.rollup_horizon())
  ) rolled ON true
  LEFT JOIN recent ON recent.session_id = s.session_id
  -- When it ended: a close at its event's time (or at the row's last change, for a close
  -- made with plain SQL, which writes no event); an expiry at its time limit; NULL while live.
  CROSS JOIN LATERAL (
      SELECT CASE
                 WHEN s.status = 'closed'
                     THEN coalesce(least(rolled.closed_at, recent.closed_at), s.updated_at)
                 WHEN s.status = 'expired' OR s.expires_at <= now() THEN s.expires_at
             END AS at
  ) ended;
