//! Reports over the audit trail: typed reads of the reporting views (migration
//! `20261124000006_reporting_views.sql`) and their rendering as an aligned table, CSV or
//! JSON. The views themselves are the interface for SQL users (see `docs/reporting.md`).
//!
//! `rows` holds the row types, `reads` the statements, `render` the output formats.

mod reads;
mod render;
mod rows;

pub use reads::{
    Page, ReportFilter, SessionsFilter, agent_activity, agent_activity_page, budget_periods,
    budget_periods_page, calls_by_minute, denials, denials_page, live_sessions, session,
    session_events, session_events_page, sessions_page, tool_usage, tool_usage_page, utilization,
    utilization_page,
};
pub(crate) use render::csv_field;
pub use render::{Format, Tabular, render};
pub use rows::{
    AgentDay, BudgetPeriod, DenialDay, EventRecord, MinuteCount, SessionLine, SessionRecord,
    ToolDay, ToolUse, Utilization,
};
