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

use std::str::FromStr as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    BatchUpdate, CapOutcome, LockWait, LockedUpdate, Storage, UpdateOutcome, Version, Versioned,
};
use crate::audit::{AuditEvent, Denial, DenialReason};
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

/// Default `max_connections` of [`PgStorage::pool_options`].
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// Default `acquire_timeout` of [`PgStorage::pool_options`].
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default server-side `statement_timeout` set by [`PgStorage::connect`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Server-side `idle_in_transaction_session_timeout` set by [`PgStorage::connect`]: a
/// client that vanishes inside a transaction (a partition, a frozen process) releases its
/// row and advisory locks after this long. The library's transactions send their
/// statements back to back, so it never waits this long itself.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Server-side TCP keepalive set by [`PgStorage::connect`] (`tcp_keepalives_idle`,
/// `_interval`, `_count`): PostgreSQL notices a client that vanished without closing its
/// connection within about idle + interval × count seconds, instead of the kernel's
/// default of over two hours.
pub const TCP_KEEPALIVE: (Duration, Duration, u32) =
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
            listener_check: super::notify::DEFAULT_LISTENER_CHECK,
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

    /// Pool options suited to the write-through hot path: [`DEFAULT_MAX_CONNECTIONS`]
    /// connections and an acquire timeout of [`DEFAULT_ACQUIRE_TIMEOUT`] (sqlx's default
    /// is 30 s). Adjust before connecting.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(DEFAULT_MAX_CONNECTIONS)
            .acquire_timeout(DEFAULT_ACQUIRE_TIMEOUT)
    }

    /// Connects to `url` with [`PgStorage::pool_options`] and these server-side settings
    /// on every connection, so that PostgreSQL itself ends what a stalled or vanished
    /// client would otherwise hold:
    /// * `statement_timeout` [`DEFAULT_STATEMENT_TIMEOUT`]: a statement stuck on a lock;
    /// * `idle_in_transaction_session_timeout` [`IDLE_IN_TRANSACTION_TIMEOUT`]: a row lock
    ///   or an agent's advisory lock held by a client cut off mid-transaction;
    /// * `tcp_keepalives_*` [`TCP_KEEPALIVE`]: an idle connection whose client is gone.
    ///
    /// A deployment that builds its own pool should set the same three (in the URL's
    /// `options` or with [`PgConnectOptions::options`]).
    ///
    /// # Errors
    /// The URL does not parse, or PostgreSQL cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let millis = |d: Duration| d.as_millis().to_string();
        let (keepalive_idle, keepalive_interval, keepalive_count) = TCP_KEEPALIVE;
        let options = PgConnectOptions::from_str(url)?.options([
            ("statement_timeout", millis(DEFAULT_STATEMENT_TIMEOUT)),
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
        ]);
        Ok(PgStorage::new(
            Self::pool_options().connect_with(options).await?,
        ))
    }

    /// The pool this storage uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A `sessions` row as selected by [`PgStorage::load`].
struct SessionRow {
    session_id: Uuid,
    agent_id: Uuid,
    delegation_chain: Vec<String>,
    declared_intent: String,
    authorized_tools: Vec<String>,
    authorized_credentials: Vec<String>,
    call_budget: i64,
    calls_made: i64,
    rate_limit: Option<i64>,
    rate_window_secs: i64,
    rate_window_started_at: Option<DateTime<Utc>>,
    rate_window_calls: i64,
    data_sensitivity_ceiling: String,
    status: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    version: i64,
}

impl TryFrom<SessionRow> for Versioned {
    type Error = StorageError;

    /// A row edited by hand may hold anything the constraints allow; decoding checks the
    /// rest instead of panicking.
    fn try_from(row: SessionRow) -> Result<Self, StorageError> {
        let id = row.session_id;
        let count = |name: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| StorageError::Decode(format!("session {id}: {name} is {value}")))
        };
        let session = TaskSession {
            session_id: row.session_id,
            agent_id: row.agent_id,
            delegation_chain_snapshot: row.delegation_chain.into(),
            declared_intent: row.declared_intent.into(),
            authorized_tools: row.authorized_tools.into(),
            authorized_credentials: row.authorized_credentials.into(),
            time_limit: row.expires_at - row.created_at,
            call_budget: count("call_budget", row.call_budget)?,
            calls_made: count("calls_made", row.calls_made)?,
            rate_limit_per_minute: row
                .rate_limit
                .map(|limit| count("rate_limit", limit))
                .transpose()?,
            rate_limit_window_secs: count("rate_window_secs", row.rate_window_secs)?,
            rate_window_started_at: row.rate_window_started_at,
            rate_window_calls: count("rate_window_calls", row.rate_window_calls)?,
            data_sensitivity_ceiling: row
                .data_sensitivity_ceiling
                .parse()
                .map_err(|e| StorageError::Decode(format!("session {id}: {e}")))?,
            created_at: row.created_at,
            expires_at: row.expires_at,
            status: row
                .status
                .parse()
                .map_err(|e| StorageError::Decode(format!("session {id}: {e}")))?,
        };
        Ok(Versioned {
            session,
            version: row.version,
        })
    }
}

