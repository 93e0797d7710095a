//! The live slots of a store, and what each holds: one cached session, its state, the
//! durable version that state is based on, and the changes not yet durable. The async mutex
//! around a [`SlotState`] is what serializes the mutations of one session in this process;
//! nothing else locks a session.
//!
//! # Invariant: one slot per session
//! Every slot is made by [`Slots`], and a slot for an id is made only when no slot for that
//! id is alive, wherever it is held: by the cache, by the pending set, or by a mutation in
//! flight or waiting in its queue. A cache invalidation (the change feed's) or eviction
//! that drops the cache's reference while the slot is in use therefore never lets a second
//! slot for the same session appear beside it: the next lookup gets the live one back. So
//! changes made through a slot (pinned or in flight) are never replaced by an older stored
//! row, in the cache or in the pending set, and all mutations of a session in one process
//! are serialized by one lock.
//!
//! [`Slots`] holds weak references; a slot removes its own entry when it is dropped. Its
//! lock is a `std` mutex taken to make, look up or drop a slot (never on a cache hit), and
//! never held across an await.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard, PoisonError, Weak};

use tokio::sync::Mutex;
use uuid::Uuid;

use crate::audit::{AuditEvent, EventKind};
use crate::model::TaskSession;
use crate::policy;
use crate::storage::{Version, Versioned};

use super::queued::Queued;

#[derive(Debug, Default)]
pub(crate) struct Slots {
    live: std::sync::Mutex<HashMap<Uuid, Weak<Slot>>>,
}

impl Slots {
    fn live(&self) -> MutexGuard<'_, HashMap<Uuid, Weak<Slot>>> {
        // No code panics while holding the lock, so a poisoned map is still consistent.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live slot of `id`, if there is one.
    pub(crate) fn get(&self, id: Uuid) -> Option<Arc<Slot>> {
        self.live().get(&id).and_then(Weak::upgrade)
    }

    /// The live slot of `stored`'s session if there is one (`stored`, read earlier, is
    /// then older than or equal to what it knows), else a new slot holding `stored`.
    pub(crate) fn get_or_make(self: &Arc<Self>, stored: Versioned) -> Arc<Slot> {
        let id = stored.session.session_id;
        let mut live = self.live();
        if let Some(slot) = live.get(&id).and_then(Weak::upgrade) {
            return slot;
        }
        let slot = Slot::new(stored, Arc::downgrade(self));
        live.insert(id, Arc::downgrade(&slot));
        slot
    }

    /// Marks the live slot of `id` stale (its stored row changed).
    pub(crate) fn mark_stale(&self, id: Uuid) {
        if let Some(slot) = self.get(id) {
            slot.mark_stale();
        }
    }

    /// Marks every live slot stale (changes may have been missed).
    pub(crate) fn mark_all_stale(&self) {
        for slot in self.live().values().filter_map(Weak::upgrade) {
            slot.mark_stale();
        }
    }

    /// Stops handing out `slot` for `id` (its row is gone): the next lookup reads storage.
    pub(crate) fn remove(&self, id: Uuid, slot: &Slot) {
        let mut live = self.live();
        if live
            .get(&id)
            .is_some_and(|entry| std::ptr::eq(entry.as_ptr(), slot))
        {
            live.remove(&id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.live().len()
    }
}

/// A cache entry. Shared by the cache and, while its state is ahead of storage, by the
/// pending set, which pins it: eviction from the cache drops only the cache's reference.
/// Made only by [`Slots`], which keeps one per session.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) state: Mutex<SlotState>,
    /// Mutations waiting for whoever holds `state` next (see `inner`'s "Combining").
    /// Locked only to push or drain, never across an await.
    queue: std::sync::Mutex<Vec<Queued>>,
    /// The session's id, and the live slots this slot leaves when it is dropped.
    id: Uuid,
    live_slots: Weak<Slots>,
    /// Set when the change feed said the stored row changed (or may have): the next `get`
    /// reloads the state, unless it is ahead of storage. Mutations need no reload: their
    /// versioned write sees the change as a conflict.
    stale: AtomicBool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.live_slots.upgrade() {
            slots.remove(self.id, self);
        }
    }
}

impl Slot {
    /// A slot holding `stored`; only [`Slots`] calls this.
    fn new(stored: Versioned, live_slots: Weak<Slots>) -> Arc<Self> {
        Arc::new(Slot {
            id: stored.session.session_id,
            state: Mutex::new(SlotState::new(stored)),
            queue: std::sync::Mutex::new(Vec::new()),
            live_slots,
            stale: AtomicBool::new(false),
        })
    }

