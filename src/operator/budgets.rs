//! The shared budgets' accounting checked against the audit trail: every unit a share of a
//! budget counts as used is the cost of an allowed call whose event names that share, or
//! of a settlement of a reservation charged to it, and every such cost is counted, exactly
//! once (migrations `20261206000006_session_budgets.sql` and
//! `20261206000007_budget_reservations.sql` add both in the statement that writes the
//! event). `arbiter-session verify` runs it.

use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StorageError;

/// What [`verify_charges`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChargeSummary {
    /// Shares checked (every share ever granted, closed ones included).
    pub shares: u64,
    /// Units their `used` adds up to.
    pub units: u64,
    /// Shares whose `used` is not the sum of the costs of the events naming them, and
    /// events naming a share that does not exist.
    pub mismatched: Vec<ShareMismatch>,
}

impl ChargeSummary {
    /// Whether every share's `used` is the sum of its events' costs.
    pub fn is_exact(&self) -> bool {
        self.mismatched.is_empty()
    }
}

/// A share whose `used` the trail does not explain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShareMismatch {
    /// The share.
    pub share_id: Uuid,
    /// The units charged to it (`used - credited + overrun`); `None` when no such share is
    /// stored (events name it all the same).
    pub used: Option<i64>,
    /// The sum of the costs of the events naming it.
    pub costs: i64,
}

impl std::fmt::Display for ShareMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.used {
            Some(used) => write!(
                f,
                "share {}: used {used}, its events cost {}",
                self.share_id, self.costs
            ),
            None => write!(
                f,
                "share {}: no such share, its events cost {}",
                self.share_id, self.costs
            ),
        }
    }
}

/// Checks every share's `used` against the costs of the events naming it. Reads every
/// event once.
///
/// # Errors
/// The database could not be read.
pub async fn verify_charges(pool: &PgPool) -> Result<ChargeSummary, StorageError> {
    let rows = sqlx::query_file!("src/operator/sql/budget_charges.sql")
        .fetch_all(pool)
        .await?;
    let mut summary = ChargeSummary::default();
    for row in rows {
        if let Some(used) = row.used {
            summary.shares += 1;
            summary.units += u64::try_from(used).unwrap_or(0);
        }
        if row.used != Some(row.costs) {
            summary.mismatched.push(ShareMismatch {
                share_id: row.share_id,
                used: row.used,
                costs: row.costs,
            });
        }
    }
    Ok(summary)
}
