//! Reports over the audit trail: typed reads of the reporting views (migration
//! `20261124000006_reporting_views.sql`) and their rendering as an aligned table, CSV or
//! JSON. The views themselves are the interface for SQL users (see `docs/reporting.md`).
//!
//! `rows` holds the row types, `reads` the statements, `render` the output formats.

mod reads;
mod render;
mod rows;

pub use reads::{
    ReportFilter, SessionsFilter, agent_activity, budget_periods, denials, session, session_events,
    session_events_page, sessions_page, tool_usage, utilization,
};
pub(crate) use render::csv_field;
pub use render::{Format, Tabular, render};
pub use rows::{
    AgentDay, BudgetPeriod, DenialDay, EventRecord, SessionLine, SessionRecord, ToolDay, ToolUse,
    Utilization,
};
