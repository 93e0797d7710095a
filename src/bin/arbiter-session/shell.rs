//! What every command shares: the failure line, the connection to `DATABASE_URL`, the
//! output formats and the cutoffs' syntax.

use std::process::ExitCode;
use std::str::FromStr as _;
use std::time::Duration;

use arbiter_session::operator::partitions;
use arbiter_session::operator::report::Format;
use chrono::{DateTime, NaiveDate, Utc};
use clap::ValueEnum;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection as _, PgPool};

/// Exit status when `verify` or `checkpoint` finds a broken or rewritten chain (errors exit
/// with 1, usage errors with 2).
pub(crate) const EXIT_TAMPERED: u8 = 3;

/// A failure, already phrased for the operator.
pub(crate) struct Failure(pub(crate) String);

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(arbiter_session::error::error_chain(&err))
    }
}

/// Prints `failure` as one line on stderr; the exit status of a failed command.
pub(crate) fn fail(Failure(text): Failure) -> ExitCode {
    // One line, whatever the error's own formatting.
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("arbiter-session: error: {line}");
    ExitCode::FAILURE
}

/// A small pool over `url`, after one direct connection has shown that it works.
pub(crate) async fn connect(url: &str) -> Result<PgPool, Failure> {
    let cannot = |err: sqlx::Error| {
        Failure(format!(
            "cannot connect to DATABASE_URL: {}",
            Failure::from(err).0
        ))
    };
    // JIT off: the operator's statements span every partition of the audit trail, and
    // compiling their plans cost seconds where running them takes milliseconds.
    let options = PgConnectOptions::from_str(url)
        .map_err(cannot)?
        .options([("jit", "off")]);
    // One direct connection first: a pool retries until its timeout and then reports only
    // that it timed out, where the operator needs "connection refused" or "no such role".
    PgConnection::connect_with(&options)
        .await
        .map_err(cannot)?
        .close()
        .await
        .map_err(cannot)?;
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

/// How a table of rows is printed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Aligned columns.
    Table,
    /// CSV with a header line.
    Csv,
    /// A JSON array.
    Json,
}

impl From<OutputFormat> for Format {
    fn from(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Table => Format::Table,
            OutputFormat::Csv => Format::Csv,
            OutputFormat::Json => Format::Json,
        }
    }
}

/// A cutoff: `YYYY-MM-DD` (midnight UTC) or an RFC 3339 timestamp.
pub(crate) fn parse_cutoff(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| "expected YYYY-MM-DD or an RFC 3339 timestamp".to_owned())
}

/// Warns on stderr when events sit in the default partition (see
/// `partitions::default_partition_used`).
pub(crate) async fn warn_if_default_partition_used(pool: &PgPool) -> Result<(), Failure> {
    if partitions::default_partition_used(pool).await? {
        eprintln!(
            "arbiter-session: warning: arbiter.session_events_default holds events (sessions \
             created on a day without a partition); run `arbiter-session partitions ensure` \
             daily, or leave store maintenance on"
        );
    }
    Ok(())
}