/// An event as encoded for `jsonb_to_recordset` in [`PgStorage::update`]: one statement
/// carries any number of events without a round trip each.
#[derive(serde::Serialize)]
struct EventJson<'a> {
    event_key: Uuid,
    kind: &'static str,
    tools: &'a [String],
    calls_made: i64,
    rate_window_calls: i64,
    status: &'static str,
    occurred_at: DateTime<Utc>,
    instance_id: Uuid,
}

impl<'a> From<&'a AuditEvent> for EventJson<'a> {
    fn from(event: &'a AuditEvent) -> Self {
        EventJson {
            event_key: event.key,
            kind: event.kind.as_str(),
            tools: &event.tools,
            calls_made: to_bigint(event.calls_made),
            rate_window_calls: to_bigint(event.rate_window_calls),
            status: event.status.as_str(),
            occurred_at: event.occurred_at,
            instance_id: event.instance_id,
        }
    }
}

/// An event of a batch, tagged with its session.
#[derive(serde::Serialize)]
struct BatchEventJson<'a> {
    session_id: Uuid,
    #[serde(flatten)]
    event: EventJson<'a>,
}

/// A denial as encoded for `jsonb_to_recordset` in [`PgStorage::record_denials`].
#[derive(serde::Serialize)]
struct DenialJson<'a> {
    session_id: Uuid,
    agent_id: Uuid,
    #[serde(flatten)]
    event: EventJson<'a>,
    reason: Option<&'static str>,
}

impl<'a> From<&'a Denial> for DenialJson<'a> {
    fn from(denial: &'a Denial) -> Self {
        DenialJson {
            session_id: denial.session_id,
            agent_id: denial.agent_id,
            event: EventJson::from(&denial.event),
            reason: denial.event.reason.map(DenialReason::as_str),
        }
    }
}

