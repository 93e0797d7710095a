//! One cached session: its state, the durable version that state is based on, and the
//! changes not yet durable. The async mutex around a [`SlotState`] is what serializes the
//! mutations of one session in this process; nothing else locks a session.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::{AuditEvent, EventKind};
use crate::model::{SessionStatus, TaskSession};
use crate::storage::{Version, Versioned};

/// A cache entry. Shared by the cache and, while its state is ahead of storage, by the
/// pending set, which pins it: eviction from the cache drops only the cache's reference.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) state: Mutex<SlotState>,
}

impl Slot {
    pub(crate) fn new(stored: Versioned) -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::new(stored)),
        })
    }
}

#[derive(Debug)]
pub(crate) struct SlotState {
    /// What this process believes: equal to `durable` unless a write failed, then ahead.
    pub(crate) current: TaskSession,
    /// The state as of `durable_version`, the base the next versioned write names.
    pub(crate) durable: TaskSession,
    pub(crate) durable_version: Version,
    /// Events of the changes applied to `current` but not yet durable, oldest first.
    /// Non-empty exactly when the slot is in the pending set.
    pub(crate) unwritten: Vec<AuditEvent>,
}

impl SlotState {
    pub(crate) fn new(stored: Versioned) -> Self {
        SlotState {
            current: stored.session.clone(),
            durable: stored.session,
            durable_version: stored.version,
            unwritten: Vec::new(),
        }
    }

