#![doc = include_str!("../README.md")]
//!
//! # Consistency model
//!
//! * **Storage is the truth; the cache may only be ahead of it.** Every `Ok` from a
//!   mutation is durable in storage when it returns. A mutation whose write failed returns
//!   [`SessionError::StorageWriteThrough`]; its change stays in this process's cache (a
//!   denied call stays counted, the safe side) and in the pending set until the reconciler
//!   writes it.
//! * **Budgets are exact across processes.** Writes are versioned; a process whose cache
//!   is stale gets a conflict, reloads and decides again. The database refuses
//!   `calls_made > call_budget` on its own.
//! * **Reads are fresh on a best-effort basis across processes.** [`SessionStore::get`]
//!   answers from the cache. A status change made by another process (or by SQL) reaches
//!   it through LISTEN/NOTIFY, usually within milliseconds; any other change is seen at
//!   this process's next mutation of that session (a version conflict) or after the entry
//!   leaves the cache. No decision depends on that freshness.
//! * **Convergence.** Once storage is reachable, the pending set drains; merges are
//!   monotonic (a terminal status wins, counters never decrease).

pub mod audit;
pub mod chain;
pub mod clock;
pub mod error;
pub mod model;
pub mod policy;
pub mod report;
pub mod retention;
pub mod storage;
mod store;

pub use audit::{AuditEvent, Denial, DenialReason, EventKind};
pub use chain::{verify_all_audit_chains, verify_audit_chain};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{
    SESSION_HEADER, SessionError, StorageError, parse_session_header, status_code_for_error,
};
pub use model::{CreateSessionRequest, DataSensitivity, SessionStatus, TaskSession};
pub use sqlx::PgPool;
pub use storage::{FaultyStorage, MemoryStorage, PgStorage, Storage};
pub use store::{ReconcileReport, SessionStore, SessionStoreBuilder, ShutdownReport, StoreStats};

/// The embedded migrations (`migrations/`). Run them with [`migrate`], or use
/// `#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]` in tests.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Applies the embedded migrations to `pool`'s database. Safe to call from several
/// processes at once (sqlx takes an advisory lock).
///
/// # Errors
/// The migration error, if any.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
