//! [`PgStorage`]: sessions in PostgreSQL (schema `arbiter`, see `migrations/`).
//!
//! # Invariant: one statement per change
//! Every state change is ONE statement: the row update (or insert) and its audit events are
//! data-modifying CTEs of the same statement, so they commit or fail together, and the
//! events are written only when the versioned `WHERE version = $expected` matched.
//!
//! # Invariant: an optimistic write never waits for a lock
//! [`Storage::update`] and [`Storage::update_many`] skip a row another transaction holds
//! (`FOR UPDATE SKIP LOCKED`) and report it as a conflict, like a row that changed. So a
//! session stalled elsewhere holds up no group commit, and batches cannot deadlock. The
//! caller of a conflict decides again through [`Storage::update_locked`], the one write
//! that waits: it reads the row `FOR UPDATE` and writes it in one transaction (its own
//! lock does not make it skip its row).

mod batch;
mod budgets;
mod change_feed;
mod rows;
mod trail;
pub(crate) mod transaction;
pub(crate) mod upkeep;

pub(crate) use self::trail::TrailTotals;

use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use uuid::Uuid;

use self::change_feed::{DEFAULT_LISTENER_CHECK, PgChangeFeed};
use self::rows::{DenialJson, EventJson, SessionRow, to_bigint, tool_calls};
use super::{
    BatchUpdate, CapOutcome, ChangeFeed, LockWait, LockedUpdate, ShareGrant, ShareRequest, Storage,
    StoredReservation, UpdateOutcome, Version, Versioned,
};
use crate::audit::{AuditEvent, Denial};
use crate::budget::{BudgetId, BudgetTerms, BudgetUsage, BudgetWrite};
use crate::error::StorageError;
use crate::model::TaskSession;

/// PostgreSQL storage. Cheap to clone (the pool is shared).
///
/// Run [`crate::MIGRATOR`] (or [`crate::migrate`]) on the database first.
#[derive(Debug, Clone)]
pub struct PgStorage {
    pool: PgPool,
    /// How often the change feed checks an idle listening connection.
    listener_check: Duration,
}

const MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The library's transactions send their statements back to back, so it never waits this
/// long itself.
const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// `tcp_keepalives_idle`, `_interval` and `_count`.
const TCP_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(10), Duration::from_secs(5), 3);

impl PgStorage {
    /// Storage over `pool`.
    ///
    /// Build the pool from [`PgStorage::pool_options`] or give it a short
    /// `acquire_timeout` yourself: sqlx's default of 30 s would stall every write-through
    /// while PostgreSQL is unreachable.
    pub fn new(pool: PgPool) -> Self {
        PgStorage {
            pool,
            listener_check: DEFAULT_LISTENER_CHECK,
        }
    }

    /// How often the change feed makes a round trip on its listening connection when no
    /// notification arrived (default 10 s); a round trip that does not answer within the
    /// same time means the connection is half-open (the network dropped it without telling
    /// either side), and the feed reconnects and reports a reset.
    #[must_use]
    pub fn listener_check(mut self, every: Duration) -> Self {
        self.listener_check = every;
        self
    }

