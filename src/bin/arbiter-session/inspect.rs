//! `arbiter-session inspect`: one session and its whole audit trail.

use arbiter_session::operator::report;
use sqlx::PgPool;
use uuid::Uuid;

use crate::shell::{Failure, OutputFormat, warn_if_default_partition_used};

/// Options of `arbiter-session inspect`.
#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// The session id.
    session_id: Uuid,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
}

/// Prints the session's fields (unless its row was purged), then its events.
pub(crate) async fn run(pool: &PgPool, args: InspectArgs) -> Result<(), Failure> {
    let InspectArgs { session_id, format } = args;
    warn_if_default_partition_used(pool).await?;
    let session = report::session(pool, session_id).await?;
    let events = report::session_events(pool, session_id).await?;
    if session.is_none() && events.is_empty() {
        return Err(Failure(format!("session {session_id} not found")));
    }
    match format {
        OutputFormat::Json => {
            let both = serde_json::json!({ "session": session, "events": events });
            println!("{}", serde_json::to_string_pretty(&both)?);
        }
        OutputFormat::Table | OutputFormat::Csv => {
            match &session {
                Some(session) if matches!(format, OutputFormat::Table) => {
                    print!("{}", session.render_fields());
                    println!();
                }
                Some(_) => {}
                None => eprintln!("session {session_id}: the row was purged; its events remain"),
            }
            print!("{}", report::render(&events, format.into())?);
        }
    }
    Ok(())
}
