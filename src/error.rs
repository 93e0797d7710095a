//! Errors: [`SessionError`], what every call of the store returns (the public contract),
//! and [`StorageError`], what a [`Storage`](crate::storage::Storage) implementation returns
//! to the store.
//!
//! # Invariant: opacity
//! `Display` of a [`SessionError`] is sent to untrusted agents (HTTP error bodies), so it is a
//! fixed string per variant and never contains a limit, a count, a tool name, an id or a
//! storage detail. `Debug` keeps every field for structured logs. The nine variants of
//! arbiter-session 0.0.48 keep their names, fields and `Display` strings exactly.

use thiserror::Error;
use uuid::Uuid;

/// Errors from session operations.
///
/// Display impls are intentionally opaque: they appear in HTTP error responses sent to
/// agents. Internal fields are preserved for structured logging via `Debug`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The referenced session does not exist.
    #[error("session not found")]
    NotFound(Uuid),

    /// The session has expired (time limit exceeded).
    #[error("session expired")]
    Expired(Uuid),

    /// The session's call budget has been exhausted.
    #[error("session budget exceeded")]
    BudgetExceeded {
        /// The session.
        session_id: Uuid,
        /// The session's call budget.
        limit: u64,
        /// Calls already made when the request was denied.
        used: u64,
    },

    /// The requested tool is not in the session's authorized set.
    #[error("tool not authorized in session")]
    ToolNotAuthorized {
        /// The session.
        session_id: Uuid,
        /// The first requested tool that is not authorized.
        tool: String,
    },

    /// The session has already been closed.
    #[error("session already closed")]
    AlreadyClosed(Uuid),

    /// The session's rate limit (calls per rate window) has been exceeded.
    ///
    /// The field keeps its historical name; the window is the session's
    /// `rate_limit_window_secs`, one minute by convention.
    #[error("session rate limit exceeded")]
    RateLimited {
        /// The session.
        session_id: Uuid,
        /// Calls allowed per rate window.
        limit_per_minute: u64,
    },

    /// The presenting agent does not match the session's bound agent.
    #[error("agent mismatch")]
    AgentMismatch {
        /// The session.
        session_id: Uuid,
        /// The agent the session is bound to.
        expected: Uuid,
        /// The agent that presented the session.
        actual: Uuid,
    },

    /// Storage write-through failed after updating cache.
    /// The session state in the cache is ahead of durable storage.
    ///
    /// The gateway must deny the call that got this error. The session is queued for
    /// reconciliation; the call stays counted against the budget (the safe side).
    #[error("storage write-through failed")]
    StorageWriteThrough {
        /// The session.
        session_id: Uuid,
        /// What failed, for logs only.
        detail: String,
    },

    /// The agent has reached the maximum number of concurrent active sessions.
    ///
    /// P0: Per-agent session cap to prevent session multiplication attacks.
    #[error("too many concurrent sessions")]
    TooManySessions {
        /// The agent.
        agent_id: String,
        /// The cap that was asked for.
        max: u64,
        /// Live sessions the agent had when the request was refused.
        current: u64,
    },

    /// Storage could not be read, so the answer is unknown (never reported as
    /// [`SessionError::NotFound`]). Nothing was changed.
    #[error("session storage unavailable")]
    StorageRead {
        /// The session, when the read was about one.
        session_id: Option<Uuid>,
        /// What failed, for logs only.
        detail: String,
    },

    /// The request was malformed (a create request out of bounds, an empty batch).
    /// Nothing was written.
    #[error("invalid session request")]
    InvalidRequest {
        /// Which field or rule was violated, for logs only.
        reason: String,
    },

    /// A shared budget the session draws on (its own, or one of its ancestors) has no
    /// room for the call's cost: every unit not yet spent is held by another process or a
    /// reservation. The same opaque `Display` as [`SessionError::BudgetExceeded`], and the
    /// same error code (`budget_exceeded`); `budget_id` names the budget, for logs and the
    /// audit trail (reason `shared_budget`).
    #[error("session budget exceeded")]
    SharedBudgetExceeded {
        /// The session whose call was denied.
        session_id: Uuid,
        /// The budget that had no room.
        budget_id: String,
    },

    /// No reservation has this id.
    #[error("reservation not found")]
    ReservationNotFound(Uuid),

    /// The reservation was settled already, or lapsed (settled at its estimate). Nothing
    /// was charged.
    #[error("reservation already settled")]
    ReservationSettled(Uuid),
}