/// Counts are validated to fit `bigint` at creation and only grow up to the budget, so this
/// never saturates for a session the store created; a saturated value would be refused by
/// a CHECK constraint rather than wrap.
fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
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
            // language=PostgreSQL
            RowLock::None => {
                sqlx::query_as!(
                    SessionRow,
                    r#"
                    SELECT session_id, agent_id, delegation_chain, declared_intent,
                           authorized_tools, authorized_credentials, call_budget, calls_made,
                           rate_limit, rate_window_secs, rate_window_started_at,
                           rate_window_calls, data_sensitivity_ceiling, status, created_at,
                           expires_at, version
                      FROM arbiter.sessions
                     WHERE session_id = $1
                    "#,
                    session_id
                )
                .fetch_optional(executor)
                .await?
            }
            // language=PostgreSQL
            RowLock::ForUpdate => {
                sqlx::query_as!(
                    SessionRow,
                    r#"
                    SELECT session_id, agent_id, delegation_chain, declared_intent,
                           authorized_tools, authorized_credentials, call_budget, calls_made,
                           rate_limit, rate_window_secs, rate_window_started_at,
                           rate_window_calls, data_sensitivity_ceiling, status, created_at,
                           expires_at, version
                      FROM arbiter.sessions
                     WHERE session_id = $1
                       FOR UPDATE
                    "#,
                    session_id
                )
                .fetch_optional(executor)
                .await?
            }
            // language=PostgreSQL
            RowLock::ForUpdateNoWait => {
                sqlx::query_as!(
                    SessionRow,
                    r#"
                    SELECT session_id, agent_id, delegation_chain, declared_intent,
                           authorized_tools, authorized_credentials, call_budget, calls_made,
                           rate_limit, rate_window_secs, rate_window_started_at,
                           rate_window_calls, data_sensitivity_ceiling, status, created_at,
                           expires_at, version
                      FROM arbiter.sessions
                     WHERE session_id = $1
                       FOR UPDATE NOWAIT
                    "#,
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
        // language=PostgreSQL
        let live = sqlx::query_scalar!(
            r#"
            SELECT count(*) AS "live!"
              FROM arbiter.sessions
             WHERE agent_id = $1 AND status = 'active' AND expires_at > $2
            "#,
            agent_id,
            now
        )
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
        // language=PostgreSQL
        let version = sqlx::query_scalar!(
            r#"
            WITH updated AS (
                UPDATE arbiter.sessions
                   SET calls_made = $3,
                       rate_window_started_at = $4,
                       rate_window_calls = $5,
                       status = $6
                 WHERE session_id = $1 AND version = $2
                   AND session_id = (SELECT l.session_id FROM arbiter.sessions l
                                      WHERE l.session_id = $1 FOR UPDATE SKIP LOCKED)
                RETURNING session_id, agent_id, version
            ), events AS (
                INSERT INTO arbiter.session_events (
                    event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
                    status, session_version, occurred_at, instance_id)
                SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
                       e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id
                  FROM updated u
                 CROSS JOIN ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
                       event_key uuid, kind text, tools text[], calls_made bigint,
                       rate_window_calls bigint, status text, occurred_at timestamptz,
                       instance_id uuid)) WITH ORDINALITY AS e(
                       event_key, kind, tools, calls_made, rate_window_calls, status,
                       occurred_at, instance_id, position)
                 -- In order: event ids, and so the audit chain, follow the events' order.
                 ORDER BY e.position
            )
            SELECT version FROM updated
            "#,
            s.session_id,
            expected,
            to_bigint(s.calls_made),
            s.rate_window_started_at,
            to_bigint(s.rate_window_calls),
            s.status.as_str(),
            Json(&events) as _,
        )
        .fetch_optional(executor)
        .await?;
        Ok(match version {
            Some(version) => UpdateOutcome::Applied(version),
            None => UpdateOutcome::Conflict,
        })
    }

    /// [`Storage::update_many`] for a batch of distinct sessions: one statement.
    async fn update_batch_with(
        pool: &PgPool,
        batch: &[BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        // The new states as parallel arrays, one element per session. PostgreSQL sizes an
        // `unnest` of array parameters from the arrays, so a batch of a few sessions finds
        // them through the primary key; a JSON input is always guessed at 100 rows, which
        // planned small batches as sequential scans of `sessions` (measured: twice the time
        // of a batch of 8 on a table of a few hundred churned rows).
        let n = batch.len();
        let mut session_ids = Vec::with_capacity(n);
        let mut expected = Vec::with_capacity(n);
        let mut calls_made = Vec::with_capacity(n);
        let mut window_starts = Vec::with_capacity(n);
        let mut window_calls = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        for u in batch {
            session_ids.push(u.session.session_id);
            expected.push(u.expected);
            calls_made.push(to_bigint(u.session.calls_made));
            window_starts.push(u.session.rate_window_started_at);
            window_calls.push(to_bigint(u.session.rate_window_calls));
            statuses.push(u.session.status.as_str());
        }
        let events: Vec<BatchEventJson<'_>> = batch
            .iter()
            .flat_map(|u| {
                u.events.iter().map(|event| BatchEventJson {
                    session_id: u.session.session_id,
                    event: EventJson::from(event),
                })
            })
            .collect();
        // One statement, one commit. The rows are locked first, skipping any row another
        // transaction holds (see the module's invariant). Then each row is updated only
        // where its own version matches, and only the updated sessions get their events.
        // A session missing from the result was skipped or changed meanwhile: a conflict.
        // language=PostgreSQL
        let applied = sqlx::query!(
            r#"
            WITH input AS (
                SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::timestamptz[],
                                     $5::int8[], $6::text[])
                    AS i(session_id, expected, calls_made, rate_window_started_at,
                         rate_window_calls, status)
            ), locked AS (
                SELECT s.session_id
                  FROM arbiter.sessions s
                 WHERE s.session_id IN (SELECT session_id FROM input)
                   FOR UPDATE SKIP LOCKED
            ), updated AS (
                UPDATE arbiter.sessions s
                   SET calls_made = i.calls_made,
                       rate_window_started_at = i.rate_window_started_at,
                       rate_window_calls = i.rate_window_calls,
                       status = i.status
                  FROM input i, locked l
                 WHERE s.session_id = i.session_id AND l.session_id = i.session_id
                   AND s.version = i.expected
                RETURNING s.session_id, s.agent_id, s.version
            ), events AS (
                INSERT INTO arbiter.session_events (
                    event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
                    status, session_version, occurred_at, instance_id)
                SELECT e.event_key, u.session_id, u.agent_id, e.kind, e.tools, e.calls_made,
                       e.rate_window_calls, e.status, u.version, e.occurred_at, e.instance_id
                  FROM updated u
                  JOIN ROWS FROM (jsonb_to_recordset($7::jsonb) AS (
                       session_id uuid, event_key uuid, kind text, tools text[],
                       calls_made bigint, rate_window_calls bigint, status text,
                       occurred_at timestamptz, instance_id uuid)) WITH ORDINALITY AS e(
                       session_id, event_key, kind, tools, calls_made, rate_window_calls,
                       status, occurred_at, instance_id, position)
                    ON e.session_id = u.session_id
                 -- In order: each session's chain follows its events' order.
                 ORDER BY e.position
            )
            SELECT session_id AS "session_id!", version AS "version!" FROM updated
            "#,
            &session_ids,
            &expected,
            &calls_made,
            // The macro's check knows arrays only as `&[T]`: NULL elements (a window not
            // started) and borrowed strings are typed by hand.
            &window_starts as &[Option<DateTime<Utc>>],
            &window_calls,
            &statuses as &[&str],
            Json(&events) as _,
        )
        .fetch_all(pool)
        .await?;
        Ok(batch
            .iter()
            .map(|u| {
                applied
                    .iter()
                    .find(|row| row.session_id == u.session.session_id)
                    .map_or(UpdateOutcome::Conflict, |row| {
                        UpdateOutcome::Applied(row.version)
                    })
            })
            .collect())
    }

    async fn insert_with(
        executor: impl sqlx::PgExecutor<'_>,
        s: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        // language=PostgreSQL
        let version = sqlx::query_scalar!(
            r#"
            WITH inserted AS (
                INSERT INTO arbiter.sessions (
                    session_id, agent_id, delegation_chain, declared_intent, authorized_tools,
                    authorized_credentials, call_budget, calls_made, rate_limit, rate_window_secs,
                    rate_window_started_at, rate_window_calls, data_sensitivity_ceiling, status,
                    created_at, expires_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
                RETURNING session_id, agent_id, version
            )
            INSERT INTO arbiter.session_events (
                event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
                status, session_version, occurred_at, instance_id)
            SELECT $20, session_id, agent_id, $17, '{}', $8, $12, $14, version, $18, $19
              FROM inserted
            RETURNING session_version AS "session_version!"
            "#,
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
        )
        .fetch_one(executor)
        .await?;
        Ok(version)
    }
}

