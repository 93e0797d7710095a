//! The group commit's statement (`sql/update_batch.sql`): versioned updates of many
//! sessions, with their events, in one statement and one commit.
//!
//! # Invariant: one row, one write per statement
//! The statement joins its input to the sessions by id, so a session may appear in it
//! once: a second write of the same session would share the first one's outcome and
//! version. [`update_many`] sends the first write of each session in the statement and any
//! later one on its own afterwards, on its own version.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;

use super::PgStorage;
use super::rows::{
    BatchEventJson, EventJson, reservations_literals, to_bigint, tool_calls_literal,
};
use crate::error::StorageError;
use crate::storage::{BatchUpdate, UpdateOutcome};

/// Writes `batch` (two writes or more), each on its own version, in as few statements as
/// the invariant allows.
pub(super) async fn update_many(
    pool: &PgPool,
    batch: &[BatchUpdate<'_>],
) -> Result<Vec<UpdateOutcome>, StorageError> {
    // The store never sends one session twice (one slot per session, one write in flight
    // per slot), but `update_many`'s contract allows it: a repeat goes out after the
    // batch, and conflicts or applies on its own version.
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    let (first, again): (Vec<_>, Vec<_>) = batch
        .iter()
        .enumerate()
        .partition(|(_, u)| seen.insert(u.session.session_id));
    if again.is_empty() {
        return distinct(pool, batch).await;
    }
    let firsts: Vec<BatchUpdate<'_>> = first.iter().map(|(_, u)| **u).collect();
    let mut outcomes = vec![UpdateOutcome::Conflict; batch.len()];
    for ((index, _), outcome) in first.iter().zip(distinct(pool, &firsts).await?) {
        outcomes[*index] = outcome;
    }
    for (index, u) in again {
        outcomes[index] = PgStorage::update_with(pool, u.session, u.expected, u.events).await?;
    }
    Ok(outcomes)
}

/// A batch of distinct sessions: one statement.
async fn distinct(
    pool: &PgPool,
    batch: &[BatchUpdate<'_>],
) -> Result<Vec<UpdateOutcome>, StorageError> {
    // The new states as parallel arrays, one element per session. PostgreSQL sizes an
    // `unnest` of array parameters from the arrays, so a batch of a few sessions finds
    // them through the primary key; a JSON input is always guessed at 100 rows, which
    // planned small batches as sequential scans of `sessions` (measured: twice the time
    // of a batch of 8 on a table of a few hundred churned rows).
    let n = batch.len();
    let mut session_ids = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut calls_made = Vec::with_capacity(n);
    let mut window_starts = Vec::with_capacity(n);
    let mut window_calls = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    for u in batch {
        session_ids.push(u.session.session_id);
        expected.push(u.expected);
        calls_made.push(to_bigint(u.session.calls_made));
        window_starts.push(u.session.rate_window_started_at);
        window_calls.push(to_bigint(u.session.rate_window_calls));
        statuses.push(u.session.status.as_str());
    }
    let literals: Vec<Option<String>> = batch
        .iter()
        .map(|u| tool_calls_literal(u.session))
        .collect();
    let tool_calls: Vec<&str> = literals
        .iter()
        .map(|literal| literal.as_deref().unwrap_or("{}"))
        .collect();
    let (reservation_ids, reservations_until): (Vec<String>, Vec<String>) = batch
        .iter()
        .map(|u| reservations_literals(u.session))
        .unzip();
    let events: Vec<BatchEventJson<'_>> = batch
        .iter()
        .flat_map(|u| {
            u.events.iter().map(|event| BatchEventJson {
                session_id: u.session.session_id,
                event: EventJson::from(event),
            })
        })
        .collect();
    // One statement, one commit. The rows are locked first, skipping any row another
    // transaction holds (see the module's invariant). Then each row is updated only
    // where its own version matches, and only the updated sessions get their events.
    // A session missing from the result was skipped or changed meanwhile: a conflict.
    let applied = sqlx::query_file!(
        "src/storage/postgres/sql/update_batch.sql",
        &session_ids,
        &expected,
        &calls_made,
        // The macro's check knows arrays only as `&[T]`: NULL elements (a window not
        // started) and borrowed strings are typed by hand.
        &window_starts as &[Option<DateTime<Utc>>],
        &window_calls,
        &statuses as &[&str],
        Json(&events) as _,
        &tool_calls as &[&str],
        &reservation_ids,
        &reservations_until,
    )
    .fetch_all(pool)
    .await?;
    Ok(batch
        .iter()
        .map(|u| {
            applied
                .iter()
                .find(|row| row.session_id == u.session.session_id)
                .map_or(UpdateOutcome::Conflict, |row| {
                    UpdateOutcome::Applied(row.version)
                })
        })
        .collect())
}
