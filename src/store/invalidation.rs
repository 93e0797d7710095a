//! Cache invalidation from the storage's change feed (LISTEN/NOTIFY for PostgreSQL).
//!
//! A status change made anywhere drops that session from this cache and marks its live
//! slot stale, so the next `get` reloads it. After the feed reconnects, the whole cache is
//! dropped and every live slot marked stale, because changes made while it was
//! disconnected are lost. A slot in use keeps its identity (see `registry`), and a stale
//! slot whose state is ahead of storage is not reloaded, so invalidation never loses a
//! change this process has not yet made durable.
//!
//! Freshness is best effort (a load that read the row just before a change can still cache
//! it); correctness never depends on it: every write is versioned.

use std::sync::Weak;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::Inner;
use super::stats::Counters;
use crate::storage::{Change, ChangeFeed, Storage};

impl<S: Storage> Inner<S> {
    /// Starts the listener task the first time the store is used inside a runtime, if
    /// enabled and the storage has a change feed.
    pub(super) fn ensure_listener(&self) {
        // Called on every lookup: a plain load keeps the common case free of writes to a
        // shared cache line.
        if !self.listen_for_changes
            || self.listener_started.load(Ordering::Relaxed)
            || self.listener_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Some(feed) = self.storage.change_feed() else {
            return;
        };
        tokio::spawn(listen(self.me.clone(), feed, self.dropped.subscribe()));
    }
}

async fn listen<S: Storage>(
    store: Weak<Inner<S>>,
    mut feed: Box<dyn ChangeFeed>,
    mut dropped: watch::Receiver<()>,
) {
    let mut connected_before = false;
    loop {
        let change = tokio::select! {
            change = feed.next() => change,
            // The store is gone (its sender dropped): stop listening.
            _ = dropped.changed() => return,
        };
        let Some(inner) = store.upgrade() else { return };
        match change {
            Change::Session(id) => {
                inner.slots.mark_stale(id);
                inner.cache.invalidate(&id).await;
                Counters::bump(&inner.counters.invalidations);
            }
            Change::Disconnected => {
                inner.counters.listening.store(false, Ordering::Relaxed);
            }
            Change::Reset => {
                inner.slots.mark_all_stale();
                inner.cache.invalidate_all();
                if connected_before {
                    Counters::bump(&inner.counters.listener_reconnects);
                }
                connected_before = true;
                inner.counters.listening.store(true, Ordering::Relaxed);
            }
        }
    }
}
