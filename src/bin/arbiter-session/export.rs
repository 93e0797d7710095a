//! `arbiter-session export`: the audit events of a time range, in order, with their hashes.

use arbiter_session::operator::export::{self, ExportFormat, ExportRange};
use chrono::{DateTime, Utc};
use clap::ValueEnum;
use sqlx::PgPool;
use uuid::Uuid;

use crate::shell::{Failure, parse_cutoff};

/// Options of `arbiter-session export`.
#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    /// From: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp (inclusive).
    #[arg(long, value_parser = parse_cutoff)]
    since: DateTime<Utc>,
    /// Until: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp (exclusive).
    #[arg(long, value_parser = parse_cutoff)]
    until: DateTime<Utc>,
    /// Only this agent's events.
    #[arg(long)]
    agent: Option<Uuid>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ExportFormatArg::Jsonl)]
    format: ExportFormatArg,
}

/// The export's formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormatArg {
    /// JSON Lines: one object per event.
    Jsonl,
    /// CSV with a header line.
    Csv,
}

/// Streams the events to stdout.
pub(crate) async fn run(pool: &PgPool, args: ExportArgs) -> Result<(), Failure> {
    let format = match args.format {
        ExportFormatArg::Jsonl => ExportFormat::JsonLines,
        ExportFormatArg::Csv => ExportFormat::Csv,
    };
    let range = ExportRange::new(args.since, args.until).with_agent(args.agent);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    export::export_events(pool, range, format, &mut out).await?;
    Ok(())
}
