//! Reports over the audit trail: typed reads of the reporting views (migration
//! `20261124000006_reporting_views.sql`) and their rendering as an aligned table, CSV or
//! JSON. The `arbiter-session` command-line tool is a thin shell over this module; the
//! views themselves are the interface for SQL users (see `docs/reporting.md`).

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StorageError;

/// Which rows a report covers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReportFilter {
    /// Only this agent's sessions or events.
    pub agent: Option<Uuid>,
    /// Only from this UTC day on (sessions created, events occurred).
    pub since: Option<NaiveDate>,
}

/// A row of a report: named columns and their rendered cells.
pub trait Tabular: Serialize {
    /// Column names, in order.
    const COLUMNS: &'static [&'static str];
    /// The row's cells, one per column.
    fn cells(&self) -> Vec<String>;
}

/// One row of `arbiter.session_utilization`.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
}

impl Tabular for Utilization {
    const COLUMNS: &'static [&'static str] = &[
        "session_id",
        "agent_id",
        "status",
        "budget",
        "used",
        "used_pct",
        "exhausted",
        "created_at",
        "ended_at",
        "duration_s",
        "denials",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.session_id.to_string(),
            self.agent_id.to_string(),
            self.status.clone(),
            self.call_budget.to_string(),
            self.calls_made.to_string(),
            format!("{:.1}", self.budget_used_pct),
            if self.budget_exhausted { "yes" } else { "no" }.to_owned(),
            timestamp(self.created_at),
            self.ended_at.map(timestamp).unwrap_or_default(),
            self.duration_secs
                .map(|s| s.to_string())
                .unwrap_or_default(),
            self.denials.to_string(),
        ]
    }
}

/// One row of `arbiter.agent_daily_activity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
}

impl Tabular for AgentDay {
    const COLUMNS: &'static [&'static str] = &[
        "day",
        "agent_id",
        "opened",
        "allowed",
        "denied",
        "agent_mismatch",
        "closed",
        "expired",
        "budget",
        "tool",
        "rate",
        "write_through",
        "invalid",
    ];
    fn cells(&self) -> Vec<String> {
        let mut cells = vec![self.day.to_string(), self.agent_id.to_string()];
        cells.extend(
            [
                self.sessions_opened,
                self.calls_allowed,
                self.calls_denied,
                self.denied_agent_mismatch,
                self.denied_closed,
                self.denied_expired,
                self.denied_budget,
                self.denied_tool,
                self.denied_rate,
                self.denied_write_through,
                self.denied_invalid,
            ]
            .map(|n| n.to_string()),
        );
        cells
    }
}

/// One tool's day, summed over the agents of `arbiter.tool_daily_usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

impl Tabular for ToolDay {
    const COLUMNS: &'static [&'static str] =
        &["day", "tool", "allowed", "denied", "agents", "sessions"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.day.to_string(),
            self.tool.clone(),
            self.calls_allowed.to_string(),
            self.calls_denied.to_string(),
            self.agents.to_string(),
            self.sessions.to_string(),
        ]
    }
}

/// One reason's day, summed over the agents of `arbiter.denials_by_reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenialDay {
    /// The UTC day.
    pub day: NaiveDate,
    /// The reason (see [`crate::DenialReason`]).
    pub reason: String,
    /// Denied requests.
    pub denials: i64,
    /// Agents denied.
    pub agents: i64,
    /// Sessions the denied requests presented.
    pub sessions: i64,
}

impl Tabular for DenialDay {
    const COLUMNS: &'static [&'static str] = &["day", "reason", "denials", "agents", "sessions"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.day.to_string(),
            self.reason.clone(),
            self.denials.to_string(),
            self.agents.to_string(),
            self.sessions.to_string(),
        ]
    }
}

/// A stored session, every column, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
}

impl SessionRecord {
    /// The record as `name: value` lines, aligned.
    pub fn render_fields(&self) -> String {
        let optional = |at: Option<DateTime<Utc>>| at.map(timestamp).unwrap_or_default();
        let fields: [(&str, String); 18] = [
            ("session_id", self.session_id.to_string()),
            ("agent_id", self.agent_id.to_string()),
            ("status", self.status.clone()),
            ("authorized_tools", self.authorized_tools.join(" ")),
            ("call_budget", self.call_budget.to_string()),
            ("calls_made", self.calls_made.to_string()),
            (
                "rate_limit",
                self.rate_limit.map(|l| l.to_string()).unwrap_or_default(),
            ),
            ("rate_window_secs", self.rate_window_secs.to_string()),
            ("rate_window_started", optional(self.rate_window_started_at)),
            ("rate_window_calls", self.rate_window_calls.to_string()),
            ("declared_intent", self.declared_intent.clone()),
            ("delegation_chain", self.delegation_chain.join(" > ")),
            ("credentials", self.authorized_credentials.join(" ")),
            ("sensitivity_ceiling", self.data_sensitivity_ceiling.clone()),
            ("created_at", timestamp(self.created_at)),
            ("expires_at", timestamp(self.expires_at)),
            ("version", self.version.to_string()),
            ("updated_at", timestamp(self.updated_at)),
        ];
        let width = fields
            .iter()
            .map(|(name, _)| name.len())
            .fold(0, std::cmp::max);
        fields
            .iter()
            .map(|(name, value)| format!("{name:<width$}  {}\n", printable(value)))
            .collect()
    }
}