    pub(super) fn mark_stale(&self) {
        self.stale.store(true, Ordering::Relaxed);
    }

    /// Whether the slot was marked stale since the last call; clears the mark.
    pub(crate) fn take_stale(&self) -> bool {
        // A plain load first: the common case writes nothing to a shared cache line.
        self.stale.load(Ordering::Relaxed) && self.stale.swap(false, Ordering::AcqRel)
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
    pub(crate) fn unwritten_keys(&self) -> Vec<Uuid> {
        self.unwritten.iter().map(|event| event.key).collect()
    }

    /// A write of `current` (and every unwritten event) succeeded at `version`.
    pub(crate) fn mark_durable(&mut self, version: Version) {
        self.durable_version = version;
        self.unwritten.clear();
    }

    /// Storage holds `fresh`, newer than our version, and already contains the first
    /// `landed` unwritten events (a write reported as failed that did commit). Adopt
    /// `fresh`, re-applying on top of it only the changes that did not land and that
    /// `admit` keeps (a call charged to a shared budget's share that died is not).
    /// Returns the unwritten events the merge dropped.
    pub(crate) fn rebase(
        &mut self,
        fresh: Versioned,
        landed: usize,
        admit: impl FnMut(&AuditEvent) -> bool,
    ) -> Vec<AuditEvent> {
        let landed = std::cmp::min(landed, self.unwritten.len());
        self.unwritten.drain(..landed);
        let dropped;
        (self.current, dropped) = if self.unwritten.is_empty() {
            (fresh.session, Vec::new())
        } else {
            policy::merge_unwritten(&fresh.session, &mut self.unwritten, admit)
        };
        self.durable_version = fresh.version;
        dropped
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

    /// The `reconciled` event recording the state the reconciler makes durable.
    pub(crate) fn reconciled_event(
        &self,
        at: chrono::DateTime<chrono::Utc>,
        instance_id: Uuid,
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

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    impl SlotState {
        /// [`SlotState::rebase`] admitting every unwritten event; how many it dropped.
        fn rebase_all(&mut self, fresh: Versioned, landed: usize) -> usize {
            self.rebase(fresh, landed, |_| true).len()
        }
    }

    use super::*;
    use crate::model::{CreateSessionRequest, SessionStatus};

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
        state.rebase_all(fresh(with(&s, 4, SessionStatus::Active)), 0);
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
        state.rebase_all(fresh(with(&s, 5, SessionStatus::Active)), 2);
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
        state.rebase_all(fresh(with(&s, 5, SessionStatus::Active)), 0);
        assert_eq!(state.current.calls_made, 6);
        assert_eq!(
            state.unwritten.len(),
            1,
            "the batch that no longer fits is dropped"
        );

        let mut state = slot(&s, with(&s, 3, SessionStatus::Active), vec![call(&s, 1)]);
        state.rebase_all(fresh(with(&s, 2, SessionStatus::Closed)), 0);
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
        state.rebase_all(fresh(with(&s, 3, SessionStatus::Active)), 0);
        assert_eq!(
            (state.current.calls_made, state.current.status),
            (3, SessionStatus::Closed)
        );

        let mut state = slot(&s, with(&s, 2, SessionStatus::Closed), vec![closed]);
        state.rebase_all(fresh(with(&s, 3, SessionStatus::Expired)), 0);
        assert_eq!(
            state.current.status,
            SessionStatus::Expired,
            "storage's terminal status wins"
        );
    }

    fn stored(id: Uuid, version: i64) -> Versioned {
        let req = CreateSessionRequest::new(Uuid::new_v4(), ["t"], 5, Duration::minutes(5));
        Versioned {
            session: TaskSession::from_request(id, &req, Utc::now()),
            version,
        }
    }

    #[test]
    fn a_live_slot_wins_over_a_later_read_and_a_dropped_one_leaves() {
        let slots = Arc::new(Slots::default());
        let id = Uuid::new_v4();
        let first = slots.get_or_make(stored(id, 2));
        let again = slots.get_or_make(stored(id, 1));
        assert!(Arc::ptr_eq(&first, &again), "one slot per session");
        assert!(slots.get(id).is_some_and(|slot| Arc::ptr_eq(&slot, &first)));
        drop((first, again));
        assert_eq!(slots.len(), 0, "a dropped slot leaves the map");
        assert!(slots.get(id).is_none());
        let fresh = slots.get_or_make(stored(id, 3));
        slots.remove(id, &fresh);
        assert!(slots.get(id).is_none(), "a removed slot is not handed out");
        drop(fresh);
        assert_eq!(slots.len(), 0);
    }
}