    pub(crate) fn is_ahead(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// A write of `current` (and every unwritten event) succeeded at `version`.
    pub(crate) fn mark_durable(&mut self, version: Version) {
        self.durable = self.current.clone();
        self.durable_version = version;
        self.unwritten.clear();
    }

    /// Storage holds `fresh`, newer than our base. Adopt it, carrying over what this
    /// process counted but could not yet write, merged monotonically.
    pub(crate) fn rebase(&mut self, fresh: Versioned) {
        if self.is_ahead() {
            let merged = merge(&fresh.session, &self.durable, &self.current);
            trim_uncounted_calls(
                &mut self.unwritten,
                merged.calls_made - fresh.session.calls_made,
            );
            self.current = merged;
        } else {
            self.current = fresh.session.clone();
        }
        self.durable = fresh.session;
        self.durable_version = fresh.version;
    }

    /// The events a write of the current state must carry: every unwritten one, then
    /// `event`. Borrowed in the common case where nothing is unwritten.
    pub(crate) fn events_with<'a>(&'a self, event: &'a AuditEvent) -> Cow<'a, [AuditEvent]> {
        if self.unwritten.is_empty() {
            Cow::Borrowed(std::slice::from_ref(event))
        } else {
            let mut events = self.unwritten.clone();
            events.push(event.clone());
            Cow::Owned(events)
        }
    }

    /// The `reconciled` event recording the state a flush makes durable.
    pub(crate) fn reconciled_event(
        &self,
        at: chrono::DateTime<chrono::Utc>,
        instance_id: uuid::Uuid,
    ) -> AuditEvent {
        AuditEvent::new(
            EventKind::Reconciled,
            Vec::new(),
            &self.current,
            at,
            instance_id,
        )
    }
}

/// Merges the changes this process made (`base` -> `ahead`) into `fresh`, the newer state
/// in storage.
///
/// # Invariant: monotonic merge
/// Status never leaves closed or expired (a terminal status in storage wins, ours applies
/// only over active); counters never decrease (our increments are added to storage's),
/// and never pass the budget or the window's limit: increments that no longer fit are
/// dropped. They belong to calls that were denied (`StorageWriteThrough`) to the caller,
/// so dropping them never takes back a call that got `Ok`.
fn merge(fresh: &TaskSession, base: &TaskSession, ahead: &TaskSession) -> TaskSession {
    let added = ahead.calls_made.saturating_sub(base.calls_made);
    let calls_made = std::cmp::min(fresh.calls_made.saturating_add(added), fresh.call_budget);

    let (window_started_at, window_calls) =
        match (ahead.rate_window_started_at, fresh.rate_window_started_at) {
            (Some(ours), Some(theirs)) if ours == theirs => {
                let ours_added = if base.rate_window_started_at == Some(ours) {
                    ahead
                        .rate_window_calls
                        .saturating_sub(base.rate_window_calls)
                } else {
                    ahead.rate_window_calls
                };
                (
                    Some(ours),
                    fresh.rate_window_calls.saturating_add(ours_added),
                )
            }
            (Some(ours), theirs) if theirs.is_none_or(|theirs| ours > theirs) => {
                (Some(ours), ahead.rate_window_calls)
            }
            _ => (fresh.rate_window_started_at, fresh.rate_window_calls),
        };
    let window_calls = match fresh.rate_limit_per_minute {
        Some(limit) => std::cmp::min(window_calls, limit),
        None => window_calls,
    };

    let status = if fresh.status == SessionStatus::Active {
        ahead.status
    } else {
        fresh.status
    };
    TaskSession {
        calls_made,
        rate_window_started_at: window_started_at,
        rate_window_calls: window_calls,
        status,
        ..fresh.clone()
    }
}

/// Keeps only as many unwritten call events as the merge could still count (`room`
/// calls), so the audit trail never records a call the row does not count.
fn trim_uncounted_calls(events: &mut Vec<AuditEvent>, mut room: u64) {
    events.retain(|event| match event.kind {
        EventKind::CallAllowed | EventKind::BatchAllowed => {
            let calls = event.tools.len() as u64;
            if calls <= room {
                room -= calls;
                true
            } else {
                false
            }
        }
        _ => true,
    });
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::model::CreateSessionRequest;

    fn base(budget: u64) -> TaskSession {
        let req = CreateSessionRequest::new(Uuid::new_v4(), ["t"], budget, Duration::minutes(5));
        TaskSession::from_request(Uuid::new_v4(), &req, Utc::now())
    }

    fn with(s: &TaskSession, calls: u64, status: SessionStatus) -> TaskSession {
        TaskSession {
            calls_made: calls,
            status,
            ..s.clone()
        }
    }

    #[test]
    fn merge_adds_our_increments_to_theirs() {
        let b = with(&base(10), 2, SessionStatus::Active);
        let merged = merge(
            &with(&b, 5, SessionStatus::Active),
            &b,
            &with(&b, 4, SessionStatus::Active),
        );
        assert_eq!(merged.calls_made, 7);
    }

    #[test]
    fn merge_never_passes_budget_nor_reopens() {
        let b = with(&base(6), 2, SessionStatus::Active);
        let merged = merge(
            &with(&b, 5, SessionStatus::Closed),
            &b,
            &with(&b, 4, SessionStatus::Active),
        );
        assert_eq!(
            (merged.calls_made, merged.status),
            (6, SessionStatus::Closed)
        );
        let merged = merge(
            &with(&b, 5, SessionStatus::Active),
            &b,
            &with(&b, 2, SessionStatus::Expired),
        );
        assert_eq!(
            (merged.calls_made, merged.status),
            (5, SessionStatus::Expired)
        );
        let merged = merge(
            &with(&b, 5, SessionStatus::Expired),
            &b,
            &with(&b, 2, SessionStatus::Closed),
        );
        assert_eq!(
            merged.status,
            SessionStatus::Expired,
            "storage's terminal status wins"
        );
    }

    #[test]
    fn trim_drops_calls_that_no_longer_fit() {
        let s = base(10);
        let call = |n: usize| {
            AuditEvent::new(
                if n == 1 {
                    EventKind::CallAllowed
                } else {
                    EventKind::BatchAllowed
                },
                vec!["t".to_owned(); n],
                &s,
                Utc::now(),
                Uuid::nil(),
            )
        };
        let closed = AuditEvent::new(EventKind::Closed, vec![], &s, Utc::now(), Uuid::nil());
        let mut events = vec![call(1), call(2), closed.clone(), call(1)];
        trim_uncounted_calls(&mut events, 2);
        let kept: Vec<usize> = events.iter().map(|e| e.tools.len()).collect();
        assert_eq!(kept, vec![1, 0, 1]);
        assert_eq!(events[1], closed);
    }
}
