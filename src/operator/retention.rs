//! Retention: the one way to delete sessions and audit events.
//!
//! # Invariant: nothing live is ever deleted, and events only when asked
//! [`purge_before`] calls `arbiter.purge_before` (migration `20261124000005_retention.sql`),
//! and the database's triggers refuse every other deletion: a session may go only once it
//! is over (closed or expired and last changed before the cutoff, or past its time limit),
//! an event only when its session is gone, it was recorded before the cutoff, and the
//! caller asked for [`EventRetention::Delete`]. By default the audit trail is kept.
//!
//! # Invariant: an archiving purge drops only what it archived
//! `purge_archiving` (feature `archive`) writes each partition it may drop to a file,
//! synced to disk, and then has `arbiter.purge_before` drop only those partitions, each
//! only if it still holds exactly the rows written; it deletes no event row by row.

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
    /// An archive file could not be written; nothing was deleted.
    #[error("writing the archive {} failed", path.display())]
    Archive {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
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
    .map(|row| (row.sessions, row.events));
    purge_outcome(result, cutoff)
}

/// What `arbiter.purge_before` answered (its two counts), as a report or a purge error.
fn purge_outcome(
    result: Result<(i64, i64), sqlx::Error>,
    cutoff: DateTime<Utc>,
) -> Result<PurgeReport, PurgeError> {
    match result.map_err(StorageError::from) {
        Ok((sessions, events)) => Ok(PurgeReport {
            // ROW_COUNT is never negative.
            sessions: u64::try_from(sessions).unwrap_or(0),
            events: u64::try_from(events).unwrap_or(0),
        }),
        Err(StorageError::Constraint { name, .. }) if name == "purge_cutoff_in_past" => {
            Err(PurgeError::CutoffInFuture { cutoff })
        }
        Err(other) => Err(other.into()),
    }
}

/// A partition written out by [`purge_archiving`].
#[cfg(feature = "archive")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedPartition {
    /// The day of the sessions whose events it holds.
    pub day: chrono::NaiveDate,
    /// Its file: `session_events_YYYYMMDD.jsonl.gz` in the archive directory, one JSON
    /// object per event as `export` writes them, in `event_id` order.
    pub path: std::path::PathBuf,
    /// Events written.
    pub events: u64,
    /// Whether the purge dropped the partition. If not (an event or a session of its day
    /// came since it was written), the file is a copy and the partition waits for a later
    /// purge, which writes it again.
    pub dropped: bool,
}

/// What [`purge_archiving`] did.
#[cfg(feature = "archive")]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArchiveReport {
    /// Sessions and events deleted.
    pub purge: PurgeReport,
    /// The partitions written, oldest first.
    pub partitions: Vec<ArchivedPartition>,
}

/// [`purge_before`] with [`EventRetention::Delete`], keeping a copy of every event it
/// deletes: each partition the purge may drop is first written to
/// `dir/session_events_YYYYMMDD.jsonl.gz` (gzip-compressed JSON Lines, synced to disk),
/// and then only the partitions written, still holding exactly the rows written, are
/// dropped. No event is deleted row by row: events outside a partition that can go whole
/// (the day that straddles the cutoff, a day still holding a session) stay until a later
/// purge can drop their partition.
///
/// # Errors
/// [`PurgeError::CutoffInFuture`] before anything is written, [`PurgeError::Archive`] when
/// a file cannot be written (nothing is deleted), or the storage error.
#[cfg(feature = "archive")]
pub async fn purge_archiving(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    dir: &std::path::Path,
) -> Result<ArchiveReport, PurgeError> {
    use std::io::Write as _;

    let archive_error = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| PurgeError::Archive { path, source }
    };
    let in_future = sqlx::query_scalar!(r#"SELECT $1::timestamptz > now() AS "future!""#, cutoff)
        .fetch_one(pool)
        .await
        .map_err(StorageError::from)?;
    if in_future {
        return Err(PurgeError::CutoffInFuture { cutoff });
    }
    std::fs::create_dir_all(dir).map_err(archive_error(dir))?;
    let candidates = sqlx::query_scalar!(
        r#"SELECT day AS "day!" FROM arbiter.purge_partition_candidates($1)"#,
        cutoff
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?;

    let mut partitions = Vec::new();
    for day in candidates {
        let path = dir.join(format!("session_events_{}.jsonl.gz", day.format("%Y%m%d")));
        let partial = dir.join(format!(
            "session_events_{}.jsonl.gz.partial",
            day.format("%Y%m%d")
        ));
        let file = std::fs::File::create(&partial).map_err(archive_error(&partial))?;
        let mut gzip = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::default(),
        );
        let written = match crate::operator::export::export_partition(pool, day, &mut gzip).await {
            Ok(written) => written,
            Err(crate::operator::export::ExportError::Storage(err)) => return Err(err.into()),
            Err(err) => return Err(archive_error(&partial)(std::io::Error::other(err))),
        };
        let file = gzip
            .finish()
            .and_then(|mut out| {
                out.flush()?;
                out.into_inner()
                    .map_err(std::io::IntoInnerError::into_error)
            })
            .map_err(archive_error(&partial))?;
        file.sync_all().map_err(archive_error(&partial))?;
        if written.last_recorded_at.is_some_and(|at| at >= cutoff) {
            // An event recorded after the cutoff keeps the partition: no copy needed.
            std::fs::remove_file(&partial).map_err(archive_error(&partial))?;
            continue;
        }
        std::fs::rename(&partial, &path).map_err(archive_error(&path))?;
        partitions.push(ArchivedPartition {
            day,
            path,
            events: written.events,
            dropped: false,
        });
    }
    // The renames themselves reach the disk before anything is dropped.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(archive_error(dir))?;

    let days: Vec<chrono::NaiveDate> = partitions.iter().map(|p| p.day).collect();
    let rows: Vec<i64> = partitions
        .iter()
        .map(|p| i64::try_from(p.events).unwrap_or(i64::MAX))
        .collect();
    let result = sqlx::query_file!("src/operator/sql/purge_archived.sql", cutoff, &days, &rows)
        .fetch_one(pool)
        .await
        .map(|row| (row.sessions, row.events));
    let purged = purge_outcome(result, cutoff)?;
    let remaining = sqlx::query_scalar!(
        r#"SELECT day AS "day!" FROM arbiter.event_partitions() WHERE day IS NOT NULL"#
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?;
    for partition in &mut partitions {
        partition.dropped = !remaining.contains(&partition.day);
    }
    Ok(ArchiveReport {
        purge: purged,
        partitions,
    })
}
