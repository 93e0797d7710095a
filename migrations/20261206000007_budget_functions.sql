-- Three functions of migrations 20261206000005 and 20261206000006, redefined.
--
-- budget_put: a budget's new terms take effect for the next decisions, not only for the
-- next grants: when a limit is lowered or a budget moves to another parent, every open
-- share holding units of it is closed, returning what it did not use. A process still holding such a
-- share finds out at its next write that charges it (arbiter.budget_charge refuses a
-- closed share, naming it in the error's DETAIL), decides that round again on a new share,
-- granted under the new terms, and drops what it had counted on the old one and not
-- written. Raising a limit closes nothing: the shares' units stay within it.

CREATE OR REPLACE FUNCTION arbiter.budget_put(budget text, new_parent text, new_limit bigint,
                                              new_period text, new_time_zone text,
                                              new_unit text)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    old arbiter.budgets;
    open_share uuid;
BEGIN
    -- Taken before the update, so two creates of one id are not both inserts; it also
    -- keeps every grant and release of every tree out until this commits.
    PERFORM pg_advisory_xact_lock(arbiter.budget_tree_lock_key());
    SELECT * INTO old FROM arbiter.budgets b WHERE b.budget_id = budget FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO arbiter.budgets (budget_id, parent_id, unit_limit, period, time_zone, unit)
        VALUES (budget, new_parent, new_limit, new_period, new_time_zone, new_unit);
        RETURN true;
    END IF;
    UPDATE arbiter.budgets b
       SET parent_id = new_parent, unit_limit = new_limit, period = new_period,
           time_zone = new_time_zone, unit = new_unit
     WHERE b.budget_id = budget;
    IF new_limit < old.unit_limit OR new_parent IS DISTINCT FROM old.parent_id THEN
        FOR open_share IN
            SELECT s.share_id FROM arbiter.budget_shares s
             WHERE s.closed_at IS NULL AND budget = ANY (s.chain)
             ORDER BY s.share_id
        LOOP
            PERFORM arbiter.budget_share_shrink(open_share, 0, true);
        END LOOP;
    END IF;
    RETURN false;
END
$$;

-- As in migration 20261206000006, with the refused share in the error's DETAIL.
CREATE OR REPLACE FUNCTION arbiter.budget_charge(shares uuid[], units bigint[]) RETURNS integer
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

-- budget_grant: half of what is left, rounded up, without passing bigint: a limit may be as
-- large as a bigint, and (room + 1) / 2 overflowed there.
-- Grants `holder` more units of `budget` for the current period, on `share` (made if it
-- does not exist; it must be the holder's, open and of the current periods, else nothing is
-- granted and `share_open` is false): none if fewer than `need` are left at some level,
-- else at least `need`, up to `want` but no more than half of what is left (so the last
-- units are spread among the processes that ask, not stranded in one), and never past
-- what is left. First closes the tree's shares whose lease is over (their holders stopped
-- renewing), returning their unused units; a share whose period is over is its holder's to
-- close, once its calls of that period are written. Renews the share's lease to
-- now + `lease`.
-- `room` is what was left before this grant at the level with least, `tightest` that level.
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
    adding := CASE WHEN least_room < need THEN 0
                   ELSE least(least_room,
                              greatest(need, least(want, least_room / 2 + least_room % 2)))
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
            lease_until)
    VALUES (share, budget, holder, lineage, starts, ends, adding, now() + lease)
    ON CONFLICT (share_id) DO UPDATE
       SET granted = b.granted + EXCLUDED.granted, lease_until = EXCLUDED.lease_until
    RETURNING b.* INTO result;
    RETURN QUERY SELECT true, adding, result.granted, result.used, least_room, tight,
                        result.valid_until, result.lease_until;
END
$$;
