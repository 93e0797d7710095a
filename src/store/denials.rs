//! Denied calls, recorded off the hot path.
//!
//! # Invariant: bounded, never silent, recorded once
//! A denial is pushed into a bounded buffer (a `std` mutex held for a push, never across an
//! await) and a background task writes the buffer in batches, one statement each. When the
//! buffer is full the denial is dropped and counted (`stats().denials_dropped`) and logged.
//! When storage is unavailable, a batch goes back into the buffer (within its bound) for
//! the next flush; writing denials is idempotent by event key, so a batch whose earlier
//! attempt committed unseen is recorded once. When storage *refuses* a batch (anything but
//! unavailability), its denials are written one by one, and those refused again are
//! dropped, counted (`stats().denials_refused`) and logged: a poisoned denial never holds
//! up the ones behind it. `shutdown` flushes what is left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Inner;
use crate::audit::{AuditEvent, Denial, DenialReason, recordable_tools};
use crate::error::{SessionError, error_chain};
use crate::model::TaskSession;
use crate::storage::Storage;

/// How often the flusher writes buffered denials.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Most denials in one statement.
const FLUSH_BATCH: usize = 1000;

#[derive(Debug)]
pub(crate) struct DenialBuffer {
    denials: Mutex<Vec<Denial>>,
    /// `denials.len()`, written under the lock, so that a full buffer can be seen without
    /// taking the lock (a stale read only means one more or one fewer counted drop).
    len: AtomicUsize,
    capacity: usize,
}

impl DenialBuffer {
    pub(crate) fn new(capacity: usize) -> Self {
        DenialBuffer {
            denials: Mutex::new(Vec::new()),
            len: AtomicUsize::new(0),
            capacity,
        }
    }

    fn denials(&self) -> MutexGuard<'_, Vec<Denial>> {
        // Nothing panics under this lock, so a poisoned buffer is still consistent.
        self.denials.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a denial; `false` if the buffer is full.
    fn push(&self, denial: Denial) -> bool {
        let mut denials = self.denials();
        if denials.len() >= self.capacity {
            return false;
        }
        denials.push(denial);
        self.len.store(denials.len(), Ordering::Relaxed);
        true
    }

    fn is_full(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.capacity
    }

    /// Takes up to one batch, oldest first.
    fn take_batch(&self) -> Vec<Denial> {
        let mut denials = self.denials();
        let n = std::cmp::min(denials.len(), FLUSH_BATCH);
        let batch = denials.drain(..n).collect();
        self.len.store(denials.len(), Ordering::Relaxed);
        batch
    }

    /// Puts a batch that could not be written back in front, as far as the bound allows;
    /// returns how many did not fit.
    fn restore(&self, batch: Vec<Denial>) -> usize {
        let mut denials = self.denials();
        let room = self.capacity.saturating_sub(denials.len());
        let kept = std::cmp::min(room, batch.len());
        let lost = batch.len() - kept;
        denials.splice(0..0, batch.into_iter().take(kept));
        self.len.store(denials.len(), Ordering::Relaxed);
        lost
    }

    pub(crate) fn len(&self) -> usize {
        self.denials().len()
    }

    fn is_empty(&self) -> bool {
        self.denials().is_empty()
    }
}

impl<S: Storage> Inner<S> {
    /// Records that a call of `tools` on `session` was denied with `err` at `at`, if `err`
    /// is a denial worth recording.
    pub(super) fn record_denial(
        &self,
        session: &TaskSession,
        tools: &[&str],
        err: &SessionError,
        at: DateTime<Utc>,
    ) {
        let Some(reason) = DenialReason::of(err) else {
            return;
        };
        // Under a flood of denials the buffer stays full: shed the work of building a
        // record that could not be kept (the loss is counted all the same).
        if self.denials.is_full() {
            self.dropped_denials(1);
            return;
        }
        let denial = Denial {
            session_id: session.session_id,
            agent_id: session.agent_id,
            event: AuditEvent::denied(
                reason,
                recordable_tools(tools),
                session,
                at,
                self.instance_id,
            ),
        };
        if self.denials.push(denial) {
            self.start_denial_flusher();
        } else {
            self.dropped_denials(1);
        }
    }

    fn dropped_denials(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let before = self
            .counters
            .denials_dropped
            .fetch_add(n, Ordering::Relaxed);
        // The first loss and then one in a thousand: loud enough, without flooding the log.
        if before == 0 || before / 1000 != (before + n) / 1000 {
            tracing::warn!(
                dropped_total = before + n,
                "denial buffer full: denied calls are not all being recorded"
            );
        }
    }

    fn start_denial_flusher(&self) {
        if !self.denial_flusher_running.load(Ordering::Relaxed)
            && !self.denial_flusher_running.swap(true, Ordering::AcqRel)
        {
            tokio::spawn(flush_denials(self.me.clone()));
        }
    }

    /// Writes buffered denials until the buffer is empty or a write fails; returns whether
    /// it emptied the buffer.
    pub(super) async fn flush_denials_once(&self) -> bool {
        loop {
            let batch = self.denials.take_batch();
            if batch.is_empty() {
                return true;
            }
            match self.storage.record_denials(&batch).await {
                Ok(()) => self.recorded_denials(batch.len()),
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %error_chain(&err), "denials not recorded yet");
                    self.restore_denials(batch);
                    return false;
                }
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), denials = batch.len(), "storage refused a batch of denials; writing them one by one");
                    if !self.record_denials_one_by_one(batch).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Writes `batch` one denial at a time, dropping (and counting) those storage refuses;
    /// returns `false` if storage became unavailable meanwhile (the rest go back).
    async fn record_denials_one_by_one(&self, batch: Vec<Denial>) -> bool {
        let mut denials = batch.into_iter();
        while let Some(denial) = denials.next() {
            match self
                .storage
                .record_denials(std::slice::from_ref(&denial))
                .await
            {
                Ok(()) => self.recorded_denials(1),
                Err(err) if err.is_transient() => {
                    self.restore_denials(std::iter::once(denial).chain(denials).collect());
                    return false;
                }
                Err(err) => {
                    self.counters
                        .denials_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        session_id = %denial.session_id,
                        event_key = %denial.event.key,
                        reason = ?denial.event.reason,
                        error = %error_chain(&err),
                        "storage refused a denial record; it is dropped"
                    );
                }
            }
        }
        true
    }

    fn recorded_denials(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.counters
            .denials_recorded
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Puts denials storage could not take now back in front of the buffer.
    fn restore_denials(&self, batch: Vec<Denial>) {
        let lost = self.denials.restore(batch);
        if lost > 0 {
            self.dropped_denials(lost);
        }
    }
}

/// The background flusher: runs while denials are buffered, then exits.
async fn flush_denials<S: Storage>(store: Weak<Inner<S>>) {
    loop {
        tokio::time::sleep(FLUSH_EVERY).await;
        let Some(inner) = store.upgrade() else { return };
        inner.flush_denials_once().await;
        if inner.denials.is_empty() {
            inner.denial_flusher_running.store(false, Ordering::Release);
            // A denial pushed between the check and the store starts no new task; take it.
            if inner.denials.is_empty() || inner.denial_flusher_running.swap(true, Ordering::AcqRel)
            {
                return;
            }
        }
    }
}
