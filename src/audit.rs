//! Audit events: one per state change, written by the storage in the same statement as
//! the change itself, so the trail and the state can never disagree.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::budget::BudgetId;
use crate::error::SessionError;
use crate::model::{SessionStatus, TaskSession, ToolLimit};

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
    /// A call was denied (see [`AuditEvent::reason`]). Changes no state.
    Denied,
    /// A reservation was settled: [`AuditEvent::cost`] is its actual cost less its
    /// estimate (negative when units were released).
    Settled,
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
            EventKind::Denied => "denied",
            EventKind::Settled => "settled",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call was denied, as recorded in `session_events.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenialReason {
    /// Presented by another agent than the session's.
    AgentMismatch,
    /// The session is closed.
    Closed,
    /// The session is expired (status or time limit).
    Expired,
    /// No budget left for the call(s).
    Budget,
    /// A tool of the call has used up its own limit (see
    /// [`CreateSessionRequest::tool_limits`](crate::CreateSessionRequest::tool_limits)).
    ToolBudget,
    /// A tool is not in the allow-list.
    Tool,
    /// The rate window is full.
    Rate,
    /// Counted but not made durable: the caller got `StorageWriteThrough`.
    WriteThrough,
    /// The request was malformed (an empty or oversized batch).
    Invalid,
    /// A shared budget (the session's, or one of its ancestors) had no room for the
    /// call's cost; the denial's [`AuditEvent::budget_id`] names it.
    SharedBudget,
}

impl DenialReason {
    /// The name stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            DenialReason::AgentMismatch => "agent_mismatch",
            DenialReason::Closed => "closed",
            DenialReason::Expired => "expired",
            DenialReason::Budget => "budget",
            DenialReason::ToolBudget => "tool_budget",
            DenialReason::Tool => "tool",
            DenialReason::Rate => "rate",
            DenialReason::WriteThrough => "write_through",
            DenialReason::Invalid => "invalid",
            DenialReason::SharedBudget => "shared_budget",
        }
    }

    /// The reason for a call on `session` denied with `err`: [`Self::of`], except that a
    /// [`SessionError::BudgetExceeded`] whose limit is below the session's budget is a
    /// tool's limit ([`DenialReason::ToolBudget`]). A tool's limit at or above the budget
    /// is never the one reached (the budget is checked first, and a tool's calls are some
    /// of the session's), so the two cannot be confused.
    pub fn of_call(err: &SessionError, session: &TaskSession) -> Option<Self> {
        match err {
            SessionError::BudgetExceeded { limit, .. } if *limit < session.call_budget => {
                Some(DenialReason::ToolBudget)
            }
            _ => Self::of(err),
        }
    }

    /// The reason for a call denied with `err`; `None` for errors that say nothing about the
    /// session (not found, a failed read), which are not recorded. A tool's limit reads as
    /// [`DenialReason::Budget`] here: [`Self::of_call`] tells it apart.
    pub fn of(err: &SessionError) -> Option<Self> {
        Some(match err {
            SessionError::AgentMismatch { .. } => DenialReason::AgentMismatch,
            SessionError::AlreadyClosed(_) => DenialReason::Closed,
            SessionError::Expired(_) => DenialReason::Expired,
            SessionError::BudgetExceeded { .. } => DenialReason::Budget,
            SessionError::ToolNotAuthorized { .. } => DenialReason::Tool,
            SessionError::RateLimited { .. } => DenialReason::Rate,
            SessionError::StorageWriteThrough { .. } => DenialReason::WriteThrough,
            SessionError::InvalidRequest { .. } => DenialReason::Invalid,
            SessionError::SharedBudgetExceeded { .. } => DenialReason::SharedBudget,
            SessionError::NotFound(_)
            | SessionError::StorageRead { .. }
            | SessionError::TooManySessions { .. }
            | SessionError::ReservationNotFound(_)
            | SessionError::ReservationSettled(_) => return None,
        })
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
    /// Why the call was denied; `Some` exactly for [`EventKind::Denied`].
    pub reason: Option<DenialReason>,
    /// The calls after the event of the tools with a limit of their own that it counted,
    /// sorted by tool name: for [`EventKind::CallAllowed`] and [`EventKind::BatchAllowed`]
    /// the limited tools among [`Self::tools`], for [`EventKind::Reconciled`] every limited
    /// tool of the session (it records the whole merged state); empty otherwise. Part of
    /// the event's hash in PostgreSQL.
    pub tool_calls: Vec<ToolCalls>,
    /// An allowed call of a session with a shared budget: the units it cost (a
    /// reservation's estimate); a settlement: the actual cost less the estimate. `None`
    /// otherwise. Part of the event's hash.
    pub cost: Option<i64>,
    /// The share of the shared budget the cost was charged to (the writing process's; for
    /// a settlement, the share its reservation's estimate was charged to). Part of the
    /// event's hash.
    pub share_id: Option<Uuid>,
    /// An allowed call: the session's shared budget; a denial for
    /// [`DenialReason::SharedBudget`]: the budget that had no room. Part of the event's
    /// hash.
    pub budget_id: Option<BudgetId>,
    /// A reservation this event makes or settles. Kept in `arbiter.budget_reservations`,
    /// written with the event; not part of its row or its hash (a reservation's id is the
    /// key of the event that made it).
    pub reservation: Option<ReservationChange>,
}

/// What an event does to a reservation ([`AuditEvent::reservation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReservationChange {
    /// The call reserves its cost (the estimate) until `expires_at`; the reservation's id
    /// is the event's key.
    Made {
        /// When it lapses, settled at its estimate.
        expires_at: DateTime<Utc>,
    },
    /// The reservation `reservation_id` is settled at `charged`.
    Settled {
        /// The reservation.
        reservation_id: Uuid,
        /// Its actual cost.
        charged: u64,
    },
}

