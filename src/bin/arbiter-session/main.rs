//! `arbiter-session`: the operator's command-line tool over an arbiter-session database,
//! and (feature `server`) the service.
//!
//! A thin shell over the library: each command is a module that parses its options, calls
//! `arbiter_session::operator` (or `arbiter_session::server`), and prints; `shell` turns
//! every failure into one line on stderr and a non-zero exit. This file only parses and
//! dispatches.

mod budgets;
mod checkpoint;
mod export;
mod inspect;
mod migrate;
mod partitions;
mod purge;
mod report;
mod rollup;
#[cfg(feature = "server")]
mod serve;
mod shell;
mod upkeep;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use shell::{Failure, fail};

#[derive(Debug, Parser)]
#[command(
    name = "arbiter-session",
    version,
    about = "Operate an arbiter-session database: migrate, inspect, report, budgets, export, verify, checkpoint, purge, partitions",
    after_help = "Exit status: 0 on success, 1 on an error (one line on stderr), \
                  2 on a usage error, 3 when `verify` or `checkpoint` finds a broken or rewritten audit chain."
)]
struct Cli {
    /// PostgreSQL URL of the database holding the `arbiter` schema.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Operate(OperatorCommand),
    /// Serve sessions over HTTP (with the `server` feature): the JSON API, Envoy's
    /// ext_authz check, health, Prometheus metrics and the OpenAPI document.
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
}

/// The commands that run once over the database, on one thread.
#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Apply the library's migrations (safe to run from several processes at once).
    Migrate,
    /// Show one session and its whole audit trail.
    Inspect(inspect::InspectArgs),
    /// Print a report from the reporting views.
    Report(report::ReportArgs),
    /// The budgets sessions share: list them, show one, or set one's terms.
    Budgets {
        #[command(subcommand)]
        action: budgets::BudgetsAction,
    },
    /// The audit trail's daily partitions: create the days ahead, or list them.
    Partitions {
        #[command(subcommand)]
        action: partitions::PartitionsAction,
    },
    /// Roll up the days that are over, and today so far, for the reports (each store's
    /// upkeep does this every minute; `upkeep` does it with the partitions).
    Rollup,
    /// The upkeep a store runs every minute unless it is told not to (`serve
    /// --no-upkeep`): create the audit trail's partitions a week ahead, then roll up for
    /// the reports. Run it as the schema's owner, from cron or, with --every, as a sidecar.
    Upkeep(upkeep::UpkeepArgs),
    /// Stream the audit events that occurred in a time range, in order, with their hashes.
    Export(export::ExportArgs),
    /// Verify the audit hash chain of one session, or of every session.
    Verify(verify::VerifyArgs),
    /// Verify every chain and write their heads (a checkpoint) to stdout or append them to a
    /// file; keep it where the database's administrators cannot write.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Delete sessions that ended before a date (never a live one); keeps their audit
    /// events unless --events is given.
    Purge(purge::PurgeArgs),
}

fn main() -> ExitCode {
    let Cli {
        database_url,
        command,
    } = Cli::parse();
    let outcome = match command {
        Command::Operate(command) => runtime(tokio::runtime::Builder::new_current_thread())
            .and_then(|runtime| {
                runtime.block_on(async {
                    let pool = shell::connect(&database_url).await?;
                    operate(&pool, command).await
                })
            }),
        // A service: one worker thread per core.
        #[cfg(feature = "server")]
        Command::Serve(args) => {
            runtime(tokio::runtime::Builder::new_multi_thread()).and_then(|runtime| {
                runtime
                    .block_on(serve::run(&database_url, args))
                    .map(|()| ExitCode::SUCCESS)
            })
        }
    };
    outcome.unwrap_or_else(fail)
}

fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, Failure> {
    Ok(builder.enable_all().build()?)
}

async fn operate(pool: &sqlx::PgPool, command: OperatorCommand) -> Result<ExitCode, Failure> {
    match command {
        OperatorCommand::Migrate => migrate::run(pool).await?,
        OperatorCommand::Inspect(args) => inspect::run(pool, args).await?,
        OperatorCommand::Report(args) => report::run(pool, args).await?,
        OperatorCommand::Budgets { action } => budgets::run(pool, action).await?,
        OperatorCommand::Partitions { action } => partitions::run(pool, action).await?,
        OperatorCommand::Rollup => rollup::run(pool).await?,
        OperatorCommand::Upkeep(args) => upkeep::run(pool, args).await?,
        OperatorCommand::Export(args) => export::run(pool, args).await?,
        OperatorCommand::Verify(args) => return verify::run(pool, args).await,
        OperatorCommand::Checkpoint(args) => return checkpoint::run(pool, args).await,
        OperatorCommand::Purge(args) => purge::run(pool, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}
