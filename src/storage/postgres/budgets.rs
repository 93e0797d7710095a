//! Budgets in PostgreSQL: their terms written through `arbiter.budget_put` (which takes the
//! tree's lock; the schema refuses a cycle, a tree too deep, an unknown time zone or
//! parent) and read with their current period's usage. The escrow functions and their
//! invariants are in migrations `20261206000005_shared_budgets.sql` and
//! `20261206000007_budget_reservations.sql`.

use std::str::FromStr as _;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::budget::{BudgetId, BudgetTerms, BudgetUsage, BudgetWrite, Period};
use crate::error::StorageError;
use crate::storage::{ShareGrant, ShareRequest, StoredReservation};

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

/// Grants units to a share (`arbiter.budget_grant`).
pub(super) async fn grant(
    pool: &PgPool,
    request: ShareRequest<'_>,
) -> Result<ShareGrant, StorageError> {
    let units = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    let lease = sqlx::postgres::types::PgInterval::try_from(request.lease)
        .map_err(|_| StorageError::Decode("a share's lease is out of range".to_owned()))?;
    let row = sqlx::query!(
        r#"SELECT share_open AS "share_open!", added AS "added!", granted AS "granted!",
                  room AS "room!", tightest, valid_until
             FROM arbiter.budget_grant($1, $2, $3, $4, $5, $6)"#,
        request.share_id,
        request.holder,
        request.budget_id.as_str(),
        units(request.need),
        units(request.want),
        lease,
    )
    .fetch_one(pool)
    .await?;
    let count = |name: &str, value: i64| {
        u64::try_from(value)
            .map_err(|_| StorageError::Decode(format!("budget_grant: {name} is {value}")))
    };
    Ok(ShareGrant {
        share_open: row.share_open,
        added: count("added", row.added)?,
        granted: count("granted", row.granted)?,
        room: count("room", row.room)?,
        tightest: row
            .tightest
            .map(BudgetId::new)
            .transpose()
            .map_err(|_| StorageError::Decode("budget_grant: tightest".to_owned()))?,
        period_end: row.valid_until,
    })
}

/// Gives back a share's units beyond `keep` (`arbiter.budget_share_release`).
pub(super) async fn release(
    pool: &PgPool,
    share_id: uuid::Uuid,
    keep: u64,
    close: bool,
) -> Result<u64, StorageError> {
    let returned = sqlx::query_scalar!(
        r#"SELECT arbiter.budget_share_release($1, $2, $3) AS "returned!""#,
        share_id,
        i64::try_from(keep).unwrap_or(i64::MAX),
        close
    )
    .fetch_one(pool)
    .await?;
    // The function never returns a negative count.
    Ok(u64::try_from(returned).unwrap_or(0))
}

/// The reservation `reservation_id`, if one was made.
pub(super) async fn reservation(
    pool: &PgPool,
    reservation_id: uuid::Uuid,
) -> Result<Option<StoredReservation>, StorageError> {
    let row = sqlx::query!(
        "SELECT reservation_id, session_id, share_id, estimate, expires_at, charged
           FROM arbiter.budget_reservations WHERE reservation_id = $1",
        reservation_id
    )
    .fetch_optional(pool)
    .await?;
    row.map(|row| {
        let bad = |what: &str| {
            StorageError::Decode(format!("reservation {}: {what}", row.reservation_id))
        };
        Ok(StoredReservation {
            reservation_id: row.reservation_id,
            session_id: row.session_id,
            share_id: row.share_id,
            estimate: u64::try_from(row.estimate).map_err(|_| bad("estimate"))?,
            expires_at: row.expires_at,
            charged: row
                .charged
                .map(|charged| u64::try_from(charged).map_err(|_| bad("charged")))
                .transpose()?,
        })
    })
    .transpose()
}

/// Every budget with its current period's usage, by id; only `id`'s when given.
pub(super) async fn usage(
    pool: &PgPool,
    id: Option<&BudgetId>,
) -> Result<Vec<BudgetUsage>, StorageError> {
    let rows = sqlx::query_file_as!(
        Row,
        "src/storage/postgres/sql/budget_usage.sql",
        id.map(BudgetId::as_str)
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(decode).collect()
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
    reserved: i64,
    overrun: i64,
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
        reserved: u64::try_from(row.reserved).map_err(|_| bad("reserved"))?,
        overrun: u64::try_from(row.overrun).map_err(|_| bad("overrun"))?,
    })
}
