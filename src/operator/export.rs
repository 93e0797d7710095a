//! Export: the audit trail between two times, streamed in `event_id` order (the order the
//! events were stored, which within a session is its chain's order) as JSON Lines or CSV,
//! with each event's `prev_hash` and `hash`, so that the chains can be checked outside the
//! database.
//!
//! # Invariant: flat memory, any size
//! The rows come from one statement whose result PostgreSQL sends as the client reads it
//! (sqlx's row stream over a single portal, in a read-only transaction with one snapshot);
//! each row is written out before the next is read. Memory does not grow with the range.

use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use futures_util::TryStreamExt as _;
use serde::Serialize;
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use super::report::csv_field;
use crate::error::StorageError;

/// Which events to export: [`ExportRange::new`], narrowed by the `with_*` setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExportRange {
    /// From this time on (inclusive, `occurred_at`).
    pub since: DateTime<Utc>,
    /// Up to this time (exclusive).
    pub until: DateTime<Utc>,
    /// Only this agent's events.
    pub agent: Option<Uuid>,
}

impl ExportRange {
    /// Every agent's events that occurred from `since` (inclusive) to `until` (exclusive).
    pub fn new(since: DateTime<Utc>, until: DateTime<Utc>) -> Self {
        ExportRange {
            since,
            until,
            agent: None,
        }
    }

    /// Only `agent`'s events, or every agent's for `None`.
    #[must_use]
    pub fn with_agent(mut self, agent: Option<Uuid>) -> Self {
        self.agent = agent;
        self
    }
}

/// How exported events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportFormat {
    /// One JSON object per line.
    #[default]
    JsonLines,
    /// RFC 4180 CSV with a header line; `tools` joined with spaces.
    Csv,
}

/// Why an export stopped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// `until` is not after `since`.
    #[error("export range is empty: --until must be after --since")]
    EmptyRange,
    /// The database could not be read.
    #[error("reading the audit trail failed")]
    Storage(#[from] StorageError),
    /// The output could not be written.
    #[error("writing the export failed")]
    Io(#[from] std::io::Error),
}

/// One exported event: every column of `arbiter.session_events`, hashes in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ExportedEvent {
    /// Insertion order.
    pub event_id: i64,
    /// The writer's unique key.
    pub event_key: Uuid,
    /// The session.
    pub session_id: Uuid,
    /// Its agent.
    pub agent_id: Uuid,
    /// What happened.
    pub kind: String,
    /// Why a call was denied (denials only).
    pub reason: Option<String>,
    /// The tool(s); a NULL element (only by hand-written SQL) is exported as `null`.
    pub tools: Vec<Option<String>>,
    /// Calls made after the event.
    pub calls_made: i64,
    /// Calls in the rate window after the event.
    pub rate_window_calls: i64,
    /// Status after the event.
    pub status: String,
    /// The session's version after the event (none for denials).
    pub session_version: Option<i64>,
    /// When the library decided.
    pub occurred_at: DateTime<Utc>,
    /// When PostgreSQL stored it.
    pub recorded_at: DateTime<Utc>,
    /// The writing process.
    pub instance_id: Uuid,
    /// The UTC day the session was created (the partition).
    pub session_day: NaiveDate,
    /// The tools with a limit of their own that the event counted, sorted by name (see
    /// [`AuditEvent::tool_calls`](crate::audit::AuditEvent::tool_calls)); none if it counted
    /// none.
    pub limited_tools: Option<Vec<Option<String>>>,
    /// Each one's calls after the event, at the same positions.
    pub tool_calls: Option<Vec<Option<i64>>>,
    /// The previous link's hash in the event's chain, hex.
    pub prev_hash: Option<String>,
    /// This link's hash, hex.
    pub hash: Option<String>,
    /// Denials: the agent that presented the session (`agent_id` is the session's).
    pub presented_agent_id: Option<Uuid>,
    /// Denials: how many tools the call named (`tools` holds the first 16).
    pub tool_count: Option<i32>,
    /// Allowed calls of a session with a shared budget: the units the call cost.
    pub cost: Option<i64>,
    /// The share of the shared budget the cost was charged to.
    pub share_id: Option<Uuid>,
    /// Allowed calls: the session's shared budget; `shared_budget` denials: the budget
    /// that had no room.
    pub budget_id: Option<String>,
}

const CSV_COLUMNS: &[&str] = &[
    "event_id",
    "event_key",
    "session_id",
    "agent_id",
    "kind",
    "reason",
    "tools",
    "calls_made",
    "rate_window_calls",
    "status",
    "session_version",
    "occurred_at",
    "recorded_at",
    "instance_id",
    "session_day",
    "limited_tools",
    "tool_calls",
    "prev_hash",
    "hash",
    "presented_agent_id",
    "tool_count",
    "cost",
    "share_id",
    "budget_id",
];