/// A tool with a limit of its own and its calls after an event ([`AuditEvent::tool_calls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ToolCalls {
    /// The tool's name.
    pub tool: Arc<str>,
    /// Its calls in the session after the event.
    pub calls: u64,
}

impl ToolCalls {
    /// The calls of `tool` after an event.
    pub fn new(tool: Arc<str>, calls: u64) -> Self {
        ToolCalls { tool, calls }
    }
}

/// What an event of `kind` about `tools` records of the limited tools of `after` (see
/// [`AuditEvent::tool_calls`]). Empty, without allocating, for a session without limits.
pub(crate) fn tool_calls_of(
    kind: EventKind,
    tools: &[String],
    after: &TaskSession,
) -> Vec<ToolCalls> {
    let counted = |limit: &ToolLimit| match kind {
        EventKind::CallAllowed | EventKind::BatchAllowed => {
            tools.iter().any(|tool| *tool == *limit.tool)
        }
        EventKind::Reconciled => true,
        _ => false,
    };
    after
        .tool_limits
        .iter()
        .filter(|limit| counted(limit))
        .map(|limit| ToolCalls::new(Arc::clone(&limit.tool), limit.calls))
        .collect()
}

impl AuditEvent {
    /// The event recording that `after` is the state following `kind`, with a fresh key.
    /// For [`Storage`](crate::Storage) implementations and their tests; the store makes
    /// its own.
    pub fn new(
        kind: EventKind,
        tools: Vec<String>,
        after: &TaskSession,
        occurred_at: DateTime<Utc>,
        instance_id: Uuid,
    ) -> Self {
        AuditEvent {
            key: Uuid::new_v4(),
            kind,
            calls_made: after.calls_made,
            rate_window_calls: after.rate_window_calls,
            status: after.status,
            occurred_at,
            instance_id,
            reason: None,
            tool_calls: tool_calls_of(kind, &tools, after),
            tools,
            cost: None,
            share_id: None,
            budget_id: None,
            reservation: None,
        }
    }

