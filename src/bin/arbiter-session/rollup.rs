//! `arbiter-session rollup`: the reports' rollups of the days that are over, and of today.

use arbiter_session::operator::rollup;
use sqlx::PgPool;

use crate::shell::Failure;

/// Rolls up, then says which days the reports read from rollups and which from raw events.
pub(crate) async fn run(pool: &PgPool) -> Result<(), Failure> {
    let outcome = rollup::roll_up(pool).await?;
    for day in &outcome.rolled {
        println!("rolled up {} ({} events)", day.day, day.events);
    }
    match (outcome.stopped_at, rollup::horizon(pool).await?) {
        (Some(day), _) => eprintln!(
            "arbiter-session: {day} is busy (inserts of its events, or another rollup, in \
             flight); the reports read it and later days from raw events until the next rollup"
        ),
        (None, Some(horizon)) => {
            println!("reports read rollups before {horizon} and raw events from it on");
            match outcome.today_until {
                Some(until) => println!(
                    "today's events are rolled up to {}",
                    until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ),
                None => eprintln!(
                    "arbiter-session: today is busy (another rollup of it, or an insert of its \
                     events, in flight); the reports read it from raw events until the next \
                     rollup"
                ),
            }
        }
        (None, None) => println!("no day to roll up"),
    }
    Ok(())
}
