//! The main job in one run: migrate, create a session, call tools until the budget denies,
//! show a tool denial and an agent mismatch, close, and print each decision on one line.
//!
//! Run it with: `scripts/with-postgres cargo run --example quickstart`
//! (or set `DATABASE_URL` yourself).

use std::error::Error;

use arbiter_session::http::status_code_for_error;
use arbiter_session::{CreateSessionRequest, PgStorage, SessionError, SessionStore, migrate};
use chrono::Duration;
use uuid::Uuid;

/// Prints one decision: what was asked and what the gateway would answer.
fn show(what: &str, outcome: &Result<arbiter_session::TaskSession, SessionError>) {
    match outcome {
        Ok(s) => println!(
            "{what:<34} -> allow  (calls {}/{}, {})",
            s.calls_made, s.call_budget, s.status
        ),
        // `Display` is what an agent may see; `Debug` is for our own logs.
        Err(e) => println!("{what:<34} -> deny   {} \"{e}\"", status_code_for_error(e)),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, or run through scripts/with-postgres")?;
    let storage = PgStorage::connect(&url).await?;
    migrate(storage.pool()).await?;
    let store = SessionStore::new(storage);

    let agent = Uuid::new_v4();
    let request =
        CreateSessionRequest::new(agent, ["search", "read_file"], 3, Duration::minutes(5));
    let session = store.create(request).await?;
    let id = session.session_id;
    println!("created session {id} for agent {agent}");

    show(
        "use search",
        &store.use_session(id, "search", Some(agent)).await,
    );
    show(
        "use read_file",
        &store.use_session(id, "read_file", Some(agent)).await,
    );
    show(
        "use delete_repo",
        &store.use_session(id, "delete_repo", Some(agent)).await,
    );
    show(
        "use search as another agent",
        &store.use_session(id, "search", Some(Uuid::new_v4())).await,
    );
    show(
        "use search",
        &store.use_session(id, "search", Some(agent)).await,
    );
    show(
        "use search (budget spent)",
        &store.use_session(id, "search", Some(agent)).await,
    );
    show("close", &store.close(id).await);
    show(
        "use search after close",
        &store.use_session(id, "search", Some(agent)).await,
    );

    // Denials are recorded off the hot path; shutdown flushes them (and any pending write).
    let report = store.shutdown(std::time::Duration::from_secs(5)).await;
    println!(
        "shutdown: {} unflushed, {} unrecorded denials",
        report.unflushed.len(),
        report.unrecorded_denials
    );
    Ok(())
}
