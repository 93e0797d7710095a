//! `arbiter-session report`: the reporting views, printed.

use arbiter_session::operator::report::{self, Format, ReportFilter};
use chrono::NaiveDate;
use clap::ValueEnum;
use sqlx::PgPool;
use uuid::Uuid;

use crate::shell::{Failure, OutputFormat};

/// Options of `arbiter-session report`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReportArgs {
    /// Which report.
    report: ReportKind,
    /// Only this agent.
    #[arg(long)]
    agent: Option<Uuid>,
    /// Only from this UTC day on (YYYY-MM-DD); for budgets, the periods that end after it.
    #[arg(long)]
    since: Option<NaiveDate>,
    /// Only up to this UTC day, that day included (YYYY-MM-DD); for budgets, the periods
    /// that start before the day after it.
    #[arg(long)]
    until: Option<NaiveDate>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
}

/// The reports.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReportKind {
    /// Per-session budget use, status, duration and denials.
    Utilization,
    /// Per-agent activity per day: sessions opened, calls allowed, denials by reason.
    Agents,
    /// Calls per tool per day.
    Tools,
    /// Denials per reason per day.
    Denials,
    /// Each budget's use per period, with its limit.
    Budgets,
}

/// Prints the report asked for.
pub(crate) async fn run(pool: &PgPool, args: ReportArgs) -> Result<(), Failure> {
    let filter = ReportFilter::default()
        .with_agent(args.agent)
        .with_since(args.since)
        .with_until(args.until);
    let format = Format::from(args.format);
    let text = match args.report {
        ReportKind::Utilization => {
            report::render(&report::utilization(pool, filter).await?, format)?
        }
        ReportKind::Agents => report::render(&report::agent_activity(pool, filter).await?, format)?,
        ReportKind::Tools => report::render(&report::tool_usage(pool, filter).await?, format)?,
        ReportKind::Denials => report::render(&report::denials(pool, filter).await?, format)?,
        ReportKind::Budgets => {
            report::render(&report::budget_periods(pool, filter).await?, format)?
        }
    };
    print!("{text}");
    Ok(())
}
