//! The rows of each report, typed as the reporting views define them (migration
//! `20261124000006_reporting_views.sql`).

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One row of `arbiter.session_utilization`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct Utilization {
    /// The session.
    pub session_id: Uuid,
    /// Its agent.
    pub agent_id: Uuid,
    /// `active`, `closed` or `expired` (past its time limit, marked or not).
    pub status: String,
    /// Calls allowed in all.
    pub call_budget: i64,
    /// Calls made.
    pub calls_made: i64,
    /// `calls_made / call_budget` in percent, one decimal.
    pub budget_used_pct: f64,
    /// Whether no call is left.
    pub budget_exhausted: bool,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it ended; `None` while live.
    pub ended_at: Option<DateTime<Utc>>,
    /// How long it ran, in whole seconds; `None` while live.
    pub duration_secs: Option<i64>,
    /// Denied requests.
    pub denials: i64,
    /// Each tool with a call limit of its own, by name: its limit and calls; empty when
    /// no tool has one.
    pub tool_use: BTreeMap<String, ToolUse>,
}

/// A limited tool's use in a session (`tool_use` of `arbiter.session_utilization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct ToolUse {
    /// Calls of the tool allowed in the session.
    pub limit: i64,
    /// Calls of the tool made.
    pub calls: i64,
}

/// One row of `arbiter.agent_daily_activity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct AgentDay {
    /// The agent.
    pub agent_id: Uuid,
    /// The UTC day.
    pub day: NaiveDate,
    /// Sessions created.
    pub sessions_opened: i64,
    /// Calls allowed (one per tool of a batch).
    pub calls_allowed: i64,
    /// Requests denied, for any reason.
    pub calls_denied: i64,
    /// Denied: presented by another agent.
    pub denied_agent_mismatch: i64,
    /// Denied: session closed.
    pub denied_closed: i64,
    /// Denied: session expired.
    pub denied_expired: i64,
    /// Denied: budget exhausted.
    pub denied_budget: i64,
    /// Denied: tool not authorized.
    pub denied_tool: i64,
    /// Denied: rate window full.
    pub denied_rate: i64,
    /// Denied: counted but not made durable.
    pub denied_write_through: i64,
    /// Denied: malformed request.
    pub denied_invalid: i64,
    /// Denied past a tool's own limit (reason `tool_budget`).
    pub denied_tool_budget: i64,
}

/// One tool's day, summed over the agents of `arbiter.tool_daily_usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct ToolDay {
    /// The UTC day.
    pub day: NaiveDate,
    /// The tool, as the agent named it.
    pub tool: String,
    /// Calls allowed.
    pub calls_allowed: i64,
    /// Denied requests that named the tool.
    pub calls_denied: i64,
    /// Agents that used or tried it.
    pub agents: i64,
    /// Sessions it was used or tried in.
    pub sessions: i64,
}

/// One reason's day, summed over the agents of `arbiter.denials_by_reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct DenialDay {
    /// The UTC day.
    pub day: NaiveDate,
    /// The reason (see [`crate::audit::DenialReason`]).
    pub reason: String,
    /// Denied requests.
    pub denials: i64,
    /// Agents denied.
    pub agents: i64,
    /// Sessions the denied requests presented.
    pub sessions: i64,
}

