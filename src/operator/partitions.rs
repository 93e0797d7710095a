//! The audit trail's partitions: one per UTC day of the owning sessions' creation, created
//! ahead by `arbiter.ensure_event_partitions`, plus a default partition for a day that had
//! none (see `schema/arbiter.sql` and docs/architecture.md, section 4).
//!
//! Each store's upkeep runs [`ensure`]'s function when the store is first used and then
//! every minute (see
//! [`SessionStoreBuilder::maintenance_interval`](crate::SessionStoreBuilder::maintenance_interval));
//! `arbiter-session upkeep` (or `partitions ensure`) runs it by hand, e.g. from cron where
//! stores run with their upkeep off. Retention drops whole partitions
//! ([`purge_before`](crate::operator::retention::purge_before)).
//!
//! Each partition has its own audit chain trigger, made from one template
//! (`arbiter.install_event_partition_chain`), whose predecessor lookup reads that partition
//! alone, so writing an event locks one partition however many days are kept. [`ensure`]
//! keeps those triggers in step with the partitions.

use chrono::NaiveDate;
use serde::Serialize;
use sqlx::PgPool;

use crate::error::StorageError;

/// The most days ahead [`ensure`] creates (the SQL function refuses more).
pub const MAX_DAYS_AHEAD: u16 = 366;

/// Creates the partitions from yesterday to `days_ahead` days from today (UTC) that do not
/// exist yet; returns how many it created. Safe to run from several processes at once.
///
/// It also installs the audit chain trigger of any partition without one (a partition
/// attached by hand; until then, events written to it are refused by the
/// `session_events_chained` constraint) and drops the trigger functions of partitions that
/// are gone (a purge drops the table, not its function).
///
/// # Errors
/// The storage error; `days_ahead` above [`MAX_DAYS_AHEAD`] is refused by the database
/// ([`StorageError::Constraint`] `partition_days_ahead_range`) and creates nothing.
pub async fn ensure(pool: &PgPool, days_ahead: u16) -> Result<u32, StorageError> {
    let created = sqlx::query_scalar!(
        r#"SELECT arbiter.ensure_event_partitions($1) AS "created!""#,
        i32::from(days_ahead)
    )
    .fetch_one(pool)
    .await?;
    Ok(u32::try_from(created).unwrap_or(0))
}

/// One partition of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventPartition {
    /// Its table, e.g. `arbiter.session_events_20261201`.
    pub name: String,
    /// The creation day of the sessions whose events it holds; `None` for the default
    /// partition.
    pub day: Option<NaiveDate>,
    /// Rows, as last estimated by PostgreSQL's statistics (0 before the first analyze).
    pub estimated_rows: i64,
    /// Its size on disk with its indexes.
    pub bytes: i64,
}

/// Every partition, the default one first, then by day.
///
/// # Errors
/// The storage error.
pub async fn list(pool: &PgPool) -> Result<Vec<EventPartition>, StorageError> {
    let rows = sqlx::query_file!("src/operator/sql/event_partitions.sql")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| EventPartition {
            name: row.name,
            day: row.day,
            estimated_rows: row.estimated_rows,
            bytes: row.bytes,
        })
        .collect())
}

/// Whether the default partition holds any event: the events of sessions created on a
/// day that had no partition yet (maintenance did not run, or a store's clock is far off).
/// They are kept and reported like the others, but retention can delete them only row by
/// row.
///
/// # Errors
/// The storage error.
pub async fn default_partition_used(pool: &PgPool) -> Result<bool, StorageError> {
    let used = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM arbiter.session_events_default) AS "used!""#
    )
    .fetch_one(pool)
    .await?;
    Ok(used)
}

impl crate::operator::report::Tabular for EventPartition {
    const COLUMNS: &'static [&'static str] = &["partition", "day", "estimated_rows", "bytes"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.day.map(|day| day.to_string()).unwrap_or_default(),
            self.estimated_rows.to_string(),
            self.bytes.to_string(),
        ]
    }
}
