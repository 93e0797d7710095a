//! Rollups for reports: the daily aggregates behind `agent_daily_activity`,
//! `tool_daily_usage` and `denials_by_reason`, and each session's denials and close time
//! behind `session_utilization`, kept for days that are over, so a report reads one row per
//! agent, tool, reason or session and day instead of the events. The views read rollups
//! before the *rollup horizon* and raw events from it on; their answers are exactly those
//! of the raw events (migration `20261201000003_rollups.sql` states why; the functions as
//! they are now are in `schema/arbiter.sql`, listed in docs/architecture.md, section 4).
//!
//! Today is rolled up as it goes (the design is migration
//! `20261201000009_rollup_today.sql`): up to a few seconds before each rollup, so that one
//! day's report reads the events since the last rollup, not the whole day's. The rollup
//! then summarizes the new BRIN ranges of the partitions that hold today's events, and
//! analyzes one that has no statistics yet, so that the report finds those events without
//! reading the rest of the day.
//!
//! The store rolls up at start and then every minute with its upkeep (see
//! [`SessionStoreBuilder::maintenance_interval`](crate::SessionStoreBuilder::maintenance_interval));
//! `arbiter-session rollup` does it by hand, e.g. from cron where stores run with upkeep off.
//! A late event (one that occurred on a day already rolled up, or before the instant today
//! is rolled up to) sends its day back to raw events until the next rollup.

use chrono::NaiveDate;
use sqlx::PgPool;

pub(crate) use crate::storage::upkeep::roll_up_days;
pub use crate::storage::upkeep::{RolledDay, RollupOutcome, roll_up};

use crate::error::StorageError;

/// The rollup horizon: the first UTC day the reporting views read from raw events (every
/// day before it is read from rollups); `None` before the first rollup, when they read
/// raw events only.
///
/// # Errors
/// The storage error.
pub async fn horizon(pool: &PgPool) -> Result<Option<NaiveDate>, StorageError> {
    // -infinity, before the first rollup, decodes as no day.
    let day = sqlx::query_scalar!(
        r#"SELECT CASE WHEN isfinite(h) THEN h END AS day FROM arbiter.rollup_horizon() AS h"#
    )
    .fetch_one(pool)
    .await?;
    Ok(day)
}