/// A storage failure, typed so that callers (the store, the reconciler) decide from the
/// kind, never from message text. Flattened into [`SessionError`] only at the public edge.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database could not be reached or the statement did not complete (connection
    /// lost, pool timeout, statement timeout). Worth retrying.
    #[error("storage unavailable")]
    Transient(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A named constraint or trigger refused the write. Not worth retrying as is.
    #[error("constraint {name} refused the write")]
    Constraint {
        /// The constraint or trigger name (see the migrations).
        name: String,
        /// The database error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored row could not be turned into a session.
    #[error("stored row is invalid: {0}")]
    Decode(String),
    /// Storage did not answer within the store's `storage_timeout` (a stalled network or
    /// server). The operation may still complete on the server.
    #[error("storage did not answer within {after:?}")]
    TimedOut {
        /// The deadline that passed.
        after: std::time::Duration,
    },
    /// A write charged a share of a shared budget that is closed or whose lease ran out
    /// (`arbiter.budget_charge`): nothing was written. The units it counted on may have
    /// gone back to the budget; the store decides the write's calls again on a new share.
    #[error("share {share_id} of a shared budget is no longer live")]
    ShareClosed {
        /// The share.
        share_id: Uuid,
    },
    /// The storage does not keep what the operation needs (shared budgets in
    /// [`MemoryStorage`](crate::MemoryStorage)).
    #[error("this storage does not support {0}")]
    Unsupported(&'static str),
}

impl StorageError {
    /// Whether the failure says nothing about the data (the database was unreachable or
    /// slow), so that retrying later is the remedy.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Transient(_) | StorageError::TimedOut { .. }
        )
    }
}

impl From<sqlx::Error> for StorageError {
    fn from(err: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &err
            && db.constraint() == Some("budget_shares_live")
            && let Some(share_id) = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .and_then(|detail| detail.parse().ok())
        {
            return StorageError::ShareClosed { share_id };
        }
        if let sqlx::Error::Database(db) = &err
            && let Some(name) = db.constraint()
        {
            return StorageError::Constraint {
                name: parent_constraint(db.table(), name),
                source: Box::new(err),
            };
        }
        match err {
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StorageError::Decode(err.to_string())
            }
            other => StorageError::Transient(Box::new(other)),
        }
    }
}

/// The name a constraint has on `arbiter.session_events` for one reported on one of its
/// partitions: PostgreSQL names the partition's copy (`session_events_20261201_key_unique`,
/// migration `20261201000001_event_partitions.sql`), and callers match the parent's name.
fn parent_constraint(table: Option<&str>, name: &str) -> String {
    const PARENT: &str = "session_events_";
    if let Some(table) = table
        && table.starts_with(PARENT)
        && let Some(suffix) = name
            .strip_prefix(table)
            .and_then(|rest| rest.strip_prefix('_'))
    {
        return format!("{PARENT}{suffix}");
    }
    name.to_owned()
}

/// Renders an error with its whole `source()` chain on one line, for logs, `detail`
/// fields and the command-line tool. Many errors already print their source in their own
/// message; a cause whose text is already there is not repeated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parent_constraint;

    #[test]
    fn a_partition_constraint_is_reported_under_the_parent_name() {
        let day = Some("session_events_20261201");
        assert_eq!(
            parent_constraint(day, "session_events_20261201_key_unique"),
            "session_events_key_unique"
        );
        assert_eq!(
            parent_constraint(
                Some("session_events_default"),
                "session_events_default_pkey"
            ),
            "session_events_pkey"
        );
        // Copied CHECK constraints keep the parent's name; other tables are untouched.
        assert_eq!(
            parent_constraint(day, "session_events_kind_known"),
            "session_events_kind_known"
        );
        assert_eq!(
            parent_constraint(Some("sessions"), "sessions_pkey"),
            "sessions_pkey"
        );
        assert_eq!(parent_constraint(None, "x"), "x");
    }
}
