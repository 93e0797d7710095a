//! One cached session: its state, the durable version that state is based on, and the
//! changes not yet durable. The async mutex around a [`SlotState`] is what serializes the
//! mutations of one session in this process; nothing else locks a session.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::audit::{AuditEvent, EventKind};
use crate::model::{SessionStatus, TaskSession};
use crate::storage::{Version, Versioned};

use super::write_through::Queued;

/// A cache entry. Shared by the cache and, while its state is ahead of storage, by the
/// pending set, which pins it: eviction from the cache drops only the cache's reference.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) state: Mutex<SlotState>,
    /// Mutations waiting for whoever holds `state` next (see `write_through`'s combining).
    /// Locked only to push or drain, never across an await.
    queue: std::sync::Mutex<Vec<Queued>>,
}

impl Slot {
    pub(crate) fn new(stored: Versioned) -> Arc<Self> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::new(stored)),
            queue: std::sync::Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn enqueue(&self, queued: Queued) {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(queued);
    }

    pub(crate) fn drain(&self) -> Vec<Queued> {
        std::mem::take(
            &mut *self
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

#[derive(Debug)]
pub(crate) struct SlotState {
    /// What this process believes: what storage holds at `durable_version`, plus the
    /// changes of `unwritten` when a write failed.
    pub(crate) current: TaskSession,
    /// The version the next versioned write names.
    pub(crate) durable_version: Version,
    /// Events of the changes applied to `current` but not known to be durable, oldest
    /// first. Non-empty exactly when the slot is in the pending set. Every write attempt
    /// carries all of them, so the ones that landed (an ambiguous failure that did commit)
    /// are always a prefix.
    pub(crate) unwritten: Vec<AuditEvent>,
    /// Whether this slot is in the pending set. It can stay pinned after `unwritten`
    /// emptied (a rebase found that everything landed) until the store unpins it.
    pub(crate) pinned: bool,
}

impl SlotState {
    pub(crate) fn new(stored: Versioned) -> Self {
        SlotState {
            current: stored.session,
            durable_version: stored.version,
            unwritten: Vec::new(),
            pinned: false,
        }
    }

    pub(crate) fn is_ahead(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// Keys of the unwritten events, to ask storage which of them landed.
    pub(crate) fn unwritten_keys(&self) -> Vec<uuid::Uuid> {
        self.unwritten.iter().map(|event| event.key).collect()
    }

    /// A write of `current` (and every unwritten event) succeeded at `version`.
    pub(crate) fn mark_durable(&mut self, version: Version) {
        self.durable_version = version;
        self.unwritten.clear();
    }

    /// Storage holds `fresh`, newer than our version, and already contains the first
    /// `landed` unwritten events (a write reported as failed that did commit). Adopt
    /// `fresh`, re-applying on top of it only the changes that did not land. Returns how
    /// many unwritten events the merge had to drop.
    pub(crate) fn rebase(&mut self, fresh: Versioned, landed: usize) -> usize {
        let landed = std::cmp::min(landed, self.unwritten.len());
        self.unwritten.drain(..landed);
        let before = self.unwritten.len();
        self.current = if self.unwritten.is_empty() {
            fresh.session
        } else {
            merge(&fresh.session, &self.current, &mut self.unwritten)
        };
        self.durable_version = fresh.version;
        before - self.unwritten.len()
    }

    /// The events a write of the current state must carry: every unwritten one, then
    /// `events`. Borrowed in the common case where nothing is unwritten.
    pub(crate) fn events_with<'a>(&'a self, events: &'a [AuditEvent]) -> Cow<'a, [AuditEvent]> {
        if self.unwritten.is_empty() {
            Cow::Borrowed(events)
        } else {
            let mut all = self.unwritten.clone();
            all.extend_from_slice(events);
            Cow::Owned(all)
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

/// Re-applies the changes recorded by `unwritten` (which did not land) on top of `fresh`,
/// the newer state in storage; `ahead` is the state this process had built from them.
///
/// # Invariant: monotonic merge
/// A terminal status in storage wins; ours applies only over active. Counters never
/// decrease: each unwritten call is added to storage's count, in order, while it fits the
/// budget and the session is still active. Calls that no longer fit, or that would land in
/// a session closed or expired meanwhile, are dropped with their events: a closed session
/// never gains a call, even in the audit trail. Every unwritten call was answered
/// `StorageWriteThrough` (denied), so dropping one never takes back a call that got `Ok`.
/// The events left are renumbered so the trail's counters follow the merged timeline.
fn merge(fresh: &TaskSession, ahead: &TaskSession, unwritten: &mut Vec<AuditEvent>) -> TaskSession {
    let mut calls = fresh.calls_made;
    // The newer rate window wins; calls count toward it if they happened inside it.
    let (window_started_at, mut window_calls) =
        match (fresh.rate_window_started_at, ahead.rate_window_started_at) {
            (theirs, Some(ours)) if theirs.is_none_or(|theirs| ours > theirs) => (Some(ours), 0),
            (theirs, _) => (theirs, fresh.rate_window_calls),
        };
    let window_limit = fresh.rate_limit_per_minute.unwrap_or(u64::MAX);
    let mut status = fresh.status;
    unwritten.retain_mut(|event| {
        match event.kind {
            EventKind::CallAllowed | EventKind::BatchAllowed => {
                if status != SessionStatus::Active {
                    return false;
                }
                let n = event.tools.len() as u64;
                match calls
                    .checked_add(n)
                    .filter(|&after| after <= fresh.call_budget)
                {
                    Some(after) => calls = after,
                    None => return false,
                }
                if window_started_at.is_some_and(|start| event.occurred_at >= start) {
                    window_calls = std::cmp::min(window_calls.saturating_add(n), window_limit);
                }
            }
            EventKind::Closed | EventKind::Expired if status == SessionStatus::Active => {
                status = event.status;
            }
            _ => {}
        }
        event.calls_made = calls;
        event.rate_window_calls = window_calls;
        event.status = status;
        true
    });
    TaskSession {
        calls_made: calls,
        rate_window_started_at: window_started_at,
        rate_window_calls: window_calls,
        status,
        ..fresh.clone()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::model::CreateSessionRequest;

    fn session(budget: u64) -> TaskSession {
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

    fn call(s: &TaskSession, tools: usize) -> AuditEvent {
        let kind = if tools == 1 {
            EventKind::CallAllowed
        } else {
            EventKind::BatchAllowed
        };
        AuditEvent::new(
            kind,
            vec!["t".to_owned(); tools],
            s,
            Utc::now(),
            Uuid::nil(),
        )
    }

    fn slot(durable: &TaskSession, ahead: TaskSession, unwritten: Vec<AuditEvent>) -> SlotState {
        let mut state = SlotState::new(Versioned {
            session: durable.clone(),
            version: 1,
        });
        state.current = ahead;
        state.unwritten = unwritten;
        state
    }

    fn fresh(session: TaskSession) -> Versioned {
        Versioned {
            session,
            version: 7,
        }
    }

    #[test]
    fn rebase_adds_unlanded_calls_to_storage_count() {
        let s = with(&session(10), 2, SessionStatus::Active);
        let mut state = slot(
            &s,
            with(&s, 5, SessionStatus::Active),
            vec![call(&s, 1), call(&s, 2)],
        );
        state.rebase(fresh(with(&s, 4, SessionStatus::Active)), 0);
        assert_eq!(state.current.calls_made, 7);
        assert_eq!(state.durable_version, 7);
        let after: Vec<u64> = state.unwritten.iter().map(|e| e.calls_made).collect();
        assert_eq!(after, [5, 7], "events renumbered on the merged timeline");
    }

    #[test]
    fn rebase_skips_what_already_landed() {
        let s = with(&session(10), 2, SessionStatus::Active);
        let mut state = slot(
            &s,
            with(&s, 4, SessionStatus::Active),
            vec![call(&s, 1), call(&s, 1)],
        );
        // Both calls committed although we were told otherwise; someone added one more.
        state.rebase(fresh(with(&s, 5, SessionStatus::Active)), 2);
        assert_eq!(state.current.calls_made, 5, "nothing is counted twice");
        assert!(!state.is_ahead());
    }

    #[test]
    fn rebase_never_passes_budget_nor_reopens() {
        let s = with(&session(6), 2, SessionStatus::Active);
        let mut state = slot(
            &s,
            with(&s, 5, SessionStatus::Active),
            vec![call(&s, 1), call(&s, 2)],
        );
        state.rebase(fresh(with(&s, 5, SessionStatus::Active)), 0);
        assert_eq!(state.current.calls_made, 6);
        assert_eq!(
            state.unwritten.len(),
            1,
            "the batch that no longer fits is dropped"
        );

        let mut state = slot(&s, with(&s, 3, SessionStatus::Active), vec![call(&s, 1)]);
        state.rebase(fresh(with(&s, 2, SessionStatus::Closed)), 0);
        assert_eq!(
            (state.current.calls_made, state.current.status),
            (2, SessionStatus::Closed),
            "a closed session gains no call"
        );
        assert!(state.unwritten.is_empty());

        let closed = AuditEvent::new(
            EventKind::Closed,
            vec![],
            &with(&s, 2, SessionStatus::Closed),
            Utc::now(),
            Uuid::nil(),
        );
        let mut state = slot(&s, with(&s, 2, SessionStatus::Closed), vec![closed.clone()]);
        state.rebase(fresh(with(&s, 3, SessionStatus::Active)), 0);
        assert_eq!(
            (state.current.calls_made, state.current.status),
            (3, SessionStatus::Closed)
        );

        let mut state = slot(&s, with(&s, 2, SessionStatus::Closed), vec![closed]);
        state.rebase(fresh(with(&s, 3, SessionStatus::Expired)), 0);
        assert_eq!(
            state.current.status,
            SessionStatus::Expired,
            "storage's terminal status wins"
        );
    }
}