/// A stored session, every column, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SessionRecord {
    /// The session.
    pub session_id: Uuid,
    /// The agent it is bound to.
    pub agent_id: Uuid,
    /// Stored status: `active`, `closed` or `expired`.
    pub status: String,
    /// Tools it may call (`*` for every tool).
    pub authorized_tools: Vec<String>,
    /// Calls allowed in all.
    pub call_budget: i64,
    /// Calls made.
    pub calls_made: i64,
    /// Calls allowed per rate window, if limited.
    pub rate_limit: Option<i64>,
    /// Length of the rate window, seconds.
    pub rate_window_secs: i64,
    /// Start of the current rate window.
    pub rate_window_started_at: Option<DateTime<Utc>>,
    /// Calls in the current rate window.
    pub rate_window_calls: i64,
    /// What the agent said it would do.
    pub declared_intent: String,
    /// Who delegated to the agent.
    pub delegation_chain: Vec<String>,
    /// Credentials the session may use.
    pub authorized_credentials: Vec<String>,
    /// Highest data sensitivity allowed.
    pub data_sensitivity_ceiling: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its time limit ends.
    pub expires_at: DateTime<Utc>,
    /// Row version (advanced by every update).
    pub version: i64,
    /// When the row last changed.
    pub updated_at: DateTime<Utc>,
    /// Tools with a call limit of their own, sorted by name.
    pub limited_tools: Vec<String>,
    /// Each one's limit, at the same positions.
    pub tool_limits: Vec<i64>,
    /// Each one's calls so far, at the same positions.
    pub tool_calls: Vec<i64>,
}

/// One audit event, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EventRecord {
    /// `session_events.event_id`.
    pub event_id: i64,
    /// When the library decided.
    pub occurred_at: DateTime<Utc>,
    /// What happened.
    pub kind: String,
    /// Why a call was denied (denials only).
    pub reason: Option<String>,
    /// The tool(s).
    pub tools: Vec<String>,
    /// Calls made after the event.
    pub calls_made: i64,
    /// Calls in the rate window after the event.
    pub rate_window_calls: i64,
    /// Status after the event.
    pub status: String,
    /// The session's version after the event (none for denials).
    pub session_version: Option<i64>,
    /// The writing process.
    pub instance_id: Uuid,
    /// The tools with a limit of their own that the event counted, sorted by name.
    pub limited_tools: Option<Vec<String>>,
    /// Each one's calls after the event, at the same positions.
    pub tool_calls: Option<Vec<i64>>,
    /// Denials: the agent that presented the session.
    pub presented_agent_id: Option<Uuid>,
    /// Denials: how many tools the call named (`tools` holds the first 16).
    pub tool_count: Option<i32>,
    /// The event's link in its hash chain, hex.
    pub hash: Option<String>,
}

/// One row of `arbiter.budget_usage`: a budget's use in one of its periods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct BudgetPeriod {
    /// The budget.
    pub budget_id: String,
    /// When the period started (the epoch for a budget whose period is `none`).
    pub period_start: DateTime<Utc>,
    /// When it ends; `None` for `none`.
    pub period_end: Option<DateTime<Utc>>,
    /// The budget's limit (its current one) in units per period.
    pub unit_limit: i64,
    /// What a unit is.
    pub unit: String,
    /// Units spent in the period, by the budget's sessions and those of every budget below
    /// it (settled and lapsed reservations at their actual cost and estimate).
    pub used: i64,
    /// Units granted to processes in the period, spent or not.
    pub allocated: i64,
    /// Units held by open reservations (their estimates), besides `used`.
    pub reserved: i64,
    /// Units of `used` that settlements charged above their estimates.
    pub overrun: i64,
}

/// One session in a list of them (`sessions_page`); `GET /v1/sessions` answers it as it
/// is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct SessionLine {
    /// The session.
    pub session_id: Uuid,
    /// Its agent.
    pub agent_id: Uuid,
    /// Its status at the page's instant: `active`, `closed` or `expired` (marked, or
    /// active past `expires_at`).
    pub status: String,
    /// Calls made.
    pub calls_made: i64,
    /// Calls allowed.
    pub call_budget: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its time limit runs out.
    pub expires_at: DateTime<Utc>,
    /// The shared budget its calls are charged to.
    pub budget_id: Option<String>,
}

/// Calls allowed, or requests denied for one reason, in one minute (`calls_by_minute`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MinuteCount {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// `allowed`, or the denial's reason (see [`crate::audit::DenialReason`]).
    pub outcome: String,
    /// Calls allowed (one per tool of a batch), or requests denied.
    pub count: i64,
}