    /// Pool options suited to the write-through hot path: 16 connections and an acquire
    /// timeout of 2 s (sqlx's default is 30 s). Adjust before connecting.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
    }

    /// Connects to `url` with [`PgStorage::pool_options`] and these server-side settings
    /// on every connection, so that PostgreSQL itself ends what a stalled or vanished
    /// client would otherwise hold:
    /// * `statement_timeout` 5 s: a statement stuck on a lock;
    /// * `idle_in_transaction_session_timeout` 10 s: a row lock or an agent's advisory lock
    ///   held by a client cut off mid-transaction (a partition, a frozen process);
    /// * `tcp_keepalives_idle` 10 s, `_interval` 5 s, `_count` 3: an idle connection whose
    ///   client vanished without closing it is noticed within about 25 s, instead of the
    ///   kernel's default of over two hours;
    /// * `plan_cache_mode` `force_custom_plan`: every write is planned for its own
    ///   parameters. PostgreSQL otherwise switches a prepared statement to a generic plan
    ///   after five executions, chosen while the tables were small and blind to a batch's
    ///   size, and keeps it as they grow: a long-running gateway's writes became several
    ///   times slower (`tests/failure.rs`, `connect_plans_each_write_for_its_own_parameters`).
    ///   Planning each statement costs microseconds; a commit costs milliseconds.
    /// * `jit` `off`: the JIT compiler starts above a plan cost that statements over the
    ///   partitioned audit trail reach while taking milliseconds, and then spends up to
    ///   seconds compiling (the upkeep's rollups and reports measured it).
    ///
    /// A deployment that builds its own pool should set the same (in the URL's `options` or
    /// with [`PgConnectOptions::options`]).
    ///
    /// # Errors
    /// The URL does not parse, or PostgreSQL cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        Self::connect_with(url, Self::pool_options()).await
    }

    /// [`PgStorage::connect`] with other pool options (a pool size, an acquire timeout);
    /// the same server-side settings are added to every connection.
    ///
    /// # Errors
    /// The URL does not parse, or PostgreSQL cannot be reached.
    pub async fn connect_with(url: &str, pool: PgPoolOptions) -> Result<Self, sqlx::Error> {
        let millis = |d: Duration| d.as_millis().to_string();
        let (keepalive_idle, keepalive_interval, keepalive_count) = TCP_KEEPALIVE;
        let options = PgConnectOptions::from_str(url)?.options([
            ("statement_timeout", millis(STATEMENT_TIMEOUT)),
            (
                "idle_in_transaction_session_timeout",
                millis(IDLE_IN_TRANSACTION_TIMEOUT),
            ),
            ("tcp_keepalives_idle", keepalive_idle.as_secs().to_string()),
            (
                "tcp_keepalives_interval",
                keepalive_interval.as_secs().to_string(),
            ),
            ("tcp_keepalives_count", keepalive_count.to_string()),
            // See the settings' entries above.
            ("plan_cache_mode", "force_custom_plan".to_owned()),
            ("jit", "off".to_owned()),
        ]);
        Ok(PgStorage::new(pool.connect_with(options).await?))
    }

    /// The pool this storage uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether every embedded migration ([`crate::MIGRATOR`]) has been applied to the
    /// database: `false` when one is missing or none ever ran. One short query on the pool.
    ///
    /// Migrations record themselves in `public._sqlx_migrations`, where sqlx creates its
    /// table under PostgreSQL's default `search_path`; the query names it in full, so an
    /// object of that name elsewhere on a caller's `search_path` cannot stand in for it.
    ///
    /// # Errors
    /// The query failed (PostgreSQL unreachable, or a statement timeout).
    pub async fn schema_is_current(&self) -> Result<bool, StorageError> {
        let newest = crate::MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let applied = sqlx::query_scalar!(
            "SELECT max(version) AS applied FROM public._sqlx_migrations WHERE success"
        )
        .fetch_one(&self.pool)
        .await;
        match applied {
            Ok(applied) => Ok(applied.is_some_and(|version| version >= newest)),
            Err(err) if is_undefined_table(&err) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Creates budget `id` with `terms`, or replaces the terms of the existing one
    /// (its period and time zone must stay the same). The store's
    /// [`put_budget`](crate::SessionStore::put_budget) checks the terms first.
    ///
    /// # Errors
    /// [`StorageError::Constraint`] when the schema refuses the terms (named after the
    /// check: `budgets_acyclic`, `budgets_depth`, `budgets_time_zone_known`,
    /// `budgets_period_fixed`, `budgets_parent_id_fkey`, …); any other failure of the
    /// statement.
    pub async fn put_budget(
        &self,
        id: &BudgetId,
        terms: &BudgetTerms,
    ) -> Result<BudgetWrite, StorageError> {
        budgets::put(&self.pool, id, terms).await
    }

    /// Every budget with its current period's usage, ordered by id; only `id`'s (none if it
    /// does not exist) when given.
    ///
    /// # Errors
    /// The query failed, or a row does not decode.
    pub async fn budget_usage(
        &self,
        id: Option<&BudgetId>,
    ) -> Result<Vec<BudgetUsage>, StorageError> {
        budgets::usage(&self.pool, id).await
    }

    /// The totals of session `session_id`'s audit trail (`created_at` names its partition).
    pub(crate) async fn trail_totals(
        &self,
        session_id: Uuid,
        created_at: DateTime<Utc>,
    ) -> Result<TrailTotals, StorageError> {
        trail::totals(&self.pool, session_id, created_at).await
    }
}

/// Whether `err` is PostgreSQL's "undefined table" (42P01).
fn is_undefined_table(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| code == "42P01")
}

/// The advisory-lock key that serializes capped creates of one agent. Folding the UUID
/// may collide for two agents; a collision only makes their creates wait on each other.
fn agent_lock_key(agent_id: Uuid) -> i64 {
    let (high, low) = agent_id.as_u64_pair();
    i64::from_ne_bytes((high ^ low).to_ne_bytes())
}

/// Whether a load locks the row until the end of its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowLock {
    None,
    ForUpdate,
    /// `FOR UPDATE NOWAIT`: fails with `lock_not_available` if another transaction holds it.
    ForUpdateNoWait,
}

