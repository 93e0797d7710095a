-- Budgets shared by many sessions: the terms (arbiter.budgets, a tree), the units each
-- process holds of them (arbiter.budget_shares, escrow) and each period's allocation
-- (arbiter.budget_periods).
--
-- Escrow, not a counter: no call writes a budget's row. A process takes a share of what is
-- left of a budget (and of each of its ancestors) for the current period in one short
-- transaction, arbiter.budget_grant, spends it on its own and writes what it spent to its
-- own share's row, and gives back what it did not spend, arbiter.budget_share_release.
-- A share whose holder stopped renewing its lease is reclaimed by the next grant in its
-- tree: exactly granted - used comes back, since used is durable.
--
-- Invariants, for every budget B and every period P of it:
--   * allocated(B, P) is the sum of granted over the shares whose chain holds (B, P); a
--     closed share's granted equals its used. Only budget_grant, budget_share_release and
--     budget_put (closing shares when a limit is lowered) change either, each under the
--     locks below, in the same transaction.
--   * budget_grant never takes allocated(B, P) past B's limit, so the units spent (the sum
--     of used, at most the sum of granted) never pass the limit either.
--   * used <= granted on every share (a CHECK), whoever writes it.
--
-- Locks, in this order: the budget tree's advisory lock (budget_tree_lock_key): shared by a
-- grant or a release, exclusive by a change of a budget's terms; then the rows of
-- arbiter.budgets of the share's chain, root first (FOR NO KEY UPDATE); then period rows
-- and share rows. Every
-- grant and release of one tree takes its root's row first, so they run one at a time per
-- tree; a call never takes any of these locks.

CREATE TABLE arbiter.budgets (
    budget_id   text        PRIMARY KEY,
    parent_id   text        REFERENCES arbiter.budgets (budget_id),
    unit_limit  bigint      NOT NULL,
    period      text        NOT NULL DEFAULT 'none',
    time_zone   text        NOT NULL DEFAULT 'UTC',
    unit        text        NOT NULL DEFAULT 'calls',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT budgets_id_alphabet CHECK (budget_id ~ '^[A-Za-z0-9._:/-]{1,128}$'),
    CONSTRAINT budgets_limit_not_negative CHECK (unit_limit >= 0),
    CONSTRAINT budgets_period_known CHECK (period IN ('none', 'day', 'month')),
    CONSTRAINT budgets_unit_named CHECK (unit ~ '^[A-Za-z0-9_.:/-]{1,32}$'),
    CONSTRAINT budgets_not_own_parent CHECK (parent_id IS DISTINCT FROM budget_id)
);

CREATE INDEX budgets_parent ON arbiter.budgets (parent_id) WHERE parent_id IS NOT NULL;

COMMENT ON TABLE arbiter.budgets IS
    'Budgets shared by sessions: unit_limit units of unit per period (none, day or month, starting at local midnight in time_zone). A charge to a budget is a charge to each of its ancestors (parent_id). At most 8 levels; no cycle.';

-- The key of the advisory lock that orders changes of the tree against grants.
CREATE FUNCTION arbiter.budget_tree_lock_key() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$ SELECT hashtext('arbiter.budgets')::bigint $$;

-- Deepest a tree may be: each level is a row locked by every grant.
CREATE FUNCTION arbiter.budget_max_depth() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$ SELECT 8 $$;

-- The terms a CHECK cannot judge: the time zone is one PostgreSQL knows, the parent leaves
-- the tree acyclic and at most budget_max_depth() deep, and an existing budget keeps its
-- period and time zone (its past periods would otherwise not be the ones its usage was
-- counted in). Changes of the tree run one at a time.
CREATE FUNCTION arbiter.budgets_check_terms() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    above integer;
    below integer;
