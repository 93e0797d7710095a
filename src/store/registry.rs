//! The live slots of a store: at most one per session id.
//!
//! # Invariant: one slot per session
//! Every slot is made here, and a slot for an id is made only when no slot for that id is
//! alive, wherever it is held: by the cache, by the pending set, or by a mutation in flight
//! or waiting in its queue. A cache invalidation (the change feed's) or eviction that drops
//! the cache's reference while the slot is in use therefore never lets a second slot for
//! the same session appear beside it: the next lookup gets the live one back. So changes
//! made through a slot (pinned or in flight) are never replaced by an older stored row, in
//! the cache or in the pending set, and all mutations of a session in one process are
//! serialized by one lock.
//!
//! The map holds weak references; a slot removes its own entry when it is dropped. The lock
//! is a `std` mutex taken to make, look up or drop a slot (never on a cache hit), and never
//! held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use uuid::Uuid;

use super::slot::Slot;
use crate::storage::Versioned;

#[derive(Debug, Default)]
pub(crate) struct Slots {
    live: Mutex<HashMap<Uuid, Weak<Slot>>>,
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

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};

    use super::*;
    use crate::model::{CreateSessionRequest, TaskSession};

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
