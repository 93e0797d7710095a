//! The listener: cache invalidation from the storage's change feed (LISTEN/NOTIFY for
//! PostgreSQL).
//!
//! A status change made anywhere drops that session from this cache and marks its live
//! slot stale, so the next `get` reloads it. After the feed reconnects, the whole cache is
//! dropped and every live slot marked stale, because changes made while it was
//! disconnected are lost. A slot in use keeps its identity (see `slot`), and a stale
//! slot whose state is ahead of storage is not reloaded, so invalidation never loses a
//! change this process has not yet made durable.
//!
//! Freshness is best effort (a load that read the row just before a change can still cache
//! it); correctness never depends on it: every write is versioned.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::inner::Inner;
use super::worker::{Parking, Worker};
use crate::metrics::{self, Gauge};
use crate::storage::{Change, ChangeFeed, Storage};

/// Whether the store listens, its task, and what the feed did.
#[derive(Debug)]
pub(super) struct Listener {
    enabled: bool,
    task: Worker,
    /// Whether the feed is connected now.
    listening: AtomicBool,
    /// Sessions dropped from the cache because their status changed elsewhere.
    invalidations: AtomicU64,
    /// Times the feed reconnected (and the whole cache was dropped).
    reconnects: AtomicU64,
}

/// The listener's counters, for [`StoreStats`](crate::StoreStats).
#[derive(Debug, Clone, Copy)]
pub(super) struct ListenerCounts {
    pub(super) listening: bool,
    pub(super) invalidations: u64,
    pub(super) reconnects: u64,
}

impl Listener {
    pub(super) fn new(enabled: bool) -> Self {
        Listener {
            enabled,
            task: Worker::default(),
            listening: AtomicBool::new(false),
            invalidations: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        }
    }

    /// Starts the task the first time the store is used inside a runtime, if enabled and
    /// the storage has a change feed. Called on every lookup: one relaxed load once started.
    pub(super) fn ensure_started<S: Storage>(
        &self,
        store: &Weak<Inner<S>>,
        storage: &impl Storage,
    ) {
        if !self.enabled {
            return;
        }
        self.task.start(|parking| {
            let feed = storage.change_feed()?;
            Some(listen(store.clone(), feed, parking))
        });
    }

    pub(super) fn counts(&self) -> ListenerCounts {
        ListenerCounts {
            listening: self.listening.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }
}

async fn listen<S: Storage>(
    store: Weak<Inner<S>>,
    mut feed: Box<dyn ChangeFeed>,
    parking: Parking,
) {
    let mut connected_before = false;
    loop {
        let change = tokio::select! {
            change = feed.next() => change,
            () = parking.closed() => return,
        };
        let Some(inner) = store.upgrade() else { return };
        let listener = inner.listener();
        match change {
            Change::Session(id) => {
                inner.invalidate(id).await;
                listener.invalidations.fetch_add(1, Ordering::Relaxed);
            }
            Change::Disconnected => {
                listener.listening.store(false, Ordering::Relaxed);
                metrics::set(Gauge::ListenerConnected, 0);
            }
            Change::Reset => {
                inner.invalidate_all();
                if connected_before {
                    listener.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                connected_before = true;
                listener.listening.store(true, Ordering::Relaxed);
                metrics::set(Gauge::ListenerConnected, 1);
            }
        }
    }
}
