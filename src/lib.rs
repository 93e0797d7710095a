#![doc = include_str!("../README.md")]
//!
//! # The crate
//! * [`SessionStore`] is the API: create, use, close and read sessions. Build one with
//!   [`SessionStore::builder`] over a [`Storage`]: [`PgStorage`] in production,
//!   [`MemoryStorage`] without a database.
//! * [`model`] holds the request and the session, [`error`] the errors every call returns,
//!   [`http`] what a gateway needs to answer over HTTP, [`audit`] the audit trail's events.
//! * [`storage`] is the backend trait and its contract, for a new backend.
//! * [`operator`] is the operator's side: the audit chain, retention and reports.
//! * `metrics` (feature `metrics`) names the metrics the store emits through the
//!   `metrics` facade; the `server` feature adds `arbiter-session serve`, the store over
//!   HTTP.
//! * `testing` (feature `testing`) holds the test doubles.
//! * `docs/architecture.md` in the repository follows one call through every layer.
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
pub mod budget;
pub mod clock;
pub mod error;
pub mod http;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
pub mod model;
pub mod operator;
mod policy;
#[cfg(feature = "server")]
pub mod server;
pub mod session_token;
pub mod storage;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

/// The sqlx this crate is built with, so that a gateway names the same `PgPool` and
/// `#[sqlx::test]` without a version of its own to keep in step.
pub use sqlx;

pub use error::SessionError;
pub use model::{
    CreateSessionRequest, DataSensitivity, OpenReservation, Reservation, SessionStatus,
    SessionSummary, Settlement, TaskSession, ToolCost, ToolLimit,
};
pub use session_token::{SessionToken, TokenSecret};
pub use storage::{MemoryStorage, PgStorage, Storage};
pub use store::{ReconcileReport, SessionStore, SessionStoreBuilder, ShutdownReport, StoreStats};

/// The embedded migrations (`migrations/`). Run them with [`migrate`], or use
/// `#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]` in tests.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Applies the embedded migrations to `pool`'s database. Safe to call from several
/// processes at once (sqlx takes an advisory lock).
///
/// # Errors
/// The migration error, if any.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
