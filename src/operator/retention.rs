//! Retention: the one way to delete sessions and audit events.
//!
//! # Invariant: nothing live is ever deleted, and events only when asked
//! A purge deletes a session only once it is over (closed or expired and last changed
//! before the cutoff, or past its time limit), and, with [`EventRetention::Delete`], a
//! session's trail only whole, once the session is gone and every event of it was recorded
//! before the cutoff and occurred before the start of yesterday (UTC). The database's
//! triggers refuse every other deletion. By default the audit trail is kept.
//!
//! # Invariant: a purge never holds up a gateway, and never races one
//! A purge is a sequence of short steps, each a transaction of its own (migration
//! `20261206000004_purge_steps.sql`): the sessions; then each day's partition that can go
//! whole; then the trails left, a batch of sessions at a time. Each step takes the locks
//! that keep a late event (a denial recorded for a session a gateway still caches) from
//! slipping past its decision: the partition it drops, or the denial chains of the
//! sessions whose trails it deletes, then the days their events occurred on. It waits for
//! each lock at most [`LOCK_WAIT`] (so a writer queued behind its request waits no longer),
//! and a step that runs out of time changes nothing and is tried again a few times, then
//! left to a later purge ([`PurgeReport::busy`]). The table's exclusive lock a drop takes
//! is held only to the end of that step's transaction, right after the drop. It never
//! takes the lock of today's or yesterday's events, which every insert takes.
//!
//! The days a step removed events of are read raw by the reports until a rollup counts them
//! again, which the purge runs at its end: the reports answer exactly what the events say
//! throughout.
//!
//! # Invariant: an archiving purge drops only what it archived
//! `purge_archiving` (feature `archive`) writes each partition it may drop to a file,
//! synced to disk, and then drops only those partitions, each only if it still holds
//! exactly the rows written; it deletes no event row by row.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use crate::error::StorageError;

/// How long a purge step waits for a lock before it leaves its work to a later purge: at
/// most this long does a gateway's write wait behind a purge's lock request.
pub const LOCK_WAIT: Duration = Duration::from_millis(100);
/// How many times a step that found a lock held is tried, and the pause between tries.
const BUSY_ATTEMPTS: u32 = 3;
const BUSY_PAUSE: Duration = Duration::from_millis(200);
/// Purged sessions whose trails one step deletes at most (each takes a lock).
const TRAIL_BATCH: i32 = 256;

/// What a recorded purge tells of the sessions whose trails a step may delete (see
/// [`purge_before_recorded`]).
pub type RecordTrails<'a> = dyn FnMut(&[Uuid]) -> std::io::Result<()> + Send + 'a;

/// Whether a purge also deletes the audit events of the sessions it deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventRetention {
    /// Keep every event (the default): the reports still see the purged sessions' history.
    #[default]
    Keep,
    /// Delete the whole trails of sessions that no longer exist, once every event of a
    /// trail was recorded before the cutoff and occurred before yesterday.
    Delete,
}

/// What a purge deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PurgeReport {
    /// Sessions deleted.
    pub sessions: u64,
    /// Audit events deleted (0 unless [`EventRetention::Delete`]).
    pub events: u64,
    /// Steps left to a later purge because a lock they needed stayed held (a reader, a late
    /// event, a rollup in the way): partitions, or batches of trails.
    pub busy: u64,
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
    /// The database refused or could not be reached. The steps that ended before it stay
    /// done; nothing of the one in flight is.
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
    /// The record of the trails removed could not be written; nothing more was deleted.
    #[error("writing the purge record failed")]
    Record(#[source] std::io::Error),
}

/// Deletes the sessions that ended before `cutoff` and, with [`EventRetention::Delete`],
/// the whole trails of the sessions gone (see the module's invariants), in short steps.
/// Live sessions are never touched. A store that still caches a purged session keeps
/// answering from its cached, terminal state, which denies every call.
///
/// # Errors
/// [`PurgeError::CutoffInFuture`] (checked by PostgreSQL against its own clock, so a
/// skewed gateway clock cannot purge early) before anything is deleted, or the storage
/// error (the steps before it stay done).
pub async fn purge_before(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    events: EventRetention,
) -> Result<PurgeReport, PurgeError> {
    purge(pool, cutoff, events, None).await
}

