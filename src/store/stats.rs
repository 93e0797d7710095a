//! Counters behind [`StoreStats`](crate::StoreStats). Relaxed atomics: each counter is
//! exact on its own, and a snapshot is not a consistent cut across counters.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{self, Counter};

/// A snapshot of a store's counters, for metrics and for operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Sessions in the cache (moka's count, which lags until its housekeeping runs).
    pub cache_entries: u64,
    /// Lookups answered by the cache.
    pub cache_hits: u64,
    /// Lookups that went to the pending set or storage.
    pub cache_misses: u64,
    /// Lookups answered `NotFound` by the negative cache (ids recently found missing).
    pub negative_hits: u64,
    /// Sessions whose cached state is ahead of storage right now.
    pub pending: u64,
    /// Writes that failed and left the cache ahead (`StorageWriteThrough`).
    pub write_failures: u64,
    /// Versioned writes that found the row changed by someone else.
    pub conflicts: u64,
    /// Pending sessions the reconciler made durable.
    pub reconciled: u64,
    /// Sessions evicted from the cache (capacity or idle time).
    pub evictions: u64,
    /// Sessions dropped from the cache because their status changed elsewhere.
    pub invalidations: u64,
    /// Times the change feed reconnected (and the whole cache was dropped).
    pub listener_reconnects: u64,
    /// Whether the change feed is connected now (and the store is invalidating from it);
    /// false before it first connects and while it reconnects.
    pub listening: bool,
    /// Denied calls written to the audit trail.
    pub denials_recorded: u64,
    /// Denied calls not recorded because the denial buffer was full.
    pub denials_dropped: u64,
    /// Denied calls not recorded because storage refused them (not an outage: a
    /// constraint or a row it cannot take). Each is logged at error level.
    pub denials_refused: u64,
    /// Runs of the storage's upkeep that completed (see
    /// [`SessionStoreBuilder::maintenance_interval`](crate::SessionStoreBuilder::maintenance_interval)).
    pub maintenance_runs: u64,
    /// Runs of the storage's upkeep that failed or timed out (each is logged and tried
    /// again within a minute).
    pub maintenance_failures: u64,
}

/// The counters of the hot path (lookups and writes). The background components keep
/// their own (the reconciler, the denial log, the listener).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) negative_hits: AtomicU64,
    pub(crate) write_failures: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) evictions: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A write failed and left the cache ahead.
    pub(crate) fn write_failed(&self) {
        Self::bump(&self.write_failures);
        metrics::count(Counter::WriteFailures, 1);
    }

    /// A versioned write found the row changed elsewhere.
    pub(crate) fn conflict(&self) {
        Self::bump(&self.conflicts);
        metrics::count(Counter::Conflicts, 1);
    }

    /// `rest` (what the other components counted) with these counters filled in.
    pub(crate) fn snapshot(&self, rest: StoreStats) -> StoreStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            negative_hits: get(&self.negative_hits),
            write_failures: get(&self.write_failures),
            conflicts: get(&self.conflicts),
            evictions: get(&self.evictions),
            ..rest
        }
    }
}
