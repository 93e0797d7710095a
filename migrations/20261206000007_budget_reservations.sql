-- Reservations of shared budgets (migration 20261206000005): a call whose cost is known only
-- afterwards (tokens) is decided with an estimate, which is charged at once, and settled
-- later at its actual cost.
--
-- Reserving is a call: its event (kind call_allowed or batch_allowed) charges the estimate
-- to the writing process's share like any cost, and its event_key is the reservation's id.
-- The session's row lists its open reservations (reservation_ids, with the instants they
-- lapse), so two settlements of one reservation, in any processes, are decided one after
-- the other on the session's row: exactly one of them applies. arbiter.budget_reservations
-- keeps every reservation, written in the statements that write its session.
--
-- Settling writes an event of kind settled whose cost is the actual cost less the estimate
-- (negative when units are released), naming the share the estimate was charged to. The
-- units released are added to that share's credited, those above the estimate (an
-- overrun: the work was done, so it is charged in full, even past the limit) to its
-- overrun. Neither needs room nor a live share, so a settlement is never refused, and
-- neither writes a budget's row: the next grant of the tree counts them into each level's
-- allocated (arbiter.budget_share_count_settlements), under the tree's locks. So, per share,
-- used - credited + overrun is the sum of the costs of the events that name it.
--
-- A reservation not settled within its time to live is settled at its estimate: it lapses,
-- with nothing to count, and settling it afterwards is refused like a second settlement.
--
-- Grants share the last units fairly: each share records what its holder last asked for
-- (wanted, about two seconds of its use; 0 once it gave back its idle units), and a grant
-- gives at most the asker's part of what is left, in proportion to what it wants beside
-- what the tree's other live shares want, and no more than an equal part. So near the end
-- every holder runs out at about the same time, none holding units long after another was
-- refused (a process holds one share per lane of its group commit, so several ask).
--
-- Invariants added to those of migration 20261206000005, for every budget B and period P:
--   * allocated(B, P) is the sum, over the shares whose chain holds (B, P), of granted -
--     credited_counted + overrun_counted; credited <= used on every share.
--   * The units charged, net of releases, are at most the limit plus the overruns counted:
--     grants never pass the limit, and a release only ever gives back units an estimate
--     took.

