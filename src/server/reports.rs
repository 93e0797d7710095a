//! The console's reads (admin, viewer): the daily reports, read through the same
//! `operator::report` functions as `arbiter-session report`, one page at a time, and the
//! overview of the last hour. The gateway token reads none of them: a gateway decides calls,
//! it does not audit them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::api::{ApiError, BudgetView, ErrorBody, in_four_digit_years};
use super::auth::{Caller, Role};
use super::cursor;
use super::routes::{next_page, page_limit, read_views};
use crate::budget::BudgetUsage;
use crate::error::StorageError;
use crate::operator::report::{
    self, AgentDay, BudgetPeriod, DenialDay, Page, ReportFilter, ToolDay, Utilization,
};

/// `GET /v1/reports/*`: which days, which agent, which page. `agent_id` and `cursor` are
/// stated per route (the budgets report has no agent; each report's cursor has its own
/// pattern, see `cursor`).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ReportQuery {
    /// From this UTC day on (YYYY-MM-DD); absent: from the first.
    since: Option<NaiveDate>,
    /// Up to this UTC day, that day included; absent: to the last. A range that ends
    /// before it starts is empty.
    until: Option<NaiveDate>,
    #[param(ignore)]
    agent_id: Option<Uuid>,
    /// Most rows in the page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    #[param(ignore)]
    cursor: Option<String>,
}

/// One page of a report's rows, in the report's order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReportPage<T> {
    pub(crate) rows: Vec<T>,
    /// The cursor of the next page; absent on the last.
    pub(crate) next_cursor: Option<String>,
}

/// A report's request, read: the filter, the page's length, and its cursor's text.
struct Asked {
    filter: ReportFilter,
    limit: u32,
    cursor: Option<String>,
}

impl Asked {
    fn read(
        caller: &Caller,
        query: Result<Query<ReportQuery>, QueryRejection>,
    ) -> Result<Self, ApiError> {
        caller.require(&[Role::Admin, Role::Viewer])?;
        let Ok(Query(query)) = query else {
            return Err(ApiError::invalid(
                "the query may hold since and until (YYYY-MM-DD), agent_id, limit and cursor",
            ));
        };
        Ok(Asked {
            filter: ReportFilter::default()
                .with_agent(query.agent_id)
                .with_since(in_four_digit_years("since", query.since)?)
                .with_until(in_four_digit_years("until", query.until)?),
            limit: page_limit(query.limit)?,
            cursor: query.cursor,
        })
    }

    /// One page of a report: the position decoded from the cursor with `parse`, one row
    /// more than asked read with `read` (to tell whether another page follows), and the
    /// next page's cursor written by `cursor_of` from the page's last row.
    async fn answer<K, T, Read>(
        self,
        state: &AppState,
        parse: fn(&str) -> Result<K, ApiError>,
        read: impl FnOnce(ReportFilter, Page<K>) -> Read,
        cursor_of: impl Fn(&T) -> String,
    ) -> Result<Json<ReportPage<T>>, ApiError>
    where
        Read: Future<Output = Result<Vec<T>, StorageError>>,
    {
        let after = self.cursor.as_deref().map(parse).transpose()?;
        let page = Page::after(after, i64::from(self.limit) + 1);
        let mut rows = read_views(state, None, read(self.filter, page)).await?;
        let next_cursor = next_page(&mut rows, self.limit, cursor_of);
        Ok(Json(ReportPage { rows, next_cursor }))
    }
}

