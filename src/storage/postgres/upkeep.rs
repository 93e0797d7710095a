//! The PostgreSQL storage's upkeep ([`Storage::maintain`](crate::Storage::maintain)): the
//! audit trail's partitions ahead, then the rollups the reports read (the days that are
//! over, then today so far). Each store's upkeep runs [`run`] through `PgStorage`; the
//! operator's side re-exports the rollup as [`crate::operator::rollup`] (whose
//! documentation says what a rollup keeps and why) for `arbiter-session rollup` and
//! `upkeep`. It lives with the storage because the store's upkeep runs it from below: the
//! storage layer imports nothing above it.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::transaction::unhurried;
use crate::error::StorageError;

/// One upkeep run: creates the audit trail's partitions for yesterday through a week ahead
/// that do not exist yet (`arbiter.ensure_event_partitions`), then rolls up the days that
/// are over and today so far ([`roll_up`]). A busy day or a busy today is left to the next
/// run, not an error.
///
/// # Errors
/// The storage error; what was done before it stays done.
pub(crate) async fn run(pool: &PgPool) -> Result<(), StorageError> {
    sqlx::query_scalar!("SELECT arbiter.ensure_event_partitions()")
        .fetch_one(pool)
        .await?;
    let rollup = roll_up(pool).await?;
    if let Some(day) = rollup.stopped_at {
        tracing::info!(%day, "rollup stopped at a busy day (inserts or another rollup in flight); the next upkeep goes on");
    } else if rollup.today_until.is_none() {
        // Most often another process's upkeep rolling today up at the same time.
        tracing::debug!(
            "today's rollup is busy (another rollup of it, or an insert of today's events, in flight); the next upkeep goes on"
        );
    }
    Ok(())
}

/// How often a busy day (inserts of its events, or another rollup of it, in flight) is
/// tried again before the rollup stops at it (the next rollup goes on from there).
const BUSY_ATTEMPTS: u32 = 5;
/// The pause between two attempts at a busy day.
const BUSY_PAUSE: Duration = Duration::from_millis(200);

/// One day rolled up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RolledDay {
    /// The UTC day.
    pub day: NaiveDate,
    /// Its events, all counted.
    pub events: i64,
}

/// What [`roll_up`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RollupOutcome {
    /// The days sealed, oldest first.
    pub rolled: Vec<RolledDay>,
    /// The day it stopped at because it stayed busy (inserts of its events, or another
    /// process's rollup of it, in flight); it and the days after it stay with the raw
    /// events until the next rollup.
    pub stopped_at: Option<NaiveDate>,
    /// The instant today is rolled up to: the reports read today's events before it from
    /// the rollup and the rest raw. `None` when it was not rolled up: a day before it is
    /// not sealed (busy, see `stopped_at`, or the trail's first day: no day is over yet),
    /// or another rollup of today or an insert of today's events held it up for 10 s.
    pub today_until: Option<DateTime<Utc>>,
}

/// Rolls up every day that is over and not sealed yet, oldest first, one transaction per
/// day, then today up to a few seconds ago, then summarizes the new BRIN ranges of the
/// partitions holding today's events (and analyzes one that has no statistics yet). Safe to run from several processes at once,
/// and beside the gateways: a day is counted while no insert of one of its events is in
/// flight, and an insert waits at most for one day's count; today's rollup waits for the
/// inserts in flight when it starts, and only a late event waits for it.
///
/// # Errors
/// The storage error; the days sealed before it stay sealed.
pub async fn roll_up(pool: &PgPool) -> Result<RollupOutcome, StorageError> {
    let mut outcome = roll_up_days(pool).await?;
    if outcome.stopped_at.is_some() {
        return Ok(outcome);
    }
    // Today's rollup is read only once every day before it is sealed.
    let mut tx = unhurried(pool).await?;
    outcome.today_until = sqlx::query_scalar!("SELECT arbiter.rollup_today()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    // What the reports' raw read of today needs from the partitions (BRIN summaries,
    // statistics), where autovacuum has not given it yet: migration 20261203000010.
    let mut tx = unhurried(pool).await?;
    sqlx::query_scalar!("SELECT arbiter.refresh_recent_partitions()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// The days that are over and not sealed, oldest first, one transaction per day, up to
/// the first that stays busy; nothing of today.
pub(crate) async fn roll_up_days(pool: &PgPool) -> Result<RollupOutcome, StorageError> {
    // Before the first rollup this finds the trail's first day, which reads every event.
    let mut tx = unhurried(pool).await?;
    let pending =
        sqlx::query_scalar!(r#"SELECT day AS "day!" FROM arbiter.rollup_pending_days() AS day"#)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    let mut outcome = RollupOutcome::default();
    for day in pending {
        match roll_up_day(pool, day).await? {
            Some(events) => outcome.rolled.push(RolledDay { day, events }),
            None => {
                // The horizon is the first day not sealed: sealing later days would not
                // move it, so the rollup stops here.
                outcome.stopped_at = Some(day);
                return Ok(outcome);
            }
        }
    }
    Ok(outcome)
}

/// One day, tried [`BUSY_ATTEMPTS`] times while it is busy; `None` if it stayed busy.
async fn roll_up_day(pool: &PgPool, day: NaiveDate) -> Result<Option<i64>, StorageError> {
    for attempt in 1..=BUSY_ATTEMPTS {
        let mut tx = unhurried(pool).await?;
        let events = sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", day)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        if events.is_some() || attempt == BUSY_ATTEMPTS {
            return Ok(events);
        }
        tokio::time::sleep(BUSY_PAUSE).await;
    }
    Ok(None)
}
