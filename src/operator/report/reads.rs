//! The reads: one statement per report over the reporting views (the SQL is in `sql/`).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::rows::{
    AgentDay, BudgetPeriod, DenialDay, EventRecord, MinuteCount, SessionLine, SessionRecord,
    ToolDay, ToolUse, Utilization,
};
use crate::error::StorageError;

/// Which rows a report covers: every row by default ([`ReportFilter::default`]), narrowed
/// by the `with_*` setters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReportFilter {
    /// Only this agent's sessions or events.
    pub agent: Option<Uuid>,
    /// Only from this UTC day on (sessions created, events occurred).
    pub since: Option<NaiveDate>,
    /// Only up to this UTC day, that day included.
    pub until: Option<NaiveDate>,
}

impl ReportFilter {
    /// Only `agent`'s rows, or every agent's for `None`.
    #[must_use]
    pub fn with_agent(mut self, agent: Option<Uuid>) -> Self {
        self.agent = agent;
        self
    }

    /// Only rows from this UTC day on, or every day's for `None`.
    #[must_use]
    pub fn with_since(mut self, since: Option<NaiveDate>) -> Self {
        self.since = since;
        self
    }

    /// Only rows up to this UTC day, that day included, or every day's for `None`.
    #[must_use]
    pub fn with_until(mut self, until: Option<NaiveDate>) -> Self {
        self.until = until;
        self
    }
}

/// One page of a report: at most `limit` rows (every one for `None`) after the row whose
/// key is `after` (from the first for `None`), in the report's order. Each report names its
/// key; a key is a position, so a page is the same whichever rows were added before it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Page<K> {
    /// The key of the last row of the page before.
    pub after: Option<K>,
    /// Most rows in the page.
    pub limit: Option<i64>,
}

impl<K> Page<K> {
    /// Every row.
    #[must_use]
    pub fn all() -> Self {
        Page {
            after: None,
            limit: None,
        }
    }

    /// At most `limit` rows after the row whose key is `after`.
    #[must_use]
    pub fn after(after: Option<K>, limit: i64) -> Self {
        Page {
            after,
            limit: Some(limit),
        }
    }
}

/// A transaction for one report, with PostgreSQL's JIT compiler off and room to sort in
/// memory.
///
/// * JIT: the views' plans span every partition of the audit trail, so their cost
///   estimates pass the JIT thresholds while the queries take milliseconds: with JIT, a
///   report over 180,000 events spent 9 s compiling and 12 ms running (docs/reporting.md,
///   "Reading the views").
/// * `work_mem` 64 MB (the server's default is 4 MB): a report sorts or hashes today's raw
///   events and, for utilization, a row per session; past 4 MB the sort goes to disk
///   (60,000 of today's events sorted for the agents report: 4.3 MB, an external merge).
///   It bounds each sort or hash of the report's one statement, on an operator's
///   connection, for that transaction only.
async fn report_transaction(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StorageError> {
    let mut tx = crate::storage::begin_transaction(pool).await?;
    sqlx::query!(
        r#"SELECT set_config('jit', 'off', true) AS "jit", set_config('work_mem', '64MB', true) AS "work_mem""#
    )
    .fetch_one(&mut *tx)
    .await?;
    Ok(tx)
}

/// Per-session utilization, oldest session first: every session [`utilization_page`]
/// would list.
///
/// # Errors
/// The database could not be read.
pub async fn utilization(
    pool: &PgPool,
    filter: ReportFilter,
) -> Result<Vec<Utilization>, StorageError> {
    utilization_page(pool, filter, Page::all()).await
}

/// One page of per-session utilization, oldest session first; a row's key is its
/// `(created_at, session_id)`. `since` and `until` bound the day each session was created.
///
/// # Errors
/// The database could not be read.
pub async fn utilization_page(
    pool: &PgPool,
    filter: ReportFilter,
    page: Page<(DateTime<Utc>, Uuid)>,
) -> Result<Vec<Utilization>, StorageError> {
    let (after_at, after_id) = page.after.unzip();
    let mut tx = report_transaction(pool).await?;
    let rows = sqlx::query_file!(
        "src/operator/report/sql/utilization.sql",
        filter.agent,
        filter.since,
        filter.until,
        after_at,
        after_id,
        page.limit
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| Utilization {
            session_id: r.session_id,
            agent_id: r.agent_id,
            status: r.status,
            call_budget: r.call_budget,
            calls_made: r.calls_made,
            budget_used_pct: r.budget_used_pct,
            budget_exhausted: r.budget_exhausted,
            created_at: r.created_at,
            ended_at: r.ended_at,
            duration_secs: r.duration_secs,
            denials: r.denials,
            tool_use: r.tool_use.map(|Json(tools)| tools).unwrap_or_default(),
        })
        .collect())
}

