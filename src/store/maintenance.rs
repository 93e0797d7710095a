//! Upkeep: the storage's periodic maintenance ([`Storage::maintain`]; for PostgreSQL,
//! creating the audit trail's daily partitions ahead and rolling up for the reports), run
//! when the store is first used and then every `maintenance_interval` (a minute by
//! default).
//!
//! Nothing the store decides depends on it: an event whose day has no partition yet lands
//! in the default partition. It keeps the audit trail cheap (one partition per day, dropped
//! whole by retention), so a failure is logged, counted and tried again after a minute
//! (or the interval, if shorter) rather than reported to a caller.
//!
//! A run ends with the store: [`SessionStore::shutdown`](crate::SessionStore::shutdown)
//! and dropping the store both cancel a run in progress, so no upkeep writes through the
//! pool of a store its gateway has let go.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::error::Elapsed;

use super::inner::Inner;
use super::worker::{Parking, Worker};
use crate::error::{StorageError, error_chain};
use crate::storage::Storage;

/// How long one maintenance run may take. Longer than a call's `storage_timeout`: creating
/// a partition may wait for a lock other DDL holds, and nobody waits on this.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// When a failed run is tried again (unless the interval is shorter).
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The shortest interval: the upkeep may create partitions (DDL) and count a minute of
/// events, not something to run in a loop.
const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// The maintenance schedule, its task and what it did.
#[derive(Debug)]
pub(super) struct Maintenance {
    every: Option<Duration>,
    task: Worker,
    runs: AtomicU64,
    failures: AtomicU64,
}

/// The maintenance counters, for [`StoreStats`](crate::StoreStats).
#[derive(Debug, Clone, Copy)]
pub(super) struct MaintenanceCounts {
    pub(super) runs: u64,
    pub(super) failures: u64,
}

impl Maintenance {
    /// `every: None` runs nothing (the operator runs `arbiter-session partitions ensure`);
    /// an interval under a minute is taken as a minute.
    pub(super) fn new(every: Option<Duration>) -> Self {
        Maintenance {
            every: every.map(|every| std::cmp::max(every, MIN_INTERVAL)),
            task: Worker::default(),
            runs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Starts the task the first time the store is used inside a runtime. Called on every
    /// lookup: one relaxed load once started.
    pub(super) fn ensure_started<S: Storage>(&self, store: &Weak<Inner<S>>) {
        let Some(every) = self.every else { return };
        self.task
            .start(|parking| Some(run_every(store.clone(), every, parking)));
    }

    /// Stops the upkeep for good: cancels a run in progress and returns once it has ended.
    pub(super) async fn stop(&self) {
        self.task.stop().await;
    }

    /// Counts a run's outcome and says when to run next.
    fn record(
        &self,
        outcome: Result<Result<(), StorageError>, Elapsed>,
        every: Duration,
    ) -> Duration {
        match outcome {
            Ok(Ok(())) => {
                self.runs.fetch_add(1, Ordering::Relaxed);
                every
            }
            Ok(Err(err)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %error_chain(&err), "storage maintenance failed; trying again");
                std::cmp::min(every, RETRY_AFTER)
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(timeout = ?RUN_TIMEOUT, "storage maintenance timed out; trying again");
                std::cmp::min(every, RETRY_AFTER)
            }
        }
    }

    pub(super) fn counts(&self) -> MaintenanceCounts {
        MaintenanceCounts {
            runs: self.runs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// The upkeep task. During a run it holds the storage, not the store: dropping the store
/// (or [`Maintenance::stop`]) closes `parking`, which cancels the run where it waits. For
/// PostgreSQL that rolls back its open transaction and starts no further statement.
async fn run_every<S: Storage>(store: Weak<Inner<S>>, every: Duration, parking: Parking) {
    loop {
        let Some(storage) = store.upgrade().map(|inner| Arc::clone(inner.storage())) else {
            return;
        };
        let outcome = tokio::select! {
            biased;
            () = parking.closed() => return,
            outcome = tokio::time::timeout(RUN_TIMEOUT, storage.inner().maintain()) => outcome,
        };
        drop(storage);
        let Some(inner) = store.upgrade() else { return };
        let wait = inner.maintenance().record(outcome, every);
        drop(inner);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = parking.closed() => return,
        }
    }
}
