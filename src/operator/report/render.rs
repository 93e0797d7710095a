//! Rendering a report for a person: an aligned table, CSV or JSON.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::rows::{
    AgentDay, BudgetPeriod, DenialDay, EventRecord, SessionRecord, ToolDay, Utilization,
};

/// A row of a report: named columns and their rendered cells.
pub trait Tabular: Serialize {
    /// Column names, in order.
    const COLUMNS: &'static [&'static str];
    /// The row's cells, one per column.
    fn cells(&self) -> Vec<String>;
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
        "tool_use",
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
            self.tool_use
                .iter()
                .map(|(tool, used)| format!("{tool} {}/{}", used.calls, used.limit))
                .collect::<Vec<_>>()
                .join(", "),
        ]
    }
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
        "tool_budget",
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
                self.denied_tool_budget,
            ]
            .map(|n| n.to_string()),
        );
        cells
    }
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

impl Tabular for BudgetPeriod {
    const COLUMNS: &'static [&'static str] = &[
        "budget_id",
        "period_start",
        "period_end",
        "limit",
        "unit",
        "used",
        "used_pct",
        "allocated",
        "reserved",
        "overrun",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.budget_id.clone(),
            timestamp(self.period_start),
            self.period_end.map(timestamp).unwrap_or_default(),
            self.unit_limit.to_string(),
            self.unit.clone(),
            self.used.to_string(),
            percent(self.used, self.unit_limit),
            self.allocated.to_string(),
            self.reserved.to_string(),
            self.overrun.to_string(),
        ]
    }
}

/// `part` of `whole` in percent, one decimal; empty for a whole of 0.
fn percent(part: i64, whole: i64) -> String {
    if whole == 0 {
        return String::new();
    }
    #[expect(
        clippy::cast_precision_loss,
        reason = "a percentage shown to one decimal"
    )]
    let pct = part as f64 * 100.0 / whole as f64;
    format!("{pct:.1}")
}

impl SessionRecord {
    /// The record as `name: value` lines, aligned.
    pub fn render_fields(&self) -> String {
        let optional = |at: Option<DateTime<Utc>>| at.map(timestamp).unwrap_or_default();
        // A limited tool as its name and calls/limit, as `report utilization` shows it.
        let tool_limits = self
            .limited_tools
            .iter()
            .zip(&self.tool_limits)
            .zip(&self.tool_calls)
            .map(|((tool, limit), calls)| format!("{tool} {calls}/{limit}"))
            .collect::<Vec<_>>()
            .join(", ");
        let fields: [(&str, String); 19] = [
            ("session_id", self.session_id.to_string()),
            ("agent_id", self.agent_id.to_string()),
            ("status", self.status.clone()),
            ("authorized_tools", self.authorized_tools.join(" ")),
            ("call_budget", self.call_budget.to_string()),
            ("calls_made", self.calls_made.to_string()),
            ("tool_limits", tool_limits),
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

impl Tabular for EventRecord {
    const COLUMNS: &'static [&'static str] = &[
        "event_id",
        "occurred_at",
        "kind",
        "reason",
        "tools",
        "calls",
        "tool_calls",
        "window",
        "status",
        "version",
        "hash",
        "presented_by",
    ];
    fn cells(&self) -> Vec<String> {
        // A denial keeps the first tools of its call and how many it named.
        let omitted = self
            .tool_count
            .and_then(|count| usize::try_from(count).ok())
            .and_then(|count| count.checked_sub(self.tools.len()))
            .filter(|&omitted| omitted > 0);
        let tools = match omitted {
            Some(omitted) => format!("{} (+{omitted} more)", self.tools.join(" ")),
            None => self.tools.join(" "),
        };
        vec![
            self.event_id.to_string(),
            timestamp(self.occurred_at),
            self.kind.clone(),
            self.reason.clone().unwrap_or_default(),
            tools,
            self.calls_made.to_string(),
            // The calls of each limited tool the event counted, after it.
            self.limited_tools
                .iter()
                .flatten()
                .zip(self.tool_calls.iter().flatten())
                .map(|(tool, calls)| format!("{tool} {calls}"))
                .collect::<Vec<_>>()
                .join(", "),
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
            self.presented_agent_id
                .map(|agent| agent.to_string())
                .unwrap_or_default(),
        ]
    }
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
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
fn table(columns: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
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

/// One CSV field (RFC 4180): quoted only when it holds a comma, a quote or a line break.
///
/// Cells come from agents (tool names), and a spreadsheet runs a cell that starts with
/// `=`, `+`, `-`, `@`, a tab or a carriage return as a formula: such a cell is written
/// with a `'` before it, which spreadsheets show as text, unless it is a number. The
/// audit export's JSON Lines are the verbatim form.
pub(crate) fn csv_field(cell: &str) -> std::borrow::Cow<'_, str> {
    let formula =
        cell.starts_with(['=', '+', '-', '@', '\t', '\r']) && cell.parse::<f64>().is_err();
    let cell: std::borrow::Cow<'_, str> = if formula {
        format!("'{cell}").into()
    } else {
        cell.into()
    };
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\"")).into()
    } else {
        cell
    }
}

fn csv(columns: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut out = columns.join(",");
    out.push_str("\r\n");
    for row in rows {
        out.push_str(
            &row.iter()
                .map(|c| csv_field(c))
                .collect::<Vec<_>>()
                .join(","),
        );
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

    /// Security review, defect 7: tool names come from agents, and a spreadsheet runs a
    /// cell that starts with `=`, `+`, `-` or `@` (or a tab or carriage return before one)
    /// as a formula.
    #[test]
    fn csv_neutralizes_cells_a_spreadsheet_would_run() {
        for (cell, field) in [
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("+cmd", "'+cmd"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "\"'\r=1\""),
        ] {
            assert_eq!(csv_field(cell), field, "{cell:?}");
        }
        // A number is not a formula, whatever its sign.
        for cell in ["-5", "+5", "-1.5", "0", "search"] {
            assert_eq!(csv_field(cell), cell);
        }
    }
}