/// One audit event, as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// The event's link in the hash chain, hex (none for denials).
    pub hash: Option<String>,
}

impl Tabular for EventRecord {
    const COLUMNS: &'static [&'static str] = &[
        "event_id",
        "occurred_at",
        "kind",
        "reason",
        "tools",
        "calls",
        "window",
        "status",
        "version",
        "hash",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.event_id.to_string(),
            timestamp(self.occurred_at),
            self.kind.clone(),
            self.reason.clone().unwrap_or_default(),
            self.tools.join(" "),
            self.calls_made.to_string(),
            self.rate_window_calls.to_string(),
            self.status.clone(),
            self.session_version
                .map(|v| v.to_string())
                .unwrap_or_default(),
            // The first 16 hex digits identify a link for the eye; JSON has all of it.
            self.hash
                .as_deref()
                .map(|h| h.chars().take(16).collect())
                .unwrap_or_default(),
        ]
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Per-session utilization, oldest session first.
///
/// # Errors
/// The database could not be read.
pub async fn utilization(
    pool: &PgPool,
    filter: ReportFilter,
) -> Result<Vec<Utilization>, StorageError> {
    // language=PostgreSQL
    let rows = sqlx::query_as!(
        Utilization,
        r#"
        SELECT session_id AS "session_id!", agent_id AS "agent_id!", status AS "status!",
               call_budget AS "call_budget!", calls_made AS "calls_made!",
               budget_used_pct::float8 AS "budget_used_pct!",
               budget_exhausted AS "budget_exhausted!", created_at AS "created_at!",
               ended_at, extract(epoch FROM duration)::bigint AS duration_secs,
               denials AS "denials!"
          FROM arbiter.session_utilization
         WHERE ($1::uuid IS NULL OR agent_id = $1)
           AND ($2::date IS NULL OR created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC')
         ORDER BY created_at, session_id
        "#,
        filter.agent,
        filter.since
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Per-agent activity per day, by day then agent.
///
/// # Errors
/// The database could not be read.
pub async fn agent_activity(
    pool: &PgPool,
    filter: ReportFilter,
) -> Result<Vec<AgentDay>, StorageError> {
    // language=PostgreSQL
    let rows = sqlx::query_as!(
        AgentDay,
        r#"
        SELECT agent_id AS "agent_id!", day AS "day!", sessions_opened AS "sessions_opened!",
               calls_allowed::bigint AS "calls_allowed!", calls_denied AS "calls_denied!",
               denied_agent_mismatch AS "denied_agent_mismatch!",
               denied_closed AS "denied_closed!", denied_expired AS "denied_expired!",
               denied_budget AS "denied_budget!", denied_tool AS "denied_tool!",
               denied_rate AS "denied_rate!", denied_write_through AS "denied_write_through!",
               denied_invalid AS "denied_invalid!"
          FROM arbiter.agent_daily_activity
         WHERE ($1::uuid IS NULL OR agent_id = $1)
           AND ($2::date IS NULL OR day >= $2)
         ORDER BY day, agent_id
        "#,
        filter.agent,
        filter.since
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Calls per tool per day (over every agent, or the filter's), by day then tool.
///
/// # Errors
/// The database could not be read.
pub async fn tool_usage(pool: &PgPool, filter: ReportFilter) -> Result<Vec<ToolDay>, StorageError> {
    // language=PostgreSQL
    let rows = sqlx::query_as!(
        ToolDay,
        r#"
        SELECT day AS "day!", tool AS "tool!",
               sum(calls_allowed)::bigint AS "calls_allowed!",
               sum(calls_denied)::bigint AS "calls_denied!",
               count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
          FROM arbiter.tool_daily_usage
         WHERE ($1::uuid IS NULL OR agent_id = $1)
           AND ($2::date IS NULL OR day >= $2)
         GROUP BY day, tool
         ORDER BY day, tool
        "#,
        filter.agent,
        filter.since
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Denials per reason per day (over every agent, or the filter's), by day then reason.
///
/// # Errors
/// The database could not be read.
pub async fn denials(pool: &PgPool, filter: ReportFilter) -> Result<Vec<DenialDay>, StorageError> {
    // language=PostgreSQL
    let rows = sqlx::query_as!(
        DenialDay,
        r#"
        SELECT day AS "day!", reason AS "reason!", sum(denials)::bigint AS "denials!",
               count(*) AS "agents!", sum(sessions)::bigint AS "sessions!"
          FROM arbiter.denials_by_reason
         WHERE ($1::uuid IS NULL OR agent_id = $1)
           AND ($2::date IS NULL OR day >= $2)
         GROUP BY day, reason
         ORDER BY day, reason
        "#,
        filter.agent,
        filter.since
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
    // language=PostgreSQL
    let row = sqlx::query_as!(
        SessionRecord,
        r#"
        SELECT session_id, agent_id, status, authorized_tools, call_budget, calls_made,
               rate_limit, rate_window_secs, rate_window_started_at, rate_window_calls,
               declared_intent, delegation_chain, authorized_credentials,
               data_sensitivity_ceiling, created_at, expires_at, version, updated_at
          FROM arbiter.sessions
         WHERE session_id = $1
        "#,
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
    // language=PostgreSQL
    let rows = sqlx::query_as!(
        EventRecord,
        r#"
        SELECT event_id, occurred_at, kind, reason, tools, calls_made, rate_window_calls,
               status, session_version, instance_id, encode(hash, 'hex') AS hash
          FROM arbiter.session_events
         WHERE session_id = $1
         ORDER BY occurred_at, event_id
        "#,
        session_id
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// Columns aligned for a terminal: text left, numbers right.
    #[default]
    Table,
    /// RFC 4180 CSV with a header line.
    Csv,
    /// A JSON array of objects, one per row, with the rows' full field names.
    Json,
}

/// Renders `rows` in `format`, ending with a newline.
///
/// # Errors
/// JSON serialization failed (not expected for these rows).
pub fn render<R: Tabular>(rows: &[R], format: Format) -> Result<String, serde_json::Error> {
    Ok(match format {
        Format::Table => table(R::COLUMNS, rows.iter().map(Tabular::cells)),
        Format::Csv => csv(R::COLUMNS, rows.iter().map(Tabular::cells)),
        Format::Json => serde_json::to_string_pretty(rows)? + "\n",
    })
}

/// An aligned table. A column whose every cell is numeric is right-aligned.
///
/// Tool names come from agents: control characters are shown escaped (`\u{1b}`), so a
/// recorded name cannot move the operator's cursor or rewrite their terminal.
pub(crate) fn table(columns: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .map(|row| row.into_iter().map(|cell| printable(&cell)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, name)| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.chars().count())
                .fold(name.len(), std::cmp::max)
        })
        .collect();
    let numeric: Vec<bool> = (0..columns.len())
        .map(|i| {
            !rows.is_empty()
                && rows.iter().all(|row| {
                    row.get(i).is_some_and(|cell| {
                        cell.is_empty() || cell.parse::<f64>().is_ok_and(f64::is_finite)
                    })
                })
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            let sep = if i == 0 { "" } else { "  " };
            // Writing to a String cannot fail.
            let _ = if numeric.get(i).copied().unwrap_or(false) {
                write!(text, "{sep}{cell:>width$}")
            } else {
                write!(text, "{sep}{cell:<width$}")
            };
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(columns);
    for row in &rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

fn printable(cell: &str) -> String {
    if cell.chars().any(char::is_control) {
        cell.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        cell.to_owned()
    }
}

fn csv(columns: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    fn field(cell: &str) -> String {
        if cell.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", cell.replace('"', "\"\""))
        } else {
            cell.to_owned()
        }
    }
    let mut out = columns.join(",");
    out.push_str("\r\n");
    for row in rows {
        out.push_str(&row.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_text_left_and_numbers_right() {
        let rows = vec![
            vec!["search".to_owned(), "7".to_owned()],
            vec!["fetch_url".to_owned(), "1200".to_owned()],
        ];
        assert_eq!(
            table(&["tool", "calls"], rows.into_iter()),
            "tool       calls\n\
             search         7\n\
             fetch_url   1200\n"
        );
    }

    #[test]
    fn table_escapes_control_characters_from_agents() {
        let rows = vec![vec!["\u{1b}[2Jx\n".to_owned()]];
        assert_eq!(
            table(&["tool"], rows.into_iter()),
            "tool\n\\u{1b}[2Jx\\u{a}\n"
        );
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let rows = vec![vec![
            "a,b".to_owned(),
            "say \"hi\"".to_owned(),
            "x".to_owned(),
        ]];
        assert_eq!(
            csv(&["p", "q", "r"], rows.into_iter()),
            "p,q,r\r\n\"a,b\",\"say \"\"hi\"\"\",x\r\n"
        );
    }
}