/// A list as one CSV cell: its values space-separated, a NULL element as an empty word.
fn space_separated<T: ToString>(values: &[Option<T>]) -> String {
    values
        .iter()
        .map(|value| value.as_ref().map(ToString::to_string).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
}

impl ExportedEvent {
    fn csv_cells(&self) -> [String; 24] {
        let opt = |value: Option<String>| value.unwrap_or_default();
        [
            self.event_id.to_string(),
            self.event_key.to_string(),
            self.session_id.to_string(),
            self.agent_id.to_string(),
            self.kind.clone(),
            opt(self.reason.clone()),
            space_separated(&self.tools),
            self.calls_made.to_string(),
            self.rate_window_calls.to_string(),
            self.status.clone(),
            opt(self.session_version.map(|v| v.to_string())),
            self.occurred_at.to_rfc3339(),
            self.recorded_at.to_rfc3339(),
            self.instance_id.to_string(),
            self.session_day.to_string(),
            // Empty when the event counted no limited tool.
            space_separated(self.limited_tools.as_deref().unwrap_or_default()),
            space_separated(self.tool_calls.as_deref().unwrap_or_default()),
            opt(self.prev_hash.clone()),
            opt(self.hash.clone()),
            opt(self.presented_agent_id.map(|agent| agent.to_string())),
            opt(self.tool_count.map(|count| count.to_string())),
            opt(self.cost.map(|cost| cost.to_string())),
            opt(self.share_id.map(|share| share.to_string())),
            opt(self.budget_id.clone()),
        ]
    }
}

/// Writes the events of `range` to `out` in `format`, in `event_id` order; returns how many.
///
/// # Errors
/// An empty range writes nothing; a storage or output failure stops the export where it
/// happened (what was written is a prefix of the full export).
pub async fn export_events<W: Write>(
    pool: &PgPool,
    range: ExportRange,
    format: ExportFormat,
    out: &mut W,
) -> Result<u64, ExportError> {
    if range.until <= range.since {
        return Err(ExportError::EmptyRange);
    }
    let mut tx = snapshot(pool).await?;
    if format == ExportFormat::Csv {
        write_csv_row(out, CSV_COLUMNS.iter().map(|c| (*c).to_owned()))?;
    }
    let mut rows = sqlx::query_file_as!(
        ExportedEvent,
        "src/operator/sql/export.sql",
        range.since,
        range.until,
        range.agent
    )
    .fetch(&mut *tx);
    let mut written = 0;
    while let Some(event) = rows.try_next().await.map_err(StorageError::from)? {
        match format {
            ExportFormat::JsonLines => {
                serde_json::to_writer(&mut *out, &event).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
            }
            ExportFormat::Csv => write_csv_row(out, event.csv_cells())?,
        }
        written += 1;
    }
    drop(rows);
    out.flush()?;
    tx.commit().await.map_err(StorageError::from)?;
    Ok(written)
}

/// What [`export_partition`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PartitionExport {
    /// Events written.
    pub events: u64,
    /// The latest `recorded_at` among them (`None` for an empty partition).
    pub last_recorded_at: Option<DateTime<Utc>>,
}

/// Writes every event of one day's partition (the sessions created on `day`) to `out` as
/// JSON Lines, in `event_id` order, from one snapshot: what `purge --archive` keeps of a
/// partition before dropping it.
///
/// # Errors
/// A storage or output failure stops the export where it happened.
pub async fn export_partition<W: Write>(
    pool: &PgPool,
    day: NaiveDate,
    out: &mut W,
) -> Result<PartitionExport, ExportError> {
    let mut tx = snapshot(pool).await?;
    let mut rows =
        sqlx::query_file_as!(ExportedEvent, "src/operator/sql/export_day.sql", day).fetch(&mut *tx);
    let mut written = PartitionExport::default();
    while let Some(event) = rows.try_next().await.map_err(StorageError::from)? {
        serde_json::to_writer(&mut *out, &event).map_err(std::io::Error::other)?;
        out.write_all(b"\n")?;
        written.events += 1;
        written.last_recorded_at = std::cmp::max(written.last_recorded_at, Some(event.recorded_at));
    }
    drop(rows);
    out.flush()?;
    tx.commit().await.map_err(StorageError::from)?;
    Ok(written)
}

/// A read-only transaction on one snapshot, for a whole export; nothing is written.
async fn snapshot(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StorageError> {
    let mut tx = crate::storage::begin_transaction(pool).await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

fn write_csv_row<W: Write>(
    out: &mut W,
    cells: impl IntoIterator<Item = String>,
) -> std::io::Result<()> {
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        out.write_all(csv_field(&cell).as_bytes())?;
    }
    out.write_all(b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cells_are_space_separated_and_empty_when_absent() {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("a valid time");
        let mut event = ExportedEvent {
            event_id: 1,
            event_key: Uuid::nil(),
            session_id: Uuid::nil(),
            agent_id: Uuid::nil(),
            kind: "batch_allowed".to_owned(),
            reason: None,
            tools: vec![Some("search".to_owned()), Some("write_file".to_owned())],
            calls_made: 3,
            rate_window_calls: 3,
            status: "active".to_owned(),
            session_version: Some(2),
            occurred_at: at,
            recorded_at: at,
            instance_id: Uuid::nil(),
            session_day: at.date_naive(),
            limited_tools: Some(vec![Some("write_file".to_owned())]),
            tool_calls: Some(vec![Some(2)]),
            prev_hash: None,
            hash: None,
            presented_agent_id: None,
            tool_count: None,
            cost: Some(5),
            share_id: None,
            budget_id: Some("acme".to_owned()),
        };
        let column = |name: &str| CSV_COLUMNS.iter().position(|c| *c == name).expect(name);
        let cells = event.csv_cells();
        assert_eq!(cells[column("tools")], "search write_file");
        assert_eq!(cells[column("limited_tools")], "write_file");
        assert_eq!(cells[column("tool_calls")], "2");
        assert_eq!(cells[column("cost")], "5");
        assert_eq!(cells[column("share_id")], "");
        assert_eq!(cells[column("budget_id")], "acme");

        event.limited_tools = None;
        event.tool_calls = None;
        let cells = event.csv_cells();
        assert_eq!(cells[column("limited_tools")], "");
        assert_eq!(cells[column("tool_calls")], "");
    }
}