/// [`purge_before`], telling `record` the sessions whose trails a step may delete before it
/// runs (and any it deleted beyond them after), so that a record kept beside the
/// checkpoints ([`checkpoint::PurgeRecord`](crate::operator::checkpoint::PurgeRecord))
/// names every trail that went: `verify --against` tells them from trails that vanished.
///
/// # Errors
/// As [`purge_before`]; [`PurgeError::Record`] when `record` fails (the step it was about
/// does not run).
pub async fn purge_before_recorded(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    events: EventRetention,
    record: &mut RecordTrails<'_>,
) -> Result<PurgeReport, PurgeError> {
    purge(pool, cutoff, events, Some(record)).await
}

/// [`purge_before`], recording the trails it removes in `record` if there is one.
async fn purge(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    events: EventRetention,
    mut record: Option<&mut RecordTrails<'_>>,
) -> Result<PurgeReport, PurgeError> {
    let mut report = PurgeReport {
        sessions: purge_sessions(pool, cutoff).await?,
        ..PurgeReport::default()
    };
    if events == EventRetention::Keep {
        return Ok(report);
    }
    let days = sqlx::query_scalar!(
        r#"SELECT day AS "day!" FROM arbiter.purge_partition_candidates($1)"#,
        cutoff
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?;
    for day in days {
        purge_partition(pool, cutoff, day, None, &mut report, record.as_deref_mut()).await?;
    }
    purge_trails(pool, cutoff, &mut report, record).await?;
    roll_up_again(pool).await;
    Ok(report)
}

/// Step 1: the sessions that are over.
async fn purge_sessions(pool: &PgPool, cutoff: DateTime<Utc>) -> Result<u64, PurgeError> {
    let in_step = async {
        let mut tx = super::unhurried(pool).await?;
        let deleted =
            sqlx::query_scalar!(r#"SELECT arbiter.purge_sessions($1) AS "deleted!""#, cutoff)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok::<_, StorageError>(deleted)
    };
    match in_step.await {
        // ROW_COUNT is never negative.
        Ok(deleted) => Ok(u64::try_from(deleted).unwrap_or(0)),
        Err(StorageError::Constraint { name, .. }) if name == "purge_cutoff_in_past" => {
            Err(PurgeError::CutoffInFuture { cutoff })
        }
        Err(other) => Err(other.into()),
    }
}

/// What one step of a purge answered.
struct Step {
    outcome: String,
    events: i64,
    sessions: Vec<Uuid>,
}

/// Step 2: one day's partition, dropped whole if it may go (`archived_rows`: only if it
/// still holds that many rows); tried again while busy.
async fn purge_partition(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    day: NaiveDate,
    archived_rows: Option<i64>,
    report: &mut PurgeReport,
    mut record: Option<&mut RecordTrails<'_>>,
) -> Result<bool, PurgeError> {
    // The trails it may delete, recorded before they go (an event committed since is late,
    // and keeps the partition).
    let mut trails = Vec::new();
    if let Some(record) = record.as_deref_mut() {
        trails = sqlx::query_scalar!(
            r#"SELECT session_id AS "session_id!" FROM arbiter.session_events
                WHERE session_day = $1 GROUP BY session_id"#,
            day
        )
        .fetch_all(pool)
        .await
        .map_err(StorageError::from)?;
        record(&trails).map_err(PurgeError::Record)?;
    }
    let listed = record.is_some();
    let step = busy_retried(report, || async {
        let mut tx = super::unhurried(pool).await?;
        let step = sqlx::query!(
            r#"SELECT outcome AS "outcome!", events AS "events!", sessions AS "sessions!"
                 FROM arbiter.purge_partition($1, $2, $3, make_interval(secs => $4), $5)"#,
            day,
            cutoff,
            archived_rows,
            LOCK_WAIT.as_secs_f64(),
            listed
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Step {
            outcome: step.outcome,
            events: step.events,
            sessions: step.sessions,
        })
    })
    .await?;
    if step.outcome != "dropped" {
        return Ok(false);
    }
    if let Some(record) = record {
        record_beyond(&trails, &step.sessions, record)?;
    }
    report.events += u64::try_from(step.events).unwrap_or(0);
    Ok(true)
}

/// Step 3: the trails of sessions gone whose partition stays, day by day (the days of
/// `arbiter.purge_trail_days`), a batch at a time, until a day has none left or a batch
/// deletes nothing.
async fn purge_trails(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    report: &mut PurgeReport,
    mut record: Option<&mut RecordTrails<'_>>,
) -> Result<(), PurgeError> {
    let days = sqlx::query_scalar!(
        r#"SELECT day AS "day!" FROM arbiter.purge_trail_worklist($1) AS day"#,
        cutoff
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?;
    for day in days {
        loop {
            let candidates = {
                let mut tx = super::unhurried(pool).await?;
                let rows = sqlx::query!(
                    r#"SELECT session_id AS "session_id!", session_day AS "session_day!"
                         FROM arbiter.purge_trail_candidates($1, $2, $3)"#,
                    cutoff,
                    day,
                    TRAIL_BATCH
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(StorageError::from)?;
                tx.commit().await.map_err(StorageError::from)?;
                rows
            };
            if candidates.is_empty() {
                break;
            }
            let sessions: Vec<Uuid> = candidates.iter().map(|c| c.session_id).collect();
            let days: Vec<NaiveDate> = candidates.iter().map(|c| c.session_day).collect();
            if let Some(record) = record.as_deref_mut() {
                record(&sessions).map_err(PurgeError::Record)?;
            }
            let step = busy_retried(report, || async {
                let mut tx = super::unhurried(pool).await?;
                let step = sqlx::query!(
                    r#"SELECT outcome AS "outcome!", events AS "events!", purged AS "purged!"
                         FROM arbiter.purge_trails($1, $2, $3, make_interval(secs => $4))"#,
                    cutoff,
                    &sessions,
                    &days,
                    LOCK_WAIT.as_secs_f64()
                )
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Step {
                    outcome: step.outcome,
                    events: step.events,
                    sessions: step.purged,
                })
            })
            .await?;
            report.events += u64::try_from(step.events).unwrap_or(0);
            // A batch that deleted nothing (busy, or every trail kept meanwhile) would be
            // listed again: the day is left to a later purge.
            if step.outcome != "deleted" || step.sessions.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

/// Runs `step` until it is not busy, at most [`BUSY_ATTEMPTS`] times; counts a step that
/// stayed busy in `report`.
async fn busy_retried<F, Fut>(report: &mut PurgeReport, step: F) -> Result<Step, PurgeError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Step, StorageError>>,
{
    let mut attempt = 1;
    loop {
        let answered = step().await?;
        if answered.outcome != "busy" {
            return Ok(answered);
        }
        if attempt >= BUSY_ATTEMPTS {
            report.busy += 1;
            return Ok(answered);
        }
        attempt += 1;
        tokio::time::sleep(BUSY_PAUSE).await;
    }
}

/// Records the sessions of `deleted` that `recorded` did not name (a trail that gained
/// its first event between the two reads).
fn record_beyond(
    recorded: &[Uuid],
    deleted: &[Uuid],
    record: &mut RecordTrails<'_>,
) -> Result<(), PurgeError> {
    let recorded: std::collections::HashSet<&Uuid> = recorded.iter().collect();
    let beyond: Vec<Uuid> = deleted
        .iter()
        .filter(|id| !recorded.contains(id))
        .copied()
        .collect();
    if beyond.is_empty() {
        return Ok(());
    }
    record(&beyond).map_err(PurgeError::Record)
}

/// Counts again the days the purge removed events of, so the reports read them from
/// rollups again; a failure only leaves them to the next upkeep (they are read raw, and
/// exactly, meanwhile).
async fn roll_up_again(pool: &PgPool) {
    if let Err(err) = super::rollup::roll_up_days(pool).await {
        tracing::warn!(
            error = %crate::error::error_chain(&err),
            "the rollup after a purge failed; the upkeep counts its days again"
        );
    }
}

/// A partition written out by [`purge_archiving`].
#[cfg(feature = "archive")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    archive_and_purge(pool, cutoff, dir, None).await
}

/// [`purge_archiving`], telling `record` the sessions whose trails it drops, as
/// [`purge_before_recorded`] does.
///
/// # Errors
/// As [`purge_archiving`]; [`PurgeError::Record`] when `record` fails.
#[cfg(feature = "archive")]
pub async fn purge_archiving_recorded(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    dir: &std::path::Path,
    record: &mut RecordTrails<'_>,
) -> Result<ArchiveReport, PurgeError> {
    archive_and_purge(pool, cutoff, dir, Some(record)).await
}

/// [`purge_archiving`], recording in `record` if there is one.
#[cfg(feature = "archive")]
async fn archive_and_purge(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
    dir: &std::path::Path,
    mut record: Option<&mut RecordTrails<'_>>,
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

    let mut purge = PurgeReport {
        sessions: purge_sessions(pool, cutoff).await?,
        ..PurgeReport::default()
    };
    for partition in &mut partitions {
        let rows = i64::try_from(partition.events).unwrap_or(i64::MAX);
        partition.dropped = purge_partition(
            pool,
            cutoff,
            partition.day,
            Some(rows),
            &mut purge,
            record.as_deref_mut(),
        )
        .await?;
    }
    roll_up_again(pool).await;
    Ok(ArchiveReport { purge, partitions })
}
