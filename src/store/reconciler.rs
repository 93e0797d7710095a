//! The reconciler: makes pending sessions durable again.
//!
//! It runs only while something is pending. A failed write-through spawns it (if it is not
//! already running); it retries with exponential backoff, starting at the builder's
//! `reconcile_interval` and capped at [`MAX_RECONCILE_BACKOFF`], and exits once the pending
//! set is empty. It holds only a weak reference to the store, so dropping every handle
//! stops it; graceful shutdown is [`SessionStore::shutdown`](crate::SessionStore::shutdown).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::slot::Slot;
use super::stats::Counters;
use super::{Inner, MAX_RECONCILE_BACKOFF};
use crate::error::error_chain;
use crate::storage::{LockWait, LockedUpdate, Storage, UpdateOutcome};

/// What one reconciliation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconcileReport {
    /// Sessions made durable by this pass.
    pub reconciled: usize,
    /// Sessions still pending after it.
    pub still_pending: usize,
}

/// What [`SessionStore::shutdown`](crate::SessionStore::shutdown) could not flush.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Sessions whose cached state is still ahead of storage: their last changes are lost
    /// if the process exits now (only calls that were denied with `StorageWriteThrough`).
    pub unflushed: Vec<Uuid>,
    /// Denied calls still waiting to be recorded in the audit trail.
    pub unrecorded_denials: usize,
}

impl ShutdownReport {
    /// Whether every pending session and every denial was flushed.
    pub fn is_clean(&self) -> bool {
        self.unflushed.is_empty() && self.unrecorded_denials == 0
    }
}

/// How flushing one slot ended.
enum Flush {
    Durable,
    /// Storage is unreachable: stop this pass instead of timing out on every session.
    Unavailable,
    /// Storage refused this slot's write (a constraint), or another transaction holds its
    /// row: try it again next pass, and go on with the others.
    Retry,
}

impl<S: Storage> Inner<S> {
    /// Starts the reconciler task unless one is running.
    pub(super) fn wake_reconciler(&self) {
        if self.reconciler_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = self.me.clone();
        let first_delay = self.reconcile_interval;
        tokio::spawn(run(weak, first_delay));
    }

    /// One pass over the pending set.
    ///
    /// A row another transaction holds is skipped (its session stays pending for the next
    /// pass) without waiting for its lock; only unavailability ends a pass early. Each pass
    /// starts one session further into the set, so a pass cut short by an outage does not
    /// always leave the same sessions for last.
    pub(super) async fn reconcile_pass(&self) -> ReconcileReport {
        let mut reconciled = 0;
        let mut pending = self.pending.snapshot();
        if !pending.is_empty() {
            let start = self.reconcile_passes.fetch_add(1, Ordering::Relaxed) % pending.len();
            pending.rotate_left(start);
        }
        for (id, slot) in pending {
            match self.flush_slot(id, &slot).await {
                Flush::Durable => reconciled += 1,
                Flush::Retry => {}
                Flush::Unavailable => break,
            }
        }
        ReconcileReport {
            reconciled,
            still_pending: self.pending.len(),
        }
    }

    /// Passes (and denial flushes) until nothing is pending or `within` has passed.
    pub(super) async fn flush(&self, within: Duration) -> super::ShutdownReport {
        let deadline = Instant::now() + within;
        let mut delay = self.reconcile_interval;
        loop {
            let report = tokio::time::timeout_at(deadline, self.reconcile_pass()).await;
            // Denials after sessions: a reconciled write-through is what some of them record.
            let denials = tokio::time::timeout_at(deadline, self.flush_denials_once()).await;
            let done = matches!(
                report,
                Ok(ReconcileReport {
                    still_pending: 0,
                    ..
                })
            ) && matches!(denials, Ok(true));
            if done || Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = std::cmp::min(delay * 2, MAX_RECONCILE_BACKOFF);
        }
        let unflushed = self
            .pending
            .snapshot()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ShutdownReport {
            unflushed,
            unrecorded_denials: self.denials.len(),
        }
    }

    /// Writes one pending slot's state (with its unwritten events and a `reconciled`
    /// event); on a conflict, merges into the row read under a lock and writes that.
    async fn flush_slot(&self, id: Uuid, slot: &Arc<Slot>) -> Flush {
        let mut state = slot.state.lock().await;
        if !state.is_ahead() {
            // A mutation made it durable meanwhile.
            self.unpin(id, slot, &mut state);
            return Flush::Durable;
        }
        let reconciled = state.reconciled_event(self.now(), self.instance_id);
        let events = state.events_with(std::slice::from_ref(&reconciled));
        let outcome = match self
            .storage
            .update(&state.current, state.durable_version, &events)
            .await
        {
            Ok(UpdateOutcome::Applied(version)) => Ok(LockedUpdate::Applied(version)),
            Ok(UpdateOutcome::Conflict) => {
                Counters::bump(&self.counters.conflicts);
                let at = self.now();
                let probe = state.unwritten_keys();
                self.storage
                    .update_locked(id, &probe, LockWait::NoWait, |fresh, landed| {
                        let dropped = state.rebase(fresh, landed);
                        // Everything may have landed already (nothing to write). If the merge
                        // dropped calls (no room left, or the session was closed meanwhile),
                        // the `reconciled` event still records that it happened.
                        (state.is_ahead() || dropped > 0).then(|| {
                            let reconciled = state.reconciled_event(at, self.instance_id);
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
                self.unpin(id, slot, &mut state);
                Counters::bump(&self.counters.reconciled);
                tracing::info!(session_id = %id, "pending session reconciled");
                Flush::Durable
            }
            Ok(LockedUpdate::Declined) => {
                // The rebase found nothing left to write.
                state.unwritten.clear();
                self.unpin(id, slot, &mut state);
                Flush::Durable
            }
            Ok(LockedUpdate::Missing) => {
                tracing::warn!(session_id = %id, "reconcile: session row is gone; dropping its pending state");
                self.forget(id, slot, &mut state).await;
                Flush::Durable
            }
            Ok(LockedUpdate::Busy) => {
                tracing::debug!(session_id = %id, "reconcile: row held by another transaction; next pass");
                Flush::Retry
            }
            Err(err) if err.is_transient() => {
                tracing::debug!(session_id = %id, error = %error_chain(&err), "reconcile: storage unavailable");
                Flush::Unavailable
            }
            Err(err) => {
                tracing::warn!(session_id = %id, error = %error_chain(&err), "reconcile: write refused; will retry");
                Flush::Retry
            }
        }
    }
}

/// The background loop: passes with backoff until nothing is pending.
async fn run<S: Storage>(weak: std::sync::Weak<Inner<S>>, first_delay: Duration) {
    let mut delay = first_delay;
    loop {
        {
            let Some(inner) = weak.upgrade() else { return };
            if inner.pending.is_empty() {
                inner.reconciler_running.store(false, Ordering::Release);
                // A session may have become pending between the check and the store; if so,
                // and no other task took over, keep going.
                if inner.pending.is_empty() || inner.reconciler_running.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        }
        // Sleep without holding the store, so dropping every handle stops this task. The
        // wait comes before the pass: the failure that started us is fresh, and retrying at
        // once would most likely fail the same way.
        tokio::time::sleep(delay).await;
        {
            let Some(inner) = weak.upgrade() else { return };
            let report = inner.reconcile_pass().await;
            delay = if report.reconciled > 0 {
                first_delay
            } else {
                std::cmp::min(delay * 2, MAX_RECONCILE_BACKOFF)
            };
        }
    }
}
