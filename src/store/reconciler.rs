//! The reconciler: makes pending sessions durable again.
//!
//! Its task is woken by a failed write-through; it retries with exponential backoff,
//! starting at the builder's `reconcile_interval` and capped at [`MAX_BACKOFF`], until the
//! pending set is empty, then parks (see `worker`). It holds only a weak reference to the
//! store while it waits, so dropping every handle ends it; graceful shutdown is
//! [`SessionStore::shutdown`](crate::SessionStore::shutdown).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use uuid::Uuid;

use super::inner::Inner;
use super::slot::Slot;
use super::worker::{Parking, Worker};
use crate::error::{StorageError, error_chain};
use crate::metrics::{self, Counter};
use crate::storage::{LockWait, LockedUpdate, Storage, UpdateOutcome};

/// Longest delay between two passes while sessions are pending.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What one reconciliation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Sessions made durable by this pass.
    pub reconciled: usize,
    /// Sessions still pending after it.
    pub still_pending: usize,
}

/// The reconciler's state: its backoff, where the next pass starts, and its task.
#[derive(Debug)]
pub(super) struct Reconciler {
    first_delay: Duration,
    /// Passes so far: where in the pending set the next pass starts.
    passes: AtomicUsize,
    /// Pending sessions made durable.
    reconciled: AtomicU64,
    task: Worker,
}

/// How writing one pending session ended.
enum Written {
    Durable,
    /// Storage is unreachable: stop this pass instead of timing out on every session.
    Unavailable,
    /// Storage refused this slot's write (a constraint), or another transaction holds its
    /// row: try it again next pass, and go on with the others.
    Retry,
}

impl Reconciler {
    pub(super) fn new(first_delay: Duration) -> Self {
        Reconciler {
            first_delay,
            passes: AtomicUsize::new(0),
            reconciled: AtomicU64::new(0),
            task: Worker::default(),
        }
    }

    /// Pending sessions made durable so far.
    pub(super) fn reconciled(&self) -> u64 {
        self.reconciled.load(Ordering::Relaxed)
    }

    /// The retry delay after a pass that made no progress, given the one before it.
    pub(super) fn backoff(&self, delay: Duration) -> Duration {
        std::cmp::min(delay * 2, MAX_BACKOFF)
    }

    /// The first retry delay.
    pub(super) fn first_delay(&self) -> Duration {
        self.first_delay
    }

    /// Wakes the task (a session became pending), starting it if needed.
    pub(super) fn wake<S: Storage>(&self, store: &Weak<Inner<S>>) {
        let store = store.clone();
        self.task.wake(|parking| run(store, parking));
    }

    /// One pass over the pending set of `store`.
    ///
    /// A row another transaction holds is skipped (its session stays pending for the next
    /// pass) without waiting for its lock; only unavailability ends a pass early. Each pass
    /// starts one session further into the set, so a pass cut short by an outage does not
    /// always leave the same sessions for last.
    pub(super) async fn pass<S: Storage>(&self, store: &Inner<S>) -> ReconcileReport {
        let mut reconciled = 0;
        let mut pending = store.pending_snapshot();
        if !pending.is_empty() {
            let start = self.passes.fetch_add(1, Ordering::Relaxed) % pending.len();
            pending.rotate_left(start);
        }
        for (id, slot) in pending {
            match self.write_pending(store, id, &slot).await {
                Written::Durable => reconciled += 1,
                Written::Retry => {}
                Written::Unavailable => break,
            }
        }
        ReconcileReport {
            reconciled,
            still_pending: store.pending_len(),
        }
    }

