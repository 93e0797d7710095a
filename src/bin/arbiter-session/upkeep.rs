//! `arbiter-session upkeep`: what a store's upkeep does, for deployments that serve with
//! `--no-upkeep` (the serving role does not own the schema).

use std::time::Duration;

use arbiter_session::operator::{partitions, rollup};
use sqlx::PgPool;

use crate::shell::Failure;

/// Options of `arbiter-session upkeep`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpkeepArgs {
    /// Run again every SECS seconds until stopped, reporting a failed run on stderr
    /// instead of exiting.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    every: Option<u64>,
}

/// One run, or one every `--every` seconds until stopped.
pub(crate) async fn run(pool: &PgPool, args: UpkeepArgs) -> Result<(), Failure> {
    let Some(secs) = args.every else {
        return once(pool).await;
    };
    loop {
        if let Err(Failure(text)) = once(pool).await {
            eprintln!("arbiter-session: upkeep failed, trying again in {secs} s: {text}");
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

/// One upkeep run: the partitions a week ahead, then the rollups; one line of what it did.
async fn once(pool: &PgPool) -> Result<(), Failure> {
    let created = partitions::ensure(pool, 7).await?;
    let outcome = rollup::roll_up(pool).await?;
    let today = match (outcome.stopped_at, outcome.today_until) {
        (Some(day), _) => format!("stopped at {day}, which is busy"),
        (None, Some(until)) => format!(
            "today rolled up to {}",
            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        (None, None) => "today is busy".to_owned(),
    };
    println!(
        "upkeep: created {created} partitions; rolled up {} days; {today}",
        outcome.rolled.len()
    );
    Ok(())
}