/// Whether `err` is PostgreSQL's `lock_not_available` (55P03), the answer of `NOWAIT` to a
/// row another transaction holds.
fn lock_not_available(err: &StorageError) -> bool {
    let StorageError::Transient(source) = err else {
        return false;
    };
    source
        .downcast_ref::<sqlx::Error>()
        .and_then(sqlx::Error::as_database_error)
        .and_then(|db| db.code())
        .is_some_and(|code| code == "55P03")
}

impl PgStorage {
    async fn load_with(
        executor: impl sqlx::PgExecutor<'_>,
        session_id: Uuid,
        lock: RowLock,
    ) -> Result<Option<Versioned>, StorageError> {
        // One statement per lock mode: the macros check literal SQL only.
        let row = match lock {
            RowLock::None => {
                sqlx::query_file_as!(SessionRow, "src/storage/postgres/sql/load.sql", session_id)
                    .fetch_optional(executor)
                    .await?
            }
            RowLock::ForUpdate => {
                sqlx::query_file_as!(
                    SessionRow,
                    "src/storage/postgres/sql/load_for_update.sql",
                    session_id
                )
                .fetch_optional(executor)
                .await?
            }
            RowLock::ForUpdateNoWait => {
                sqlx::query_file_as!(
                    SessionRow,
                    "src/storage/postgres/sql/load_for_update_nowait.sql",
                    session_id
                )
                .fetch_optional(executor)
                .await?
            }
        };
        row.map(Versioned::try_from).transpose()
    }

    async fn count_live_with(
        executor: impl sqlx::PgExecutor<'_>,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        let live =
            sqlx::query_file_scalar!("src/storage/postgres/sql/count_live.sql", agent_id, now)
                .fetch_one(executor)
                .await?;
        // count(*) is never negative.
        Ok(u64::try_from(live).unwrap_or(0))
    }

    async fn update_with(
        executor: impl sqlx::PgExecutor<'_>,
        s: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        let events: Vec<EventJson<'_>> = events.iter().map(EventJson::from).collect();
        let reservation_ids: Vec<Uuid> = s.reservations.iter().map(|r| r.reservation_id).collect();
        let reservations_until: Vec<DateTime<Utc>> =
            s.reservations.iter().map(|r| r.expires_at).collect();
        let version = sqlx::query_file_scalar!(
            "src/storage/postgres/sql/update.sql",
            s.session_id,
            expected,
            to_bigint(s.calls_made),
            s.rate_window_started_at,
            to_bigint(s.rate_window_calls),
            s.status.as_str(),
            Json(&events) as _,
            &tool_calls(s),
            &reservation_ids,
            &reservations_until,
        )
        .fetch_optional(executor)
        .await?;
        Ok(match version {
            Some(version) => UpdateOutcome::Applied(version),
            None => UpdateOutcome::Conflict,
        })
    }

    async fn insert_with(
        executor: impl sqlx::PgExecutor<'_>,
        s: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        let limited_tools: Vec<&str> = s.tool_limits.iter().map(|l| &*l.tool).collect();
        let limits: Vec<i64> = s.tool_limits.iter().map(|l| to_bigint(l.limit)).collect();
        let cost_tools: Vec<&str> = s.tool_costs.iter().map(|c| &*c.tool).collect();
        let costs: Vec<i64> = s.tool_costs.iter().map(|c| to_bigint(c.cost)).collect();
        let version = sqlx::query_file_scalar!(
            "src/storage/postgres/sql/insert.sql",
            s.session_id,
            s.agent_id,
            &s.delegation_chain_snapshot[..],
            &*s.declared_intent,
            &s.authorized_tools[..],
            &s.authorized_credentials[..],
            to_bigint(s.call_budget),
            to_bigint(s.calls_made),
            s.rate_limit_per_minute.map(to_bigint),
            to_bigint(s.rate_limit_window_secs),
            s.rate_window_started_at,
            to_bigint(s.rate_window_calls),
            s.data_sensitivity_ceiling.as_str(),
            s.status.as_str(),
            s.created_at,
            s.expires_at,
            event.kind.as_str(),
            event.occurred_at,
            event.instance_id,
            event.key,
            &limited_tools as &[&str],
            &limits,
            &tool_calls(s),
            s.budget_id.as_ref().map(BudgetId::as_str),
            &cost_tools as &[&str],
            &costs,
            s.token_digest.as_ref().map(<[u8; 32]>::as_slice),
        )
        .fetch_one(executor)
        .await?;
        Ok(version)
    }
}

