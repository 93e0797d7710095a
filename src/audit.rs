//! Audit events: one per state change, written by the storage in the same statement as
//! the change itself, so the trail and the state can never disagree.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{SessionStatus, TaskSession};

/// What a state change was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// The session was created.
    Created,
    /// One call was counted.
    CallAllowed,
    /// A batch of calls was counted, all or nothing.
    BatchAllowed,
    /// The session was closed.
    Closed,
    /// The session was marked expired.
    Expired,
    /// The reconciler merged a cache state that was ahead of storage into a row that had
    /// changed meanwhile.
    Reconciled,
}

impl EventKind {
    /// The name stored in `session_events.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::CallAllowed => "call_allowed",
            EventKind::BatchAllowed => "batch_allowed",
            EventKind::Closed => "closed",
            EventKind::Expired => "expired",
            EventKind::Reconciled => "reconciled",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit row to write with a state change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditEvent {
    /// Unique key of the event (`session_events.event_key`). After a write whose outcome
    /// was unknown, the store asks storage which keys landed, so an event (and the change
    /// it records) is never applied twice.
    pub key: Uuid,
    /// What happened.
    pub kind: EventKind,
    /// The tool(s) of a call or batch; empty otherwise.
    pub tools: Vec<String>,
    /// Calls made after the event.
    pub calls_made: u64,
    /// Calls in the current rate window after the event.
    pub rate_window_calls: u64,
    /// Status after the event.
    pub status: SessionStatus,
    /// When the store decided (its clock).
    pub occurred_at: DateTime<Utc>,
    /// The store instance that wrote it.
    pub instance_id: Uuid,
}

impl AuditEvent {
    /// The event recording that `after` is the state following `kind`.
    pub(crate) fn new(
        kind: EventKind,
        tools: Vec<String>,
        after: &TaskSession,
        occurred_at: DateTime<Utc>,
        instance_id: Uuid,
    ) -> Self {
        AuditEvent {
            key: Uuid::new_v4(),
            kind,
            tools,
            calls_made: after.calls_made,
            rate_window_calls: after.rate_window_calls,
            status: after.status,
            occurred_at,
            instance_id,
        }
    }
}
