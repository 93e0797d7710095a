//! Durable storage behind the store: the [`Storage`] trait a backend implements (reads,
//! versioned writes, a locked read-decide-write, denial records, and an optional change
//! feed), [`PgStorage`] (the real one), [`MemoryStorage`] (tests and a no-database mode)
//! and, with the `testing` feature, `testing::FaultyStorage` (deterministic failure injection
//! around either). `tests/storage_contract.rs` runs one suite over each backend.
//!
//! # Contract every implementation keeps
//! * Every write is one atomic step that also appends its audit events: state and trail
//!   never disagree.
//! * [`Storage::update`] applies only when the stored version equals the expected one, and
//!   every applied update advances the version. Anything else is [`UpdateOutcome::Conflict`],
//!   including a row another transaction holds locked at that moment: [`PgStorage`] skips a
//!   locked row rather than queue behind it. A conflict is never final; the caller reloads
//!   and decides again. (A statement PostgreSQL refuses reports its error before its
//!   transaction has rolled back, so even the caller's own refused write can hold the row
//!   for a moment after the error arrives.)
//! * `calls_made <= call_budget`, and a status never leaves closed or expired; a write that
//!   would break either fails with [`StorageError::Constraint`].
//! * [`Storage::update_locked`] reads and writes under a row lock: nothing interleaves.
//! * [`Storage::insert_if_under_cap`] decides the cap atomically with the insert, across
//!   every process sharing the storage.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::audit::{AuditEvent, Denial};
use crate::budget::BudgetId;
use crate::error::StorageError;
use crate::model::TaskSession;

#[cfg(feature = "testing")]
pub(crate) mod faulty;
mod memory;
mod postgres;

pub use memory::MemoryStorage;
pub use postgres::PgStorage;
pub(crate) use postgres::transaction::{begin as begin_transaction, unhurried};
pub(crate) use postgres::upkeep;

/// The stored version of a session row. Advanced by every update.
pub type Version = i64;

/// A session as stored, with the version its next update must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The stored session.
    pub session: TaskSession,
    /// Its stored version.
    pub version: Version,
}

/// Result of a versioned update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The row had the expected version; it now has this one.
    Applied(Version),
    /// The row changed meanwhile (or is gone); nothing was written.
    Conflict,
}

/// One versioned update of a batch (see [`Storage::update_many`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchUpdate<'a> {
    /// The session's new state.
    pub session: &'a TaskSession,
    /// The version the stored row must have.
    pub expected: Version,
    /// The events to append with it, in order.
    pub events: &'a [AuditEvent],
}

/// Result of [`Storage::update_locked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockedUpdate {
    /// The decision's state was written; the row now has this version.
    Applied(Version),
    /// The decision wrote nothing (a denial, or nothing to change).
    Declined,
    /// The session does not exist (any more).
    Missing,
    /// [`LockWait::NoWait`] only: another transaction holds the row; nothing was read or
    /// written, and `decide` was not called.
    Busy,
}

/// Whether [`Storage::update_locked`] waits for a row another transaction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Wait for the row (bounded by the store's deadline): a caller after a conflict,
    /// which must make progress.
    Wait,
    /// Do not wait: answer [`LockedUpdate::Busy`] at once. The reconciler uses it, so one
    /// row held elsewhere does not hold up every other pending session.
    NoWait,
}

/// Result of a capped insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapOutcome {
    /// Inserted with this version.
    Created(Version),
    /// Refused: the agent already had this many live sessions.
    AtCap {
        /// Live sessions the agent has.
        current: u64,
    },
}

/// A reservation of a shared budget as storage keeps it ([`Storage::reservation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredReservation {
    /// The reservation (the key of the event that made it).
    pub reservation_id: Uuid,
    /// The session that made it.
    pub session_id: Uuid,
    /// The share its estimate was charged to.
    pub share_id: Uuid,
    /// The cost it reserved.
    pub estimate: u64,
    /// When it lapses, settled at its estimate.
    pub expires_at: DateTime<Utc>,
    /// The actual cost it was settled at, once settled.
    pub charged: Option<u64>,
}

