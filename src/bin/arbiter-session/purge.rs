//! `arbiter-session purge`: sessions that ended before a cutoff, and optionally their audit
//! events (archived first, or recorded in the checkpoint file).

use std::path::PathBuf;

use arbiter_session::operator::checkpoint;
use arbiter_session::operator::retention::{self, EventRetention};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::shell::{Failure, parse_cutoff};

/// Options of `arbiter-session purge`.
#[derive(Debug, clap::Args)]
pub(crate) struct PurgeArgs {
    /// The cutoff: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp.
    #[arg(long, value_parser = parse_cutoff)]
    before: DateTime<Utc>,
    /// Also delete the events of deleted sessions recorded before the cutoff.
    #[arg(long)]
    events: bool,
    /// With --events: first write each day's partition that can go whole to
    /// DIR/session_events_YYYYMMDD.jsonl.gz, then drop only those; no event is deleted
    /// row by row (the rest waits until its whole day can go).
    #[arg(long, value_name = "DIR", requires = "events")]
    archive: Option<PathBuf>,
    /// With --events: append to FILE (the checkpoint file) the sessions whose trails
    /// the purge removes, each synced to disk before it goes, so that `verify
    /// --against FILE` tells them from trails that vanished.
    #[arg(long, value_name = "FILE", requires = "events")]
    record: Option<PathBuf>,
}

/// Purges; prints what it deleted and archived on stdout, and what it left busy on stderr.
pub(crate) async fn run(pool: &PgPool, args: PurgeArgs) -> Result<(), Failure> {
    let PurgeArgs {
        before,
        events,
        archive,
        record: record_to,
    } = args;
    let mut record = match &record_to {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
            Some(checkpoint::PurgeRecord::begin(
                std::io::BufWriter::new(file),
                before,
            )?)
        }
        None => None,
    };
    let mut trails = |sessions: &[Uuid]| match record.as_mut() {
        Some(record) => {
            record.trails(sessions)?;
            record.get_mut().get_ref().sync_data()
        }
        None => Ok(()),
    };
    let retention = if events {
        EventRetention::Delete
    } else {
        EventRetention::Keep
    };
    let recording = record_to.is_some();
    let purged = match archive {
        Some(dir) => {
            let report = if recording {
                retention::purge_archiving_recorded(pool, before, &dir, &mut trails).await?
            } else {
                retention::purge_archiving(pool, before, &dir).await?
            };
            for partition in &report.partitions {
                let outcome = if partition.dropped {
                    "dropped"
                } else {
                    "kept: it changed after it was written, or a lock stayed held; a later \
                     purge writes it again"
                };
                println!(
                    "archived {} ({} events) to {}; {outcome}",
                    partition.day,
                    partition.events,
                    partition.path.display()
                );
            }
            report.purge
        }
        // Recording reads each partition's sessions before it goes: only when asked.
        None if recording => {
            retention::purge_before_recorded(pool, before, retention, &mut trails).await?
        }
        None => retention::purge_before(pool, before, retention).await?,
    };
    if let Some(record) = record {
        record
            .finish()?
            .into_inner()
            .map_err(|err| Failure(err.to_string()))?
            .sync_all()?;
    }
    println!(
        "purged {} sessions and {} events that ended before {}",
        purged.sessions,
        purged.events,
        before.to_rfc3339()
    );
    if purged.busy > 0 {
        eprintln!(
            "arbiter-session: {} steps found a lock held (a reader, a late event or a rollup in \
             the way) and were left to a later purge",
            purged.busy
        );
    }
    Ok(())
}
