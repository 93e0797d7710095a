//! One session's audit trail in totals, for the summary a close answers with.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StorageError;

/// What one session's trail adds up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TrailTotals {
    /// Denied attempts, by reason (`budget`, `tool`, `rate`, `shared_budget`, …).
    pub(crate) denials: BTreeMap<String, u64>,
    /// Units charged to the session's shared budget: allowed calls' and reservations'
    /// costs, with settlements' differences.
    pub(crate) budget_units: u64,
}

/// The totals of session `session_id`, created at `created_at` (which names its
/// partition).
pub(super) async fn totals(
    pool: &PgPool,
    session_id: Uuid,
    created_at: DateTime<Utc>,
) -> Result<TrailTotals, StorageError> {
    let rows = sqlx::query_file!(
        "src/storage/postgres/sql/trail_totals.sql",
        session_id,
        created_at
    )
    .fetch_all(pool)
    .await?;
    let mut totals = TrailTotals::default();
    let mut units: i64 = 0;
    for row in rows {
        units = units.saturating_add(row.units);
        if let Some(reason) = row.reason
            && row.denials > 0
        {
            let count = u64::try_from(row.denials)
                .map_err(|_| StorageError::Decode(format!("session {session_id}: denials")))?;
            totals.denials.insert(reason, count);
        }
    }
    // A negative sum would mean settlements released more than was charged, which the
    // schema's share accounting rules out; report it as what it is, not as a count.
    totals.budget_units = u64::try_from(units)
        .map_err(|_| StorageError::Decode(format!("session {session_id}: units charged")))?;
    Ok(totals)
}