/// A process asking for units of a shared budget ([`Storage::grant_share`]).
#[derive(Debug, Clone, Copy)]
pub struct ShareRequest<'a> {
    /// The share to add them to (made if it does not exist).
    pub share_id: Uuid,
    /// The asking store's instance id: a share is only ever topped up by its holder.
    pub holder: Uuid,
    /// The budget drawn on (units of each of its ancestors come with it).
    pub budget_id: &'a BudgetId,
    /// Grant nothing unless at least this many units are left at every level.
    pub need: u64,
    /// As many as this, if there is room (storage may grant fewer, never fewer than
    /// `need`).
    pub want: u64,
    /// How long the share stays the holder's without a renewal (any grant renews it).
    pub lease: std::time::Duration,
}

/// What [`Storage::grant_share`] granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareGrant {
    /// `false` when the share is closed, not the holder's, or of a period that is over:
    /// nothing was granted; ask again on a new share.
    pub share_open: bool,
    /// Units this grant added.
    pub added: u64,
    /// Units the share holds in all.
    pub granted: u64,
    /// Units left before this grant at the level with least room.
    pub room: u64,
    /// That level.
    pub tightest: Option<BudgetId>,
    /// The share is for calls decided before this instant (the first end among its
    /// budgets' periods); `None`: no end.
    pub period_end: Option<DateTime<Utc>>,
}

/// What a [`ChangeFeed`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The status of this session changed (closed or expired, by anyone).
    Session(Uuid),
    /// The feed (re)connected: changes made meanwhile may have been missed, so every cached
    /// session should be considered stale.
    Reset,
    /// The feed lost its connection (or found it half-open) and is reconnecting; a
    /// [`Change::Reset`] follows once it is back.
    Disconnected,
}

/// Status changes made by any writer, for cache invalidation across processes.
pub trait ChangeFeed: Send + 'static {
    /// Waits for the next change. Never fails: a feed that loses its connection reconnects
    /// with backoff by itself and then reports [`Change::Reset`].
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Change> + Send + '_>>;
}