/// Per-agent activity per day, by day then agent (admin, viewer): the rows of
/// `arbiter-session report agents`.
#[utoipa::path(get, path = "/v1/reports/agents",
    params(ReportQuery, ("agent_id" = Option<Uuid>, Query, description = "Only this agent's rows"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,7}-[0-9a-f]{32}$",
            description = "Where the page starts: the `next_cursor` of the page before")),
    responses((status = 200, body = ReportPage<AgentDay>), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn agents(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<ReportPage<AgentDay>>, ApiError> {
    let asked = Asked::read(&caller, query)?;
    let pool = state.store.storage().pool();
    asked
        .answer(
            &state,
            cursor::parse_day_id,
            |filter, page| report::agent_activity_page(pool, filter, page),
            |last| cursor::day_id(last.day, last.agent_id),
        )
        .await
}

/// Calls per tool per day, by day then tool (admin, viewer): the rows of
/// `arbiter-session report tools`.
#[utoipa::path(get, path = "/v1/reports/tools",
    params(ReportQuery, ("agent_id" = Option<Uuid>, Query, description = "Only this agent's calls"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,7}-([0-9a-f]{2}){1,256}$",
            description = "Where the page starts: the `next_cursor` of the page before")),
    responses((status = 200, body = ReportPage<ToolDay>), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn tools(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<ReportPage<ToolDay>>, ApiError> {
    let asked = Asked::read(&caller, query)?;
    let pool = state.store.storage().pool();
    asked
        .answer(
            &state,
            cursor::parse_day_text,
            |filter, page| report::tool_usage_page(pool, filter, page),
            |last| cursor::day_text(last.day, &last.tool),
        )
        .await
}

/// Denials per reason per day, by day then reason (admin, viewer): the rows of
/// `arbiter-session report denials`.
#[utoipa::path(get, path = "/v1/reports/denials",
    params(ReportQuery, ("agent_id" = Option<Uuid>, Query, description = "Only this agent's denials"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,7}-([0-9a-f]{2}){1,256}$",
            description = "Where the page starts: the `next_cursor` of the page before")),
    responses((status = 200, body = ReportPage<DenialDay>), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn denials(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<ReportPage<DenialDay>>, ApiError> {
    let asked = Asked::read(&caller, query)?;
    let pool = state.store.storage().pool();
    asked
        .answer(
            &state,
            cursor::parse_day_text,
            |filter, page| report::denials_page(pool, filter, page),
            |last| cursor::day_text(last.day, &last.reason),
        )
        .await
}

/// Per-session utilization of the sessions created in the range, oldest first (admin,
/// viewer): the rows of `arbiter-session report utilization`.
#[utoipa::path(get, path = "/v1/reports/utilization",
    params(ReportQuery, ("agent_id" = Option<Uuid>, Query, description = "Only this agent's sessions"),
        ("cursor" = Option<String>, Query, pattern = "^[0-9]{1,18}-[0-9a-f]{32}$",
            description = "Where the page starts: the `next_cursor` of the page before")),
    responses((status = 200, body = ReportPage<Utilization>), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn utilization(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<ReportPage<Utilization>>, ApiError> {
    let asked = Asked::read(&caller, query)?;
    let pool = state.store.storage().pool();
    asked
        .answer(
            &state,
            cursor::parse_instant_id,
            |filter, page| report::utilization_page(pool, filter, page),
            |last| cursor::instant_id(last.created_at, last.session_id),
        )
        .await
}

/// Each budget's use per period, by budget then period, of the periods that overlap the
/// range (admin, viewer): the rows of `arbiter-session report budgets`.
#[utoipa::path(get, path = "/v1/reports/budgets",
    params(ReportQuery,
        ("cursor" = Option<String>, Query, pattern = "^([0-9a-f]{2}){1,128}-[0-9]{1,18}$",
            description = "Where the page starts: the `next_cursor` of the page before")),
    responses((status = 200, body = ReportPage<BudgetPeriod>), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn budgets(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<ReportPage<BudgetPeriod>>, ApiError> {
    let asked = Asked::read(&caller, query)?;
    if asked.filter.agent.is_some() {
        return Err(ApiError::invalid(
            "the budgets report is not per agent: it takes since, until, limit and cursor",
        ));
    }
    let pool = state.store.storage().pool();
    asked
        .answer(
            &state,
            cursor::parse_text_instant,
            |filter, page| report::budget_periods_page(pool, filter, page),
            |last| cursor::text_instant(&last.budget_id, last.period_start),
        )
        .await
}

/// Minutes the overview covers.
const OVERVIEW_MINUTES: i64 = 60;
/// Budgets the overview names.
const BUSIEST_BUDGETS: usize = 5;

/// `GET /v1/overview`: the service now, and its last hour.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Overview {
    /// When the figures were read, by the store's clock.
    pub(crate) at: DateTime<Utc>,
    /// Sessions live now (active, within their time limit), over every process.
    pub(crate) live_sessions: i64,
    /// Sessions this process has counted ahead of storage, waiting to be reconciled
    /// (another process's are in its own `/metrics`).
    pub(crate) pending_sessions: u64,
    /// Calls allowed in the last hour (the minutes below), one per tool of a batch.
    pub(crate) calls_last_hour: i64,
    /// Requests denied in the last hour.
    pub(crate) denials_last_hour: i64,
    /// Each minute of the last hour, oldest first, the current one last.
    pub(crate) minutes: Vec<MinuteView>,
    /// The budgets with the largest share of their limit used or reserved in their
    /// current period, at most five, the fullest first.
    pub(crate) busiest_budgets: Vec<BudgetView>,
}

/// One minute of the overview.
#[derive(Debug, Default, Serialize, ToSchema)]
pub(crate) struct MinuteView {
    /// The minute's start.
    pub(crate) minute: DateTime<Utc>,
    /// Calls allowed.
    pub(crate) allowed: i64,
    /// Requests denied, by reason; reasons with none are left out.
    pub(crate) denied: BTreeMap<String, i64>,
}

/// Live sessions, calls and denials per minute over the last hour by reason, pending
/// sessions, and the busiest budgets (admin, viewer).
#[utoipa::path(get, path = "/v1/overview",
    responses((status = 200, body = Overview), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn overview(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Overview>, ApiError> {
    caller.require(&[Role::Admin, Role::Viewer])?;
    let at = state.store.now();
    // The current minute's start: `at` less its seconds and their fraction (a whole minute
    // is always a valid instant, so the fallback is never taken).
    let seconds = at.timestamp();
    let current =
        DateTime::<Utc>::from_timestamp(seconds - seconds.rem_euclid(60), 0).unwrap_or(at);
    let first = current - TimeDelta::minutes(OVERVIEW_MINUTES - 1);
    let pool = state.store.storage().pool();
    let read = async {
        let live = report::live_sessions(pool, at).await?;
        let counts = report::calls_by_minute(pool, first).await?;
        Ok::<_, StorageError>((live, counts))
    };
    let (live_sessions, counts) = read_views(&state, None, read).await?;
    let mut minutes: Vec<MinuteView> = (0..OVERVIEW_MINUTES)
        .map(|n| MinuteView {
            minute: first + TimeDelta::minutes(n),
            ..MinuteView::default()
        })
        .collect();
    for count in counts {
        // A minute past the current one is another process's clock running ahead.
        let index = (count.minute - first).num_minutes();
        let Some(minute) = usize::try_from(index).ok().and_then(|i| minutes.get_mut(i)) else {
            continue;
        };
        if count.outcome == "allowed" {
            minute.allowed += count.count;
        } else {
            *minute.denied.entry(count.outcome).or_default() += count.count;
        }
    }
    let mut budgets = state.store.budgets().await?;
    budgets.sort_by_key(|budget| std::cmp::Reverse(fullness(budget)));
    Ok(Json(Overview {
        at,
        live_sessions,
        pending_sessions: state.store.stats().pending,
        calls_last_hour: minutes.iter().map(|m| m.allowed).sum(),
        denials_last_hour: minutes.iter().flat_map(|m| m.denied.values()).sum(),
        minutes,
        busiest_budgets: budgets
            .iter()
            .take(BUSIEST_BUDGETS)
            .map(BudgetView::from)
            .collect(),
    }))
}

/// How full a budget is, as parts per billion of its limit used or reserved (a budget of
/// limit 0 with anything used is full), for ordering only.
fn fullness(budget: &BudgetUsage) -> u128 {
    let taken = u128::from(budget.used) + u128::from(budget.reserved);
    match u128::from(budget.terms.limit) {
        0 if taken > 0 => u128::MAX,
        0 => 0,
        limit => taken * 1_000_000_000 / limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{BudgetId, BudgetTerms};

    #[test]
    fn fullness_orders_by_share_of_the_limit() {
        let usage = |limit, used, reserved| BudgetUsage {
            budget_id: BudgetId::new("b").unwrap(),
            terms: BudgetTerms::new(limit),
            period_start: DateTime::<Utc>::UNIX_EPOCH,
            period_end: None,
            used,
            reserved,
            overrun: 0,
        };
        assert!(fullness(&usage(10, 5, 0)) > fullness(&usage(100, 40, 0)));
        assert!(fullness(&usage(10, 4, 2)) > fullness(&usage(10, 5, 0)));
        assert_eq!(fullness(&usage(0, 1, 0)), u128::MAX);
        assert_eq!(fullness(&usage(0, 0, 0)), 0);
        assert_eq!(
            fullness(&usage(u64::MAX, u64::MAX, u64::MAX)),
            2_000_000_000
        );
    }
}