BEGIN
    PERFORM pg_advisory_xact_lock(arbiter.budget_tree_lock_key());
    IF TG_OP = 'UPDATE' AND (NEW.budget_id <> OLD.budget_id OR NEW.period <> OLD.period
                             OR NEW.time_zone <> OLD.time_zone) THEN
        RAISE EXCEPTION 'the id, period and time zone of budget % cannot change', OLD.budget_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budgets_period_fixed',
                  TABLE = 'budgets', SCHEMA = 'arbiter';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.time_zone) THEN
        RAISE EXCEPTION 'unknown time zone for budget %', NEW.budget_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budgets_time_zone_known',
                  TABLE = 'budgets', SCHEMA = 'arbiter';
    END IF;
    IF NEW.parent_id IS NULL THEN
        above := 0;
    ELSE
        -- The existing tree is acyclic, so this walk ends; reaching the budget itself means
        -- the new parent is one of its descendants.
        WITH RECURSIVE up(budget_id, parent_id, depth) AS (
            SELECT b.budget_id, b.parent_id, 1
              FROM arbiter.budgets b WHERE b.budget_id = NEW.parent_id
            UNION ALL
            SELECT b.budget_id, b.parent_id, up.depth + 1
              FROM arbiter.budgets b JOIN up ON b.budget_id = up.parent_id
             WHERE up.budget_id <> NEW.budget_id
        )
        SELECT CASE WHEN bool_or(up.budget_id = NEW.budget_id) THEN NULL ELSE max(up.depth) END
          INTO above FROM up;
        IF above IS NULL THEN
            RAISE EXCEPTION 'the parent of budget % would make a cycle', NEW.budget_id
                USING ERRCODE = 'check_violation', CONSTRAINT = 'budgets_acyclic',
                      TABLE = 'budgets', SCHEMA = 'arbiter';
        END IF;
    END IF;
    WITH RECURSIVE down(budget_id, depth) AS (
        SELECT b.budget_id, 1 FROM arbiter.budgets b WHERE b.parent_id = NEW.budget_id
        UNION ALL
        SELECT b.budget_id, down.depth + 1
          FROM arbiter.budgets b JOIN down ON b.parent_id = down.budget_id
    )
    SELECT coalesce(max(depth), 0) INTO below FROM down;
    IF above + 1 + below > arbiter.budget_max_depth() THEN
        RAISE EXCEPTION 'budget % would make a tree deeper than % levels', NEW.budget_id,
                        arbiter.budget_max_depth()
            USING ERRCODE = 'check_violation', CONSTRAINT = 'budgets_depth',
                  TABLE = 'budgets', SCHEMA = 'arbiter';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER budgets_check_terms
    BEFORE INSERT OR UPDATE ON arbiter.budgets
    FOR EACH ROW EXECUTE FUNCTION arbiter.budgets_check_terms();

-- Budgets are kept: their periods are reported, and sessions name them.
CREATE FUNCTION arbiter.budgets_refuse_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'budgets are never deleted'
        USING ERRCODE = 'check_violation', CONSTRAINT = 'budgets_kept',
              TABLE = 'budgets', SCHEMA = 'arbiter';
END
$$;

CREATE TRIGGER budgets_kept
    BEFORE DELETE ON arbiter.budgets
    FOR EACH ROW EXECUTE FUNCTION arbiter.budgets_refuse_delete();

CREATE TRIGGER budgets_kept_truncate
    BEFORE TRUNCATE ON arbiter.budgets
    FOR EACH STATEMENT EXECUTE FUNCTION arbiter.budgets_refuse_delete();

-- Creates `budget` with these terms, or replaces the terms of the existing one; true when
-- it created it. The checks of arbiter.budgets and budgets_check_terms apply. New terms
-- take effect for the next decisions, not only for the next grants: when a limit is
-- lowered or a budget moves to another parent, every open share holding units of it is
-- closed, returning what it did not use. A process still holding such a share finds out
-- at its next write that charges it (arbiter.budget_charge refuses a closed share) and
-- decides that round again on a new share, granted under the new terms. Raising a limit
-- closes nothing: the shares' units stay within it.
CREATE FUNCTION arbiter.budget_put(budget text, new_parent text, new_limit bigint,
                                   new_period text, new_time_zone text, new_unit text)
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

