//! Budgets in PostgreSQL: their terms written through `arbiter.budget_put` (which takes the
//! tree's lock; the schema refuses a cycle, a tree too deep, an unknown time zone or
//! parent) and read with their current period's usage. The escrow functions and their
//! invariants are in migration `20261206000005_shared_budgets.sql`.

use std::str::FromStr as _;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::budget::{BudgetId, BudgetTerms, BudgetUsage, BudgetWrite, Period};
use crate::error::StorageError;

/// Creates the budget or replaces its terms.
pub(super) async fn put(
    pool: &PgPool,
    id: &BudgetId,
    terms: &BudgetTerms,
) -> Result<BudgetWrite, StorageError> {
    let limit = i64::try_from(terms.limit)
        .map_err(|_| StorageError::Decode("a budget's limit is out of range".to_owned()))?;
    let created = sqlx::query_scalar!(
        r#"SELECT arbiter.budget_put($1, $2, $3, $4, $5, $6) AS "created!""#,
        id.as_str(),
        terms.parent_id.as_ref().map(BudgetId::as_str),
        limit,
        terms.period.as_str(),
        terms.time_zone,
        terms.unit,
    )
    .fetch_one(pool)
    .await?;
    Ok(if created {
        BudgetWrite::Created
    } else {
        BudgetWrite::Replaced
    })
}

/// Every budget with its current period's usage, by id; only `id`'s when given.
pub(super) async fn usage(
    pool: &PgPool,
    id: Option<&BudgetId>,
) -> Result<Vec<BudgetUsage>, StorageError> {
    let rows = sqlx::query_file!(
        "src/storage/postgres/sql/budget_usage.sql",
        id.map(BudgetId::as_str)
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            decode(Row {
                budget_id: row.budget_id,
                parent_id: row.parent_id,
                unit_limit: row.unit_limit,
                period: row.period,
                time_zone: row.time_zone,
                unit: row.unit,
                period_start: row.period_start,
                period_end: row.period_end,
                used: row.used,
            })
        })
        .collect()
}

/// A row of `budget_usage.sql`.
struct Row {
    budget_id: String,
    parent_id: Option<String>,
    unit_limit: i64,
    period: String,
    time_zone: String,
    unit: String,
    period_start: DateTime<Utc>,
    period_end: Option<DateTime<Utc>>,
    used: i64,
}

/// A row checked: a value the schema would refuse is a decode error, never a panic.
fn decode(row: Row) -> Result<BudgetUsage, StorageError> {
    let bad = |what: &str| StorageError::Decode(format!("budget {}: {what}", row.budget_id));
    let budget_id = BudgetId::new(row.budget_id.as_str()).map_err(|_| bad("id"))?;
    let parent_id = row
        .parent_id
        .as_deref()
        .map(BudgetId::new)
        .transpose()
        .map_err(|_| bad("parent_id"))?;
    let mut terms = BudgetTerms::new(u64::try_from(row.unit_limit).map_err(|_| bad("limit"))?);
    terms.period = Period::from_str(&row.period).map_err(|_| bad("period"))?;
    terms.parent_id = parent_id;
    terms.unit = row.unit;
    terms.time_zone = row.time_zone;
    Ok(BudgetUsage {
        budget_id,
        terms,
        period_start: row.period_start,
        period_end: row.period_end,
        used: u64::try_from(row.used).map_err(|_| bad("used"))?,
        reserved: 0,
    })
}