    /// The share this event's call was charged to, if any: a settlement names the share of
    /// its reservation but takes no units of it, so it is not charged to it.
    pub fn charged_share(&self) -> Option<Uuid> {
        self.share_id.filter(|_| self.kind != EventKind::Settled)
    }

    /// The event recording that a call of `tools` was denied for `reason`, with the
    /// session's counters as they stood.
    fn denied(
        reason: DenialReason,
        tools: Vec<String>,
        session: &TaskSession,
        occurred_at: DateTime<Utc>,
        instance_id: Uuid,
    ) -> Self {
        AuditEvent {
            reason: Some(reason),
            ..AuditEvent::new(EventKind::Denied, tools, session, occurred_at, instance_id)
        }
    }
}

/// Most tool names a denial keeps of its call: an agent may name up to
/// [`MAX_TOOLS`](crate::model::limits::MAX_TOOLS) in a batch, and its denial row must not
/// be as large as its request. [`Denial::tool_count`] says how many the call named.
pub const DENIAL_TOOLS_KEPT: usize = 16;

/// A denied call waiting to be recorded: its event and the session it was about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Denial {
    /// The session the call presented.
    pub session_id: Uuid,
    /// The agent the session is bound to.
    pub agent_id: Uuid,
    /// The agent that presented the session (another one for
    /// [`DenialReason::AgentMismatch`]); `None` when the caller named none.
    pub presented_agent_id: Option<Uuid>,
    /// How many tools the denied call named; its event keeps the first
    /// [`DENIAL_TOOLS_KEPT`].
    pub tool_count: usize,
    /// When the session was created: PostgreSQL files the denial with the session's other
    /// events, in the partition of that day.
    pub session_created_at: DateTime<Utc>,
    /// The `denied` event.
    pub event: AuditEvent,
}

impl Denial {
    /// The denial of a call of `tools` on `session` for `reason`, decided at `at` by
    /// `instance_id`, with the session's counters as they stood and a fresh event key.
    /// Its event keeps the first [`DENIAL_TOOLS_KEPT`] tools, and names that could never
    /// be stored are replaced (see the `tools` of its event). No presenting agent: see
    /// [`Self::presented_by`]. For [`Storage`](crate::Storage) implementations and their
    /// tests; the store makes its own.
    pub fn new(
        reason: DenialReason,
        tools: &[&str],
        session: &TaskSession,
        at: DateTime<Utc>,
        instance_id: Uuid,
    ) -> Self {
        Denial {
            session_id: session.session_id,
            agent_id: session.agent_id,
            presented_agent_id: None,
            tool_count: tools.len(),
            session_created_at: session.created_at,
            event: AuditEvent::denied(reason, recordable_tools(tools), session, at, instance_id),
        }
    }

    /// The same denial, presented by `agent`.
    #[must_use]
    pub fn presented_by(self, agent: Option<Uuid>) -> Self {
        Denial {
            presented_agent_id: agent,
            ..self
        }
    }

    /// About how many bytes of memory this denial holds while it waits to be recorded.
    pub(crate) fn approximate_size(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .event
                .tools
                .iter()
                .map(|tool| std::mem::size_of::<String>() + tool.len())
                .sum::<usize>()
    }
}

/// The tools of a denied call as they can be stored: its first [`DENIAL_TOOLS_KEPT`]
/// names, each replaced by a marker if it could never be an allow-list entry (empty, too
/// long, NUL), since an agent may send anything.
fn recordable_tools(tools: &[&str]) -> Vec<String> {
    tools
        .iter()
        .take(DENIAL_TOOLS_KEPT)
        .map(|tool| {
            if crate::model::is_valid_name(tool) {
                (*tool).to_owned()
            } else {
                format!("<invalid name of {} bytes>", tool.len())
            }
        })
        .collect()
}