impl Storage for PgStorage {
    fn change_feed(&self) -> Option<Box<dyn super::ChangeFeed>> {
        Some(Box::new(
            super::PgChangeFeed::new(self.pool.clone()).check_every(self.listener_check),
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
        let mut tx = self.pool.begin().await?;
        // language=PostgreSQL
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
        // The statement joins rows to sessions by id, so a session may appear in it once:
        // a second write of the same session (two cache slots for one id, after an
        // invalidation) would share the first one's outcome and version. Later writes of
        // an id already in the batch go out afterwards, one by one, and conflict or apply
        // on their own versions.
        let mut seen = std::collections::HashSet::with_capacity(batch.len());
        let (first, again): (Vec<_>, Vec<_>) = batch
            .iter()
            .enumerate()
            .partition(|(_, u)| seen.insert(u.session.session_id));
        if again.is_empty() {
            return Self::update_batch_with(&self.pool, batch).await;
        }
        let firsts: Vec<BatchUpdate<'_>> = first.iter().map(|(_, u)| **u).collect();
        let mut outcomes = vec![UpdateOutcome::Conflict; batch.len()];
        for ((index, _), outcome) in first
            .iter()
            .zip(Self::update_batch_with(&self.pool, &firsts).await?)
        {
            outcomes[*index] = outcome;
        }
        for (index, u) in again {
            outcomes[index] =
                Self::update_with(&self.pool, u.session, u.expected, u.events).await?;
        }
        Ok(outcomes)
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
        let mut tx = self.pool.begin().await?;
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
            // language=PostgreSQL
            let landed = sqlx::query_scalar!(
                r#"
                SELECT count(*) AS "landed!"
                  FROM arbiter.session_events
                 WHERE event_key = ANY($1) AND session_id = $2
                "#,
                probe_keys,
                session_id
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
        // language=PostgreSQL
        sqlx::query!(
            r#"
            INSERT INTO arbiter.session_events (
                event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
                status, session_version, occurred_at, instance_id, reason)
            SELECT d.event_key, d.session_id, d.agent_id, 'denied', d.tools, d.calls_made,
                   d.rate_window_calls, d.status, NULL, d.occurred_at, d.instance_id, d.reason
              FROM jsonb_to_recordset($1::jsonb) AS d(
                   event_key uuid, session_id uuid, agent_id uuid, tools text[],
                   calls_made bigint, rate_window_calls bigint, status text,
                   occurred_at timestamptz, instance_id uuid, reason text)
            -- A retried batch whose first attempt committed unseen: record each denial once.
                ON CONFLICT ON CONSTRAINT session_events_key_unique DO NOTHING
            "#,
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
        // language=PostgreSQL
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
        // language=PostgreSQL
        let ids = sqlx::query_scalar!(
            r#"
            SELECT session_id
              FROM arbiter.sessions
             WHERE status = 'active' AND expires_at <= $1
             ORDER BY expires_at
             LIMIT $2
            "#,
            now,
            i64::from(limit)
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }
}