/// Per-agent activity per day, by day then agent: every row [`agent_activity_page`] would
/// list.
///
/// # Errors
/// The database could not be read.
pub async fn agent_activity(
    pool: &PgPool,
    filter: ReportFilter,
) -> Result<Vec<AgentDay>, StorageError> {
    agent_activity_page(pool, filter, Page::all()).await
}

/// One page of per-agent activity per day, by day then agent; a row's key is its
/// `(day, agent_id)`.
///
/// # Errors
/// The database could not be read.
pub async fn agent_activity_page(
    pool: &PgPool,
    filter: ReportFilter,
    page: Page<(NaiveDate, Uuid)>,
) -> Result<Vec<AgentDay>, StorageError> {
    let (after_day, after_agent) = page.after.unzip();
    let mut tx = report_transaction(pool).await?;
    let rows = sqlx::query_file_as!(
        AgentDay,
        "src/operator/report/sql/agent_activity.sql",
        filter.agent,
        filter.since,
        filter.until,
        after_day,
        after_agent,
        page.limit
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Calls per tool per day (over every agent, or the filter's), by day then tool: every row
/// [`tool_usage_page`] would list.
///
/// # Errors
/// The database could not be read.
pub async fn tool_usage(pool: &PgPool, filter: ReportFilter) -> Result<Vec<ToolDay>, StorageError> {
    tool_usage_page(pool, filter, Page::all()).await
}

/// One page of calls per tool per day, by day then tool; a row's key is its `(day, tool)`.
///
/// # Errors
/// The database could not be read.
pub async fn tool_usage_page(
    pool: &PgPool,
    filter: ReportFilter,
    page: Page<(NaiveDate, String)>,
) -> Result<Vec<ToolDay>, StorageError> {
    let (after_day, after_tool) = page.after.unzip();
    let mut tx = report_transaction(pool).await?;
    let rows = sqlx::query_file_as!(
        ToolDay,
        "src/operator/report/sql/tool_usage.sql",
        filter.agent,
        filter.since,
        filter.until,
        after_day,
        after_tool,
        page.limit
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Denials per reason per day (over every agent, or the filter's), by day then reason:
/// every row [`denials_page`] would list.
///
/// # Errors
/// The database could not be read.
pub async fn denials(pool: &PgPool, filter: ReportFilter) -> Result<Vec<DenialDay>, StorageError> {
    denials_page(pool, filter, Page::all()).await
}

/// One page of denials per reason per day, by day then reason; a row's key is its
/// `(day, reason)`.
///
/// # Errors
/// The database could not be read.
pub async fn denials_page(
    pool: &PgPool,
    filter: ReportFilter,
    page: Page<(NaiveDate, String)>,
) -> Result<Vec<DenialDay>, StorageError> {
    let (after_day, after_reason) = page.after.unzip();
    let mut tx = report_transaction(pool).await?;
    let rows = sqlx::query_file_as!(
        DenialDay,
        "src/operator/report/sql/denials.sql",
        filter.agent,
        filter.since,
        filter.until,
        after_day,
        after_reason,
        page.limit
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Each budget's use per period, by budget then period: every row [`budget_periods_page`]
/// would list.
///
/// # Errors
/// The database could not be read.
pub async fn budget_periods(
    pool: &PgPool,
    filter: ReportFilter,
) -> Result<Vec<BudgetPeriod>, StorageError> {
    budget_periods_page(pool, filter, Page::all()).await
}

/// One page of each budget's use per period, by budget then period; a row's key is its
/// `(budget_id, period_start)`. With `filter.since`, only the periods that end after that
/// day began (UTC); with `filter.until`, only those that start before the day after it
/// began. The agent filter does not apply.
///
/// # Errors
/// The database could not be read.
pub async fn budget_periods_page(
    pool: &PgPool,
    filter: ReportFilter,
    page: Page<(String, DateTime<Utc>)>,
) -> Result<Vec<BudgetPeriod>, StorageError> {
    let (after_budget, after_start) = page.after.unzip();
    let rows = sqlx::query_file_as!(
        BudgetPeriod,
        "src/operator/report/sql/budget_periods.sql",
        filter.since,
        filter.until,
        after_budget,
        after_start,
        page.limit
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// One stored session, `None` if there is none (never created, or purged).
///
/// # Errors
/// The database could not be read.
pub async fn session(
    pool: &PgPool,
    session_id: Uuid,
) -> Result<Option<SessionRecord>, StorageError> {
    let row = sqlx::query_file_as!(
        SessionRecord,
        "src/operator/report/sql/session.sql",
        session_id
    )
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// Every event of one session in the order they happened (denials are recorded later
/// than they occur, so `event_id` order would show them late): its whole audit trail.
///
/// # Errors
/// The database could not be read.
pub async fn session_events(
    pool: &PgPool,
    session_id: Uuid,
) -> Result<Vec<EventRecord>, StorageError> {
    let rows = sqlx::query_file_as!(
        EventRecord,
        "src/operator/report/sql/session_events.sql",
        session_id
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// At most `limit` events of session `session_id` after the position `after` (an event's
/// `occurred_at` and `event_id`; the start for `None`), in the order of
/// [`session_events`]: one page of its audit trail.
///
/// # Errors
/// The database could not be read.
pub async fn session_events_page(
    pool: &PgPool,
    session_id: Uuid,
    after: Option<(DateTime<Utc>, i64)>,
    limit: i64,
) -> Result<Vec<EventRecord>, StorageError> {
    // No event is older than the epoch.
    let (at, id) = after.unwrap_or((DateTime::<Utc>::UNIX_EPOCH, i64::MIN));
    let rows = sqlx::query_file_as!(
        EventRecord,
        "src/operator/report/sql/session_events_page.sql",
        session_id,
        at,
        id,
        limit
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Which sessions [`sessions_page`] lists: every one by default, narrowed by each field
/// that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionsFilter {
    /// Only this agent's.
    pub agent: Option<Uuid>,
    /// Only those with this status at the page's instant: `active` (and within its time
    /// limit), `closed`, or `expired` (marked, or active past its time limit).
    pub status: Option<String>,
    /// Only those charged to this shared budget.
    pub budget_id: Option<String>,
    /// Only those created at or after this instant.
    pub created_since: Option<DateTime<Utc>>,
}

/// At most `limit` sessions that `filter` admits, newest first, created before the
/// position `before` (a session's `created_at` and id; the newest for `None`): one page,
/// each session with its status at `now`.
///
/// # Errors
/// The database could not be read.
pub async fn sessions_page(
    pool: &PgPool,
    filter: &SessionsFilter,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
    now: DateTime<Utc>,
) -> Result<Vec<SessionLine>, StorageError> {
    // No session is created after the year 9999.
    let (at, id) = before.unwrap_or((
        DateTime::<Utc>::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
        Uuid::max(),
    ));
    let rows = sqlx::query_file_as!(
        SessionLine,
        "src/operator/report/sql/sessions_page.sql",
        filter.agent,
        filter.status.as_deref(),
        filter.budget_id.as_deref(),
        filter.created_since,
        at,
        id,
        limit,
        now
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Calls allowed and denied requests per minute since `since`, by minute then outcome: a
/// row for each minute and outcome that has any.
///
/// # Errors
/// The database could not be read.
pub async fn calls_by_minute(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<MinuteCount>, StorageError> {
    let mut tx = report_transaction(pool).await?;
    let rows = sqlx::query_file_as!(
        MinuteCount,
        "src/operator/report/sql/calls_by_minute.sql",
        since
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Sessions live at `now` over every process: active, and not past their time limit.
///
/// # Errors
/// The database could not be read.
pub async fn live_sessions(pool: &PgPool, now: DateTime<Utc>) -> Result<i64, StorageError> {
    let row = sqlx::query_file!("src/operator/report/sql/live_sessions.sql", now)
        .fetch_one(pool)
        .await?;
    Ok(row.live)
}