/// Where sessions live durably. See the module documentation for the contract.
pub trait Storage: Send + Sync + 'static {
    /// A feed of status changes made by any process, if this storage has one (the default
    /// has none: a store over it sees other writers' changes only at its next write).
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        None
    }

    /// Periodic upkeep, run by the store when it is first used and then every minute (see
    /// [`SessionStoreBuilder::maintenance_interval`](crate::SessionStoreBuilder::maintenance_interval)).
    /// [`PgStorage`] creates the audit trail's partitions for the days ahead
    /// (`arbiter.ensure_event_partitions`) and rolls up the days that are over, and today so
    /// far, for the reports ([`operator::rollup`](crate::operator::rollup)). Idempotent, and
    /// safe to run from several processes at once. The default does nothing.
    fn maintain(&self) -> impl Future<Output = Result<(), StorageError>> + Send {
        async { Ok(()) }
    }

    /// Loads one session, `None` if it does not exist.
    fn load(
        &self,
        session_id: Uuid,
    ) -> impl Future<Output = Result<Option<Versioned>, StorageError>> + Send;

    /// Inserts a new session with its `created` event.
    fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> impl Future<Output = Result<Version, StorageError>> + Send;

    /// Inserts a new session unless its agent already has `max` or more live sessions
    /// (active and `now < expires_at`), deciding atomically across processes.
    fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<CapOutcome, StorageError>> + Send;

    /// Replaces the session's mutable state (counters, rate window, status) if the stored
    /// version is `expected`, appending `events` in the same step.
    fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> impl Future<Output = Result<UpdateOutcome, StorageError>> + Send;

    /// Whether [`Storage::update_many`] writes a batch in one step. The store groups
    /// concurrent writes only then; otherwise each goes out on its own through
    /// [`Storage::update`] (grouping would only make one write wait for another).
    fn batches_writes(&self) -> bool {
        false
    }

    /// Several versioned updates of distinct sessions at once: a group commit. Each has
    /// its own version check and its own outcome, in the order given; an `Err` means none
    /// is known to have been written (the storage may still have written some: callers
    /// treat it as a write whose outcome is unknown).
    ///
    /// The default sends them one by one through [`Storage::update`]; [`PgStorage`] sends
    /// one statement and one commit for the whole batch.
    fn update_many(
        &self,
        batch: &[BatchUpdate<'_>],
    ) -> impl Future<Output = Result<Vec<UpdateOutcome>, StorageError>> + Send {
        async move {
            let mut outcomes = Vec::with_capacity(batch.len());
            for update in batch {
                outcomes.push(
                    self.update(update.session, update.expected, update.events)
                        .await?,
                );
            }
            Ok(outcomes)
        }
    }

    /// Loads the session locked against every other writer, asks `decide` for the new state
    /// and its events given the fresh row, and writes them, all in one transaction.
    ///
    /// `decide` also gets how many of `probe_keys` are already stored as event keys: the
    /// events of an earlier write whose outcome the caller never learned.
    ///
    /// The store uses this after an optimistic [`Storage::update`] conflicted: because no
    /// writer can slip in between the read and the write, a caller that lost a race once
    /// is guaranteed to make progress, however hot the session is in other processes.
    /// `decide` is called at most once; `None` writes nothing ([`LockedUpdate::Declined`]).
    /// With [`LockWait::NoWait`], a row held by another transaction is
    /// [`LockedUpdate::Busy`] at once; a storage without row locks never answers that.
    fn update_locked<F>(
        &self,
        session_id: Uuid,
        probe_keys: &[Uuid],
        wait: LockWait,
        decide: F,
    ) -> impl Future<Output = Result<LockedUpdate, StorageError>> + Send
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send;

    /// Appends denial events (kind [`EventKind::Denied`](crate::audit::EventKind::Denied)), in
    /// one statement for the whole batch. They change no session.
    ///
    /// Idempotent: a denial whose event key is already stored is skipped, so a batch whose
    /// earlier attempt committed without the caller learning it can be sent again.
    fn record_denials(
        &self,
        denials: &[Denial],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Live sessions (active and `now < expires_at`) of `agent_id`.
    fn count_live_for_agent(
        &self,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// Ids of the sessions of `agent_id` whose status is active.
    fn active_for_agent(
        &self,
        agent_id: Uuid,
    ) -> impl Future<Output = Result<Vec<Uuid>, StorageError>> + Send;

    /// Grants units of a shared budget to a share of the asking process (see
    /// [`ShareRequest`]), in one transaction that never takes any level of the budget's
    /// chain past its limit, and renews the share's lease. The default refuses: a storage
    /// without budgets ([`MemoryStorage`] refuses sessions that name one).
    fn grant_share(
        &self,
        request: ShareRequest<'_>,
    ) -> impl Future<Output = Result<ShareGrant, StorageError>> + Send {
        let _ = request;
        async { Err(StorageError::Unsupported("shared budgets")) }
    }

    /// Gives back the units of `share_id` beyond `keep` (what its holder has spent or is
    /// spending; never below what storage recorded as used), closing the share when
    /// `close`. Returns how many came back. The default has nothing to give back.
    fn release_share(
        &self,
        share_id: Uuid,
        keep: u64,
        close: bool,
    ) -> impl Future<Output = Result<u64, StorageError>> + Send {
        let _ = (share_id, keep, close);
        async { Ok(0) }
    }

    /// The reservation `reservation_id`, if one was made. The default knows none: a
    /// storage without budgets has no reservations.
    fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> impl Future<Output = Result<Option<StoredReservation>, StorageError>> + Send {
        let _ = reservation_id;
        async { Ok(None) }
    }

    /// Ids of up to `limit` active sessions whose `expires_at <= now`, earliest first.
    fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Uuid>, StorageError>> + Send;
}