-- The period of `period` in `time_zone` that holds `at`: it starts at local midnight (of
-- the day, or of the month's first day) and ends at the next, whatever the offset does in
-- between. Period 'none' is one period, from the epoch, that never ends (period_end NULL).
CREATE FUNCTION arbiter.budget_period_bounds(period text, time_zone text, at timestamptz,
                                            OUT period_start timestamptz,
                                            OUT period_end timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
    SELECT CASE period WHEN 'none' THEN 'epoch'::timestamptz
                       ELSE date_trunc(period, at, time_zone) END,
           CASE period WHEN 'none' THEN NULL
                       ELSE ((date_trunc(period, at, time_zone) AT TIME ZONE time_zone)
                             + ('1 ' || period)::interval) AT TIME ZONE time_zone END
$$;

CREATE TABLE arbiter.budget_periods (
    budget_id    text        NOT NULL REFERENCES arbiter.budgets (budget_id),
    period_start timestamptz NOT NULL,
    period_end   timestamptz,
    allocated    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (budget_id, period_start),
    CONSTRAINT budget_periods_allocated_not_negative CHECK (allocated >= 0)
);

COMMENT ON TABLE arbiter.budget_periods IS
    'One row per budget and period with shares: allocated is the sum of granted over the shares that hold units of it (a closed share holds its used). Written by arbiter.budget_grant and arbiter.budget_share_release only.';

CREATE TABLE arbiter.budget_shares (
    share_id      uuid          PRIMARY KEY,
    budget_id     text          NOT NULL REFERENCES arbiter.budgets (budget_id),
    holder        uuid          NOT NULL,
    chain         text[]        NOT NULL,
    period_starts timestamptz[] NOT NULL,
    valid_until   timestamptz,
    granted       bigint        NOT NULL,
    used          bigint        NOT NULL DEFAULT 0,
    lease_until   timestamptz   NOT NULL,
    created_at    timestamptz   NOT NULL DEFAULT now(),
    closed_at     timestamptz,
    CONSTRAINT budget_shares_used_within_granted CHECK (0 <= used AND used <= granted),
    CONSTRAINT budget_shares_chain_matches
        CHECK (cardinality(chain) BETWEEN 1 AND 8
               AND cardinality(chain) = cardinality(period_starts)
               AND chain[1] = budget_id)
);

-- The open shares of a tree, which a grant may reclaim: few rows (one per process, budget
-- and period), read under the tree's root lock.
CREATE INDEX budget_shares_open ON arbiter.budget_shares ((chain[cardinality(chain)]))
    WHERE closed_at IS NULL;

COMMENT ON TABLE arbiter.budget_shares IS
    'Units of a budget held by one process (holder: its store instance id) for one period of each budget of chain (the budget drawn on, then its ancestors, with period_starts at the same positions): granted by arbiter.budget_grant, used as the holder spends them. For calls decided before valid_until (the first end among those periods; NULL: never). The holder renews lease_until; once it has passed, any grant of the tree closes the share, returning granted - used.';

-- Closes `share`, returning what it does not use, or only shrinks it to `keep` (at least
-- its used) when `close` is false. The caller holds the locks of the share's tree.
CREATE FUNCTION arbiter.budget_share_shrink(share uuid, keep bigint, close boolean)
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
           closed_at = CASE WHEN close THEN now() END
     WHERE b.share_id = share;
    RETURN returned;
END
$$;

-- Takes the locks of the tree of `budget` (see the header) and returns its chain, the
-- budget first, root last.
CREATE FUNCTION arbiter.budget_lock_chain(budget text) RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    chain text[];
BEGIN
    PERFORM pg_advisory_xact_lock_shared(arbiter.budget_tree_lock_key());
    WITH RECURSIVE up(budget_id, parent_id, depth) AS (
        SELECT b.budget_id, b.parent_id, 1 FROM arbiter.budgets b WHERE b.budget_id = budget
        UNION ALL
        SELECT b.budget_id, b.parent_id, up.depth + 1
          FROM arbiter.budgets b JOIN up ON b.budget_id = up.parent_id
    )
    SELECT array_agg(up.budget_id ORDER BY up.depth) INTO chain FROM up;
    IF chain IS NULL THEN
        RAISE EXCEPTION 'no budget %', budget
            USING ERRCODE = 'no_data_found';
    END IF;
    FOR i IN REVERSE cardinality(chain)..1 LOOP
        PERFORM 1 FROM arbiter.budgets b WHERE b.budget_id = chain[i] FOR NO KEY UPDATE;
    END LOOP;
    RETURN chain;
END
$$;

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
CREATE FUNCTION arbiter.budget_grant(share uuid, holder uuid, budget text, need bigint,
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

-- Gives back the units of `share` its holder will not use: all but its used when `close`
-- (the share ends), else all but `keep` (what the holder has spent or is spending; never
-- below the used it wrote). Returns how many came back. Nothing for a closed share.
CREATE FUNCTION arbiter.budget_share_release(share uuid, keep bigint, close boolean)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, arbiter, pg_temp
AS $$
DECLARE
    drawn_on text;
BEGIN
    SELECT b.budget_id INTO drawn_on FROM arbiter.budget_shares b WHERE b.share_id = share;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- The share's own chain, not the budget's current one: it holds units of those rows.
    PERFORM arbiter.budget_lock_chain(drawn_on);
    RETURN arbiter.budget_share_shrink(share, keep, close);
END
$$;

-- Per budget and period: the units spent (the sum of used over the shares holding units of
-- it) and held by processes (allocated: granted, spent or not).
CREATE VIEW arbiter.budget_usage AS
SELECT p.budget_id, p.period_start, p.period_end, b.unit_limit, b.unit,
       coalesce(u.used, 0)::bigint AS used, p.allocated
  FROM arbiter.budget_periods p
  JOIN arbiter.budgets b USING (budget_id)
  LEFT JOIN (SELECT c.budget_id, c.period_start, sum(s.used) AS used
               FROM arbiter.budget_shares s,
                    unnest(s.chain, s.period_starts) AS c(budget_id, period_start)
              GROUP BY c.budget_id, c.period_start) u
         ON u.budget_id = p.budget_id AND u.period_start = p.period_start;

COMMENT ON VIEW arbiter.budget_usage IS
    'Per budget and period with shares: used (units spent, counting each descendant''s) and allocated (units granted to processes, spent or not), with the budget''s current limit and unit.';

-- The functions that write budgets and shares run with their owner's rights; only roles
-- granted them may call them (the README lists the gateway role's grants).
REVOKE EXECUTE ON FUNCTION arbiter.budget_put(text, text, bigint, text, text, text),
                           arbiter.budget_grant(uuid, uuid, text, bigint, bigint, interval),
                           arbiter.budget_share_release(uuid, bigint, boolean)
    FROM PUBLIC;
