//! `arbiter-session partitions`: the audit trail's daily partitions.

use arbiter_session::operator::{partitions, report};
use clap::Subcommand;
use sqlx::PgPool;

use crate::shell::{Failure, OutputFormat, warn_if_default_partition_used};

/// What `arbiter-session partitions` does.
#[derive(Debug, Subcommand)]
pub(crate) enum PartitionsAction {
    /// Create the partitions from yesterday to --days-ahead days from today (UTC) that do
    /// not exist yet. Each store's upkeep (or `upkeep`) does this every minute.
    Ensure {
        /// How many days ahead.
        #[arg(long, default_value_t = 7,
              value_parser = clap::value_parser!(u16).range(0..=i64::from(partitions::MAX_DAYS_AHEAD)))]
        days_ahead: u16,
    },
    /// List the partitions: day, estimated rows, size.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

/// Creates or lists the partitions; warns when the default partition holds events.
pub(crate) async fn run(pool: &PgPool, action: PartitionsAction) -> Result<(), Failure> {
    match action {
        PartitionsAction::Ensure { days_ahead } => {
            let created = partitions::ensure(pool, days_ahead).await?;
            println!(
                "created {created} partitions; every day through {days_ahead} days ahead has one"
            );
        }
        PartitionsAction::List { format } => {
            let list = partitions::list(pool).await?;
            print!("{}", report::render(&list, format.into())?);
        }
    }
    warn_if_default_partition_used(pool).await
}
