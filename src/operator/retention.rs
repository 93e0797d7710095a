//! Retention: the one way to delete sessions and audit events.
//!
//! # Invariant: nothing live is ever deleted, and events only when asked
//! [`purge_before`] calls `arbiter.purge_before` (migration `20261124000005_retention.sql`),
//! and the database's triggers refuse every other deletion: a session may go only once it
//! is over (closed or expired and last changed before the cutoff, or past its time limit),
//! an event only when its session is gone, it was recorded before the cutoff, and the
//! caller asked for [`EventRetention::Delete`]. By default the audit trail is kept.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use thiserror::Error;

use crate::error::StorageError;

/// Whether a purge also deletes the audit events of the sessions it deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventRetention {
    /// Keep every event (the default): the reports still see the purged sessions' history.
    #[default]
    Keep,
    /// Delete the events, recorded before the cutoff, of sessions that no longer exist.
    Delete,
}

/// What a purge deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Sessions deleted.
    pub sessions: u64,
    /// Audit events deleted (0 unless [`EventRetention::Delete`]).
    pub events: u64,
}

/// Why a purge did not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PurgeError {
    /// The cutoff is later than the database's current time: sessions would be judged by a
    /// time that has not come.
    #[error("purge cutoff {cutoff} is in the future")]
    CutoffInFuture {
        /// The refused cutoff.
        cutoff: DateTime<Utc>,
    },
    /// The database refused or could not be reached; nothing was deleted.
    #[error("purge failed")]
    Storage(#[from] StorageError),
}

/// Deletes the sessions that ended before `cutoff` and, with [`EventRetention::Delete`],
/// the events of deleted sessions recorded before it, in one transaction. Live sessions are
/// never touched. A store that still caches a purged session keeps answering from its
/// cached, terminal state, which denies every call.
///
/// # Errors
/// [`PurgeError::CutoffInFuture`] (checked by PostgreSQL against its own clock, so a
/// skewed gateway clock cannot purge early), or the storage error; nothing is deleted then.
pub async fn purge_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    events: EventRetention,
) -> Result<PurgeReport, PurgeError> {
    let result = sqlx::query_file!(
        "src/operator/sql/purge_before.sql",
        cutoff,
        events == EventRetention::Delete
    )
    .fetch_one(pool)
    .await
    .map_err(StorageError::from);
    match result {
        Ok(row) => Ok(PurgeReport {
            // ROW_COUNT is never negative.
            sessions: u64::try_from(row.sessions).unwrap_or(0),
            events: u64::try_from(row.events).unwrap_or(0),
        }),
        Err(StorageError::Constraint { name, .. }) if name == "purge_cutoff_in_past" => {
            Err(PurgeError::CutoffInFuture { cutoff })
        }
        Err(other) => Err(other.into()),
    }
}