ALTER TABLE arbiter.sessions
    ADD COLUMN reservation_ids    uuid[]        NOT NULL DEFAULT '{}',
    ADD COLUMN reservations_until timestamptz[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT sessions_reservations_paired
        CHECK (cardinality(reservation_ids) = cardinality(reservations_until)
               AND cardinality(reservation_ids) <= 64
               AND array_position(reservation_ids, NULL) IS NULL
               AND array_position(reservations_until, NULL) IS NULL);

COMMENT ON COLUMN arbiter.sessions.reservation_ids IS
    'The session''s open reservations (arbiter.budget_reservations), oldest first; reservations_until holds, at the same positions, when each lapses (settled at its estimate).';

CREATE TABLE arbiter.budget_reservations (
    reservation_id uuid        PRIMARY KEY,
    session_id     uuid        NOT NULL REFERENCES arbiter.sessions (session_id)
                               ON DELETE CASCADE,
    budget_id      text        NOT NULL REFERENCES arbiter.budgets (budget_id),
    share_id       uuid        NOT NULL REFERENCES arbiter.budget_shares (share_id),
    estimate       bigint      NOT NULL,
    reserved_at    timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    settled_at     timestamptz,
    charged        bigint,
    CONSTRAINT budget_reservations_amounts
        CHECK (estimate > 0 AND charged >= 0 AND expires_at > reserved_at
               AND (settled_at IS NULL) = (charged IS NULL))
);

CREATE INDEX budget_reservations_session ON arbiter.budget_reservations (session_id);
CREATE INDEX budget_reservations_open ON arbiter.budget_reservations (share_id)
    WHERE settled_at IS NULL;

COMMENT ON TABLE arbiter.budget_reservations IS
    'Every reservation of a shared budget: the estimate charged to share_id when it was made (the event whose event_key is reservation_id), and, once settled, the actual cost charged (charged). Open until settled_at, or until expires_at, when it lapses at its estimate.';

ALTER TABLE arbiter.budget_shares
    ADD COLUMN credited         bigint NOT NULL DEFAULT 0,
    ADD COLUMN overrun          bigint NOT NULL DEFAULT 0,
    ADD COLUMN credited_counted bigint NOT NULL DEFAULT 0,
    ADD COLUMN overrun_counted  bigint NOT NULL DEFAULT 0,
    ADD COLUMN wanted           bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT budget_shares_settlements
        CHECK (0 <= credited_counted AND credited_counted <= credited AND credited <= used
               AND 0 <= overrun_counted AND overrun_counted <= overrun);

COMMENT ON COLUMN arbiter.budget_shares.credited IS
    'Units of estimates charged to the share that settlements released (their events'' negative costs); not spendable by the holder, given back to the budget by the next grant of its tree (credited_counted).';
COMMENT ON COLUMN arbiter.budget_shares.overrun IS
    'Units settlements charged above the estimates charged to the share (their events'' positive costs), past what it was granted; counted into the budget by the next grant of its tree (overrun_counted).';

COMMENT ON COLUMN arbiter.budget_shares.wanted IS
    'The units the holder last asked for (about two seconds of its use), 0 once it gave back its idle units: the last units of a tree are granted in proportion to what its open shares want.';

-- The shares whose settlements a grant has yet to count: few, and read under the tree's lock.
CREATE INDEX budget_shares_uncounted ON arbiter.budget_shares ((chain[cardinality(chain)]))
    WHERE credited <> credited_counted OR overrun <> overrun_counted;

ALTER TABLE arbiter.session_events
    DROP CONSTRAINT session_events_kind_known,
    ADD CONSTRAINT session_events_kind_known CHECK (kind IN
        ('created', 'call_allowed', 'batch_allowed', 'closed', 'expired', 'reconciled',
         'denied', 'settled')),
    DROP CONSTRAINT session_events_cost_not_negative,
    ADD CONSTRAINT session_events_cost_not_negative CHECK (cost >= 0 OR kind = 'settled');

COMMENT ON COLUMN arbiter.session_events.cost IS
    'Allowed calls of a session with a shared budget: the units the call cost (a reservation''s estimate), charged to share_id. Settlements (kind settled): the actual cost less the estimate. NULL otherwise.';

-- Counts the settlements of `share` not yet counted into its periods' allocated: releases
-- give units back, overruns take them. The caller holds the locks of the share's tree.
CREATE FUNCTION arbiter.budget_share_count_settlements(share uuid) RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    s arbiter.budget_shares;
    change bigint;
BEGIN
    SELECT * INTO s FROM arbiter.budget_shares b WHERE b.share_id = share FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    change := (s.overrun - s.overrun_counted) - (s.credited - s.credited_counted);
    UPDATE arbiter.budget_periods p
       SET allocated = p.allocated + change
      FROM unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
     WHERE p.budget_id = c.budget_id AND p.period_start = c.period_start;
    UPDATE arbiter.budget_shares b
       SET credited_counted = s.credited, overrun_counted = s.overrun
     WHERE b.share_id = share;
    RETURN change;
END
$$;

-- As budget_charge(shares, units), with settlements: each of `shares` (distinct) is charged
-- `units` (allowed calls' costs: the share must be live), credited `credits` and charged
-- `overruns` (settlements: any share, live or not). In share order, so that two statements
-- lock the same shares in the same order.
CREATE FUNCTION arbiter.budget_charge(shares uuid[], units bigint[], credits bigint[],
                                      overruns bigint[]) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    charge record;
    charged integer := 0;
BEGIN
    FOR charge IN
        SELECT c.share_id, c.units, c.credits, c.overruns
          FROM unnest(shares, units, credits, overruns) AS c(share_id, units, credits, overruns)
         ORDER BY c.share_id
    LOOP
        IF charge.units < 0 OR charge.credits < 0 OR charge.overruns < 0 THEN
            RAISE EXCEPTION 'a charge of share % is negative', charge.share_id
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        UPDATE arbiter.budget_shares s
           SET used = s.used + charge.units,
               credited = s.credited + charge.credits,
               overrun = s.overrun + charge.overruns
         WHERE s.share_id = charge.share_id
           AND (charge.units = 0 OR (s.closed_at IS NULL AND s.lease_until > now()));
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

REVOKE EXECUTE ON FUNCTION arbiter.budget_charge(uuid[], bigint[], bigint[], bigint[])
    FROM PUBLIC;

-- budget_share_shrink of migration 20261206000005: a share giving back its idle units (or
-- closing) no longer wants any, so the tree's next grants do not save units for it.
CREATE OR REPLACE FUNCTION arbiter.budget_share_shrink(share uuid, keep bigint, close boolean)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    s arbiter.budget_shares;
    returned bigint;
BEGIN
    SELECT * INTO s FROM arbiter.budget_shares b
     WHERE b.share_id = share AND b.closed_at IS NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    returned := s.granted - CASE WHEN close THEN s.used ELSE greatest(s.used, keep) END;
    IF returned < 0 THEN
        returned := 0;
    END IF;
    UPDATE arbiter.budget_periods p
       SET allocated = p.allocated - returned
      FROM unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
     WHERE p.budget_id = c.budget_id AND p.period_start = c.period_start;
    UPDATE arbiter.budget_shares b
       SET granted = b.granted - returned,
           closed_at = CASE WHEN close THEN now() END,
           wanted = 0
     WHERE b.share_id = share;
    RETURN returned;
END
$$;

-- budget_grant of migration 20261206000005, counting the tree's settlements (after closing
-- its stale shares, before reading any level's room), and granting at most the asker's
-- part of what is left, in proportion to what it wants beside what the tree's other live
-- shares want (wanted): so when the last units are shared, every holder runs out at about
-- the same time, and none holds units long after another was refused.
CREATE OR REPLACE FUNCTION arbiter.budget_grant(share uuid, holder uuid, budget text, need bigint,
                                     want bigint, lease interval)
RETURNS TABLE (share_open boolean, added bigint, granted bigint, used bigint, room bigint,
               tightest text, valid_until timestamptz, lease_until timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    lineage text[];
    starts timestamptz[] := '{}';
    ends timestamptz;
    least_room bigint;
    tight text;
    level_room bigint;
    level record;
    existing arbiter.budget_shares;
    exists_already boolean;
    adding bigint;
    others_want bigint;
    others bigint;
    fair bigint;
    stale uuid;
    result arbiter.budget_shares;
BEGIN
    IF need < 0 OR want < 0 OR lease <= interval '0' THEN
        RAISE EXCEPTION 'need, want and lease must not be negative'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    lineage := arbiter.budget_lock_chain(budget);
    FOR stale IN
        SELECT b.share_id FROM arbiter.budget_shares b
         WHERE b.closed_at IS NULL
           AND b.chain[cardinality(b.chain)] = lineage[cardinality(lineage)]
           AND b.lease_until < now()
         ORDER BY b.share_id
    LOOP
        PERFORM arbiter.budget_share_shrink(stale, 0, true);
    END LOOP;
    FOR stale IN
        SELECT b.share_id FROM arbiter.budget_shares b
         WHERE (b.credited <> b.credited_counted OR b.overrun <> b.overrun_counted)
           AND b.chain[cardinality(b.chain)] = lineage[cardinality(lineage)]
         ORDER BY b.share_id
    LOOP
        PERFORM arbiter.budget_share_count_settlements(stale);
    END LOOP;
    FOR level IN
        SELECT c.ord, c.budget_id, b.unit_limit, bounds.period_start, bounds.period_end
          FROM unnest(lineage) WITH ORDINALITY AS c(budget_id, ord)
          JOIN arbiter.budgets b ON b.budget_id = c.budget_id
         CROSS JOIN LATERAL arbiter.budget_period_bounds(b.period, b.time_zone, now()) bounds
         ORDER BY c.ord
    LOOP
        starts := starts || level.period_start;
        IF level.period_end IS NOT NULL AND (ends IS NULL OR level.period_end < ends) THEN
            ends := level.period_end;
        END IF;
        INSERT INTO arbiter.budget_periods AS p (budget_id, period_start, period_end)
        VALUES (level.budget_id, level.period_start, level.period_end)
        ON CONFLICT (budget_id, period_start) DO NOTHING;
        SELECT level.unit_limit - p.allocated INTO level_room
          FROM arbiter.budget_periods p
         WHERE p.budget_id = level.budget_id AND p.period_start = level.period_start;
        IF least_room IS NULL OR level_room < least_room THEN
            least_room := level_room;
            tight := level.budget_id;
        END IF;
    END LOOP;
    least_room := greatest(least_room, 0);
    SELECT * INTO existing FROM arbiter.budget_shares b WHERE b.share_id = share FOR UPDATE;
    exists_already := FOUND;
    IF exists_already AND (existing.closed_at IS NOT NULL OR existing.holder <> holder
                           OR existing.budget_id <> budget OR existing.chain <> lineage
                           OR existing.period_starts <> starts) THEN
        RETURN QUERY SELECT false, 0::bigint, existing.granted, existing.used, least_room,
                            tight, existing.valid_until, existing.lease_until;
        RETURN;
    END IF;
    -- What the tree's other live shares want: the last units go to each in proportion.
    SELECT coalesce(sum(b.wanted), 0), count(*) FILTER (WHERE b.wanted > 0)
      INTO others_want, others
      FROM arbiter.budget_shares b
     WHERE b.closed_at IS NULL AND b.lease_until >= now() AND b.share_id <> share
       AND b.chain[cardinality(b.chain)] = lineage[cardinality(lineage)];
    fair := CASE WHEN want = 0 THEN 0
                 ELSE least(ceil(least_room::numeric * want / (want + others_want)),
                            ceil(least_room::numeric / (1 + others)))::bigint END;
    adding := CASE WHEN least_room < need THEN 0
                   ELSE least(least_room,
                              greatest(need, least(want, least_room / 2 + least_room % 2,
                                                   fair)))
              END;
    IF NOT exists_already AND adding = 0 THEN
        RETURN QUERY SELECT true, 0::bigint, 0::bigint, 0::bigint, least_room, tight, ends,
                            NULL::timestamptz;
        RETURN;
    END IF;
    UPDATE arbiter.budget_periods p
       SET allocated = p.allocated + adding
      FROM unnest(lineage, starts) AS c(budget_id, period_start)
     WHERE p.budget_id = c.budget_id AND p.period_start = c.period_start;
    INSERT INTO arbiter.budget_shares AS b
           (share_id, budget_id, holder, chain, period_starts, valid_until, granted,
            lease_until, wanted)
    VALUES (share, budget, holder, lineage, starts, ends, adding, now() + lease, want)
    ON CONFLICT (share_id) DO UPDATE
       SET granted = b.granted + EXCLUDED.granted, lease_until = EXCLUDED.lease_until,
           wanted = CASE WHEN EXCLUDED.wanted > 0 THEN EXCLUDED.wanted ELSE b.wanted END
    RETURNING b.* INTO result;
    RETURN QUERY SELECT true, adding, result.granted, result.used, least_room, tight,
                        result.valid_until, result.lease_until;
END
$$;

-- Per budget and period: used is now the units charged net of releases, open reservations
-- aside (reserved: their estimates); overrun, the units settlements charged above their
-- estimates (part of used).
CREATE OR REPLACE VIEW arbiter.budget_usage AS
SELECT p.budget_id, p.period_start, p.period_end, b.unit_limit, b.unit,
       (coalesce(u.used, 0) - coalesce(r.reserved, 0))::bigint AS used, p.allocated,
       coalesce(r.reserved, 0)::bigint AS reserved, coalesce(u.overrun, 0)::bigint AS overrun
  FROM arbiter.budget_periods p
  JOIN arbiter.budgets b USING (budget_id)
  LEFT JOIN (SELECT c.budget_id, c.period_start,
                    sum(s.used - s.credited + s.overrun) AS used, sum(s.overrun) AS overrun
               FROM arbiter.budget_shares s,
                    unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
              GROUP BY c.budget_id, c.period_start) u
         ON u.budget_id = p.budget_id AND u.period_start = p.period_start
  LEFT JOIN (SELECT c.budget_id, c.period_start, sum(o.estimate) AS reserved
               FROM arbiter.budget_reservations o
               JOIN arbiter.budget_shares s USING (share_id),
                    unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
              WHERE o.settled_at IS NULL AND o.expires_at > now()
              GROUP BY c.budget_id, c.period_start) r
         ON r.budget_id = p.budget_id AND r.period_start = p.period_start;

COMMENT ON VIEW arbiter.budget_usage IS
    'Per budget and period with shares: used (units charged, counting each descendant''s, net of what settlements released, open reservations aside), allocated (units granted to processes, spent or not), reserved (the estimates of open reservations) and overrun (units settlements charged above their estimates, part of used), with the budget''s current limit and unit.';
