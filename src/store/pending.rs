//! The pending set: sessions whose cached state is ahead of storage.
//!
//! # Invariant: pinning
//! A slot in this set is kept alive by the set itself, whatever the cache evicts, so a
//! cache miss finds it among the live slots (`slot`) before reading storage: loading
//! the older durable row instead would hand an agent back budget it already spent. A slot leaves the set only once storage holds
//! its state. The lock is a `std` mutex held for a map operation, never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use uuid::Uuid;

use super::slot::Slot;
use crate::metrics::{self, Gauge};

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
pub(crate) struct PendingSet {
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
}

impl PendingSet {
    fn slots(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<Slot>>> {
        // No code panics while holding the lock, so a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, id: Uuid, slot: Arc<Slot>) {
        let mut slots = self.slots();
        slots.insert(id, slot);
        metrics::set(Gauge::Pending, count(slots.len()));
    }

    /// Removes `id` only if it still maps to `slot` (a newer slot may have replaced it).
    pub(crate) fn remove(&self, id: Uuid, slot: &Arc<Slot>) {
        let mut slots = self.slots();
        if slots
            .get(&id)
            .is_some_and(|pinned| Arc::ptr_eq(pinned, slot))
        {
            slots.remove(&id);
            metrics::set(Gauge::Pending, count(slots.len()));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots().len()
    }

    pub(crate) fn snapshot(&self) -> Vec<(Uuid, Arc<Slot>)> {
        self.slots()
            .iter()
            .map(|(id, slot)| (*id, Arc::clone(slot)))
            .collect()
    }
}