    /// Writes one pending session's state (with its unwritten events and a `reconciled`
    /// event); on a conflict, merges into the row read under a lock and writes that.
    async fn write_pending<S: Storage>(
        &self,
        store: &Inner<S>,
        id: Uuid,
        slot: &Arc<Slot>,
    ) -> Written {
        let mut state = slot.state.lock().await;
        if !state.is_ahead() {
            // A mutation made it durable meanwhile.
            store.unpin(id, slot, &mut state);
            return Written::Durable;
        }
        let reconciled = state.reconciled_event(store.now(), store.instance_id());
        let events = state.events_with(std::slice::from_ref(&reconciled));
        // Calls charged to a shared budget's share that died cannot land: they are dropped
        // by the merge into the row read under its lock.
        let optimistic = if store.holds_dead_charges(&state) {
            Ok(None)
        } else {
            store
                .storage()
                .update(&state.current, state.durable_version, &events)
                .await
                .map(Some)
        };
        let outcome = match optimistic {
            Ok(Some(UpdateOutcome::Applied(version))) => Ok(LockedUpdate::Applied(version)),
            Ok(conflict @ (Some(UpdateOutcome::Conflict) | None)) => {
                if conflict.is_some() {
                    store.counters().conflict();
                }
                let at = store.now();
                let probe = state.unwritten_keys();
                store
                    .storage()
                    .update_locked(id, &probe, LockWait::NoWait, |fresh, landed| {
                        let dropped = store.rebase(&mut state, fresh, landed);
                        // Everything may have landed already (nothing to write). If the merge
                        // dropped calls (no room left, or the session was closed meanwhile),
                        // the `reconciled` event still records that it happened.
                        (state.is_ahead() || dropped > 0).then(|| {
                            let reconciled = state.reconciled_event(at, store.instance_id());
                            let events = state
                                .events_with(std::slice::from_ref(&reconciled))
                                .into_owned();
                            (state.current.clone(), events)
                        })
                    })
                    .await
            }
            Err(err) => Err(err),
        };
        match outcome {
            Ok(LockedUpdate::Applied(version)) => {
                state.mark_durable(version);
                store.unpin(id, slot, &mut state);
                self.reconciled.fetch_add(1, Ordering::Relaxed);
                metrics::count(Counter::Reconciled, 1);
                tracing::info!(session_id = %id, "pending session reconciled");
                Written::Durable
            }
            Ok(LockedUpdate::Declined) => {
                // The rebase found nothing left to write.
                state.unwritten.clear();
                store.unpin(id, slot, &mut state);
                Written::Durable
            }
            Ok(LockedUpdate::Missing) => {
                tracing::warn!(session_id = %id, "reconcile: session row is gone; dropping its pending state");
                store.forget(id, slot, &mut state).await;
                Written::Durable
            }
            Ok(LockedUpdate::Busy) => {
                tracing::debug!(session_id = %id, "reconcile: row held by another transaction; next pass");
                Written::Retry
            }
            Err(err) if err.is_transient() => {
                tracing::debug!(session_id = %id, error = %error_chain(&err), "reconcile: storage unavailable");
                Written::Unavailable
            }
            Err(StorageError::ShareClosed { share_id }) => {
                // Its calls charged to that share are dropped by the next pass's merge.
                store.escrow().mark_dead(share_id);
                tracing::info!(session_id = %id, %share_id, "reconcile: a shared budget's share was closed; dropping its unwritten calls next pass");
                Written::Retry
            }
            Err(err) => {
                tracing::warn!(session_id = %id, error = %error_chain(&err), "reconcile: write refused; will retry");
                Written::Retry
            }
        }
    }
}

/// The task: once woken, passes with backoff until nothing is pending, then parks.
async fn run<S: Storage>(store: Weak<Inner<S>>, parking: Parking) {
    while parking.park().await {
        let mut delay = None;
        loop {
            let first = {
                let Some(inner) = store.upgrade() else { return };
                if inner.pending_len() == 0 {
                    break;
                }
                inner.reconciler().first_delay()
            };
            // Sleep without holding the store, so dropping every handle ends this task. The
            // wait comes before the pass: the failure that woke us is fresh, and retrying
            // at once would most likely fail the same way.
            let wait = *delay.get_or_insert(first);
            tokio::time::sleep(wait).await;
            let Some(inner) = store.upgrade() else { return };
            let report = inner.reconciler().pass(&inner).await;
            delay = Some(if report.reconciled > 0 {
                first
            } else {
                inner.reconciler().backoff(wait)
            });
        }
    }
}