impl Storage for PgStorage {
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        Some(Box::new(
            PgChangeFeed::new(self.pool.clone()).check_every(self.listener_check),
        ))
    }

    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        Self::load_with(&self.pool, session_id, RowLock::None).await
    }

    async fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        Self::insert_with(&self.pool, session, event).await
    }

    async fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        // The transaction-scoped advisory lock makes count-then-insert atomic for this agent
        // across every process; it is released by the commit (or by the rollback when the
        // transaction is dropped on an error or a cancelled future).
        let mut tx = transaction::begin(&self.pool).await?;
        sqlx::query!(
            "SELECT pg_advisory_xact_lock($1)",
            agent_lock_key(session.agent_id)
        )
        .fetch_one(&mut *tx)
        .await?;
        let current = Self::count_live_with(&mut *tx, session.agent_id, now).await?;
        if current >= max {
            return Ok(CapOutcome::AtCap { current });
        }
        let version = Self::insert_with(&mut *tx, session, event).await?;
        tx.commit().await?;
        Ok(CapOutcome::Created(version))
    }

    /// The upkeep (`upkeep::run`): the audit trail's partitions ahead, then the rollups.
    async fn maintain(&self) -> Result<(), StorageError> {
        upkeep::run(&self.pool).await
    }

    async fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        Self::update_with(&self.pool, session, expected, events).await
    }

    fn batches_writes(&self) -> bool {
        true
    }

    async fn update_many(
        &self,
        batch: &[BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        if let [alone] = batch {
            return Ok(vec![
                Self::update_with(&self.pool, alone.session, alone.expected, alone.events).await?,
            ]);
        }
        batch::update_many(&self.pool, batch).await
    }

    async fn update_locked<F>(
        &self,
        session_id: Uuid,
        probe_keys: &[Uuid],
        wait: LockWait,
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        // Dropping `tx` on an early return (or a cancelled future) rolls back and releases
        // the row lock.
        let mut tx = transaction::begin(&self.pool).await?;
        let lock = match wait {
            LockWait::Wait => RowLock::ForUpdate,
            LockWait::NoWait => RowLock::ForUpdateNoWait,
        };
        let fresh = match Self::load_with(&mut *tx, session_id, lock).await {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return Ok(LockedUpdate::Missing),
            Err(err) if lock_not_available(&err) => return Ok(LockedUpdate::Busy),
            Err(err) => return Err(err),
        };
        let landed = if probe_keys.is_empty() {
            0
        } else {
            // Under the row lock no event of this session can be added meanwhile.
            let landed = sqlx::query_file_scalar!(
                "src/storage/postgres/sql/landed_events.sql",
                probe_keys,
                session_id,
                fresh.session.created_at
            )
            .fetch_one(&mut *tx)
            .await?;
            usize::try_from(landed).unwrap_or(0)
        };
        let version = fresh.version;
        let Some((next, events)) = decide(fresh, landed) else {
            return Ok(LockedUpdate::Declined);
        };
        let outcome = Self::update_with(&mut *tx, &next, version, &events).await?;
        tx.commit().await?;
        Ok(match outcome {
            UpdateOutcome::Applied(version) => LockedUpdate::Applied(version),
            // Cannot happen while the row lock is held; report the row as gone, not guess.
            UpdateOutcome::Conflict => LockedUpdate::Missing,
        })
    }

    async fn record_denials(&self, denials: &[Denial]) -> Result<(), StorageError> {
        let rows: Vec<DenialJson<'_>> = denials.iter().map(DenialJson::from).collect();
        sqlx::query_file!(
            "src/storage/postgres/sql/record_denials.sql",
            Json(&rows) as _,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn count_live_for_agent(
        &self,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        Self::count_live_with(&self.pool, agent_id, now).await
    }

    async fn active_for_agent(&self, agent_id: Uuid) -> Result<Vec<Uuid>, StorageError> {
        let ids = sqlx::query_scalar!(
            "SELECT session_id FROM arbiter.sessions WHERE agent_id = $1 AND status = 'active'",
            agent_id
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StorageError> {
        let ids = sqlx::query_file_scalar!(
            "src/storage/postgres/sql/due_for_expiry.sql",
            now,
            i64::from(limit)
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn grant_share(&self, request: ShareRequest<'_>) -> Result<ShareGrant, StorageError> {
        budgets::grant(&self.pool, request).await
    }

    async fn release_share(
        &self,
        share_id: Uuid,
        keep: u64,
        close: bool,
    ) -> Result<u64, StorageError> {
        budgets::release(&self.pool, share_id, keep, close).await
    }

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<StoredReservation>, StorageError> {
        budgets::reservation(&self.pool, reservation_id).await
    }
}
