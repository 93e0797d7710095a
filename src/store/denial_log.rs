//! The denial log: denied calls, recorded in the audit trail off the hot path.
//!
//! # Invariant: bounded, never silent, recorded once
//! A denial is pushed into a buffer bounded both in denials and in bytes (a `std` mutex
//! held for a push, never across an await), and the log's writer task writes the buffer in
//! batches, one statement each. Each denial keeps at most
//! [`DENIAL_TOOLS_KEPT`](crate::audit::DENIAL_TOOLS_KEPT) tool names, so its size is
//! bounded whatever the agent sent. When the buffer is full (either bound) the denial is
//! dropped, counted (`stats().denials_dropped`) and logged. When storage is unavailable, a
//! batch goes back into the buffer (within its bounds) for the next attempt; writing
//! denials is idempotent by event key, so a batch whose earlier attempt committed unseen is
//! recorded once. When storage *refuses* a batch (anything but unavailability), its denials
//! are written one by one, and those refused again are dropped, counted
//! (`stats().denials_refused`) and logged: a poisoned denial never holds up the ones behind
//! it. `shutdown` writes what is left.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::time_bounded::TimeBounded;
use super::worker::{Parking, Worker};
use crate::audit::{Denial, DenialReason};
use crate::budget::BudgetId;
use crate::error::{SessionError, error_chain};
use crate::metrics::{self, Counter};
use crate::model::TaskSession;
use crate::storage::Storage;

/// How long the writer lets denials gather before writing them.
const WRITE_EVERY: Duration = Duration::from_millis(200);
/// Most denials in one statement.
const BATCH: usize = 1000;

/// Denials waiting to be recorded, their writer task, and what became of them.
pub(super) struct DenialLog<S> {
    storage: Arc<TimeBounded<S>>,
    instance_id: Uuid,
    buffer: Mutex<Buffer>,
    /// `buffer.denials.len()`, written under the lock, so that a full buffer can be seen
    /// without taking the lock (a stale read only means one more or one fewer counted
    /// drop).
    len: AtomicUsize,
    capacity: usize,
    capacity_bytes: usize,
    writer: Worker,
    recorded: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
}

impl<S> std::fmt::Debug for DenialLog<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenialLog")
            .field("buffered", &self.len.load(Ordering::Relaxed))
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The denials waiting, and the bytes they hold (`Denial::approximate_size`).
#[derive(Debug, Default)]
struct Buffer {
    denials: Vec<Denial>,
    bytes: usize,
}

/// The denial log's counters, for [`StoreStats`](crate::StoreStats).
#[derive(Debug, Clone, Copy)]
pub(super) struct DenialCounts {
    pub(super) recorded: u64,
    pub(super) dropped: u64,
    pub(super) refused: u64,
}

impl<S: Storage> DenialLog<S> {
    pub(super) fn new(
        storage: Arc<TimeBounded<S>>,
        instance_id: Uuid,
        capacity: usize,
        capacity_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(DenialLog {
            storage,
            instance_id,
            buffer: Mutex::default(),
            len: AtomicUsize::new(0),
            capacity,
            capacity_bytes,
            writer: Worker::default(),
            recorded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Records that a call of `tools` on `session`, presented by `agent`, was denied with
    /// `err` at `at`, if `err` is a denial worth recording.
    pub(super) fn record(
        self: &Arc<Self>,
        session: &TaskSession,
        tools: &[&str],
        agent: Option<Uuid>,
        err: &SessionError,
        at: DateTime<Utc>,
    ) {
        let Some(reason) = DenialReason::of_call(err, session) else {
            return;
        };
        // Under a flood of denials the buffer stays full: shed the work of building a
        // record that could not be kept (the loss is counted all the same).
        if self.len.load(Ordering::Relaxed) >= self.capacity {
            self.count_dropped(1);
            return;
        }
        let mut denial =
            Denial::new(reason, tools, session, at, self.instance_id).presented_by(agent);
        if let SessionError::SharedBudgetExceeded { budget_id, .. } = err {
            // The budget that had no room: a valid id, since the store took it from one.
            denial.event.budget_id = BudgetId::new(budget_id.as_str()).ok();
        }
        let was_empty = {
            let mut buffer = self.buffer();
            if !self.fits(buffer.denials.len(), buffer.bytes, &denial) {
                drop(buffer);
                self.count_dropped(1);
                return;
            }
            buffer.bytes += denial.approximate_size();
            buffer.denials.push(denial);
            self.len.store(buffer.denials.len(), Ordering::Relaxed);
            buffer.denials.len() == 1
        };
        // The writer parks only after it found the buffer empty: only the denial that
        // makes it non-empty needs to wake it.
        if was_empty {
            let me = Arc::downgrade(self);
            self.writer.wake(|parking| write_in_background(me, parking));
        }
    }

    /// Writes buffered denials until the buffer is empty or a write fails; returns whether
    /// it emptied the buffer.
    pub(super) async fn write_buffered(&self) -> bool {
        loop {
            let batch = self.take_batch();
            if batch.is_empty() {
                return true;
            }
            match self.storage.record_denials(&batch).await {
                Ok(()) => self.count_recorded(batch.len()),
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %error_chain(&err), "denials not recorded yet");
                    self.restore(batch);
                    return false;
                }
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), denials = batch.len(), "storage refused a batch of denials; writing them one by one");
                    if !self.write_one_by_one(batch).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Writes `batch` one denial at a time, dropping (and counting) those storage refuses;
    /// returns `false` if storage became unavailable meanwhile (the rest go back).
    async fn write_one_by_one(&self, batch: Vec<Denial>) -> bool {
        let mut denials = batch.into_iter();
        while let Some(denial) = denials.next() {
            match self
                .storage
                .record_denials(std::slice::from_ref(&denial))
                .await
            {
                Ok(()) => self.count_recorded(1),
                Err(err) if err.is_transient() => {
                    self.restore(std::iter::once(denial).chain(denials).collect());
                    return false;
                }
                Err(err) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    metrics::count(Counter::DenialsDropped, 1);
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
}

impl<S> DenialLog<S> {
    /// Denials waiting to be recorded.
    pub(super) fn buffered(&self) -> usize {
        self.buffer().denials.len()
    }

    pub(super) fn counts(&self) -> DenialCounts {
        DenialCounts {
            recorded: self.recorded.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Whether `denial` fits beside `len` denials holding `bytes`.
    fn fits(&self, len: usize, bytes: usize, denial: &Denial) -> bool {
        len < self.capacity
            && bytes.saturating_add(denial.approximate_size()) <= self.capacity_bytes
    }

    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        // Nothing panics under this lock, so a poisoned buffer is still consistent.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes up to one batch, oldest first.
    fn take_batch(&self) -> Vec<Denial> {
        let mut buffer = self.buffer();
        let n = std::cmp::min(buffer.denials.len(), BATCH);
        let batch: Vec<Denial> = buffer.denials.drain(..n).collect();
        let taken: usize = batch.iter().map(Denial::approximate_size).sum();
        buffer.bytes = buffer.bytes.saturating_sub(taken);
        self.len.store(buffer.denials.len(), Ordering::Relaxed);
        batch
    }

    /// Puts a batch storage could not take now back in front, oldest first, as far as the
    /// bounds allow; the rest are dropped and counted.
    fn restore(&self, batch: Vec<Denial>) {
        let lost = {
            let mut buffer = self.buffer();
            let mut kept = Vec::with_capacity(batch.len());
            let mut lost = 0;
            for denial in batch {
                if self.fits(buffer.denials.len() + kept.len(), buffer.bytes, &denial) {
                    buffer.bytes += denial.approximate_size();
                    kept.push(denial);
                } else {
                    lost += 1;
                }
            }
            buffer.denials.splice(0..0, kept);
            self.len.store(buffer.denials.len(), Ordering::Relaxed);
            lost
        };
        if lost > 0 {
            self.count_dropped(lost);
        }
    }

    fn count_recorded(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.recorded.fetch_add(n, Ordering::Relaxed);
        metrics::count(Counter::DenialsRecorded, n);
    }

    fn count_dropped(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        let before = self.dropped.fetch_add(n, Ordering::Relaxed);
        metrics::count(Counter::DenialsDropped, n);
        // The first loss and then one in a thousand: loud enough, without flooding the log.
        if before == 0 || before / 1000 != (before + n) / 1000 {
            tracing::warn!(
                dropped_total = before + n,
                "denial buffer full: denied calls are not all being recorded"
            );
        }
    }
}

/// The writer task: once woken, lets denials gather for [`WRITE_EVERY`], writes them, and
/// goes on until the buffer is empty (retrying after the same pause while storage is
/// unavailable); then parks. Holds the log only while writing.
async fn write_in_background<S: Storage>(log: Weak<DenialLog<S>>, parking: Parking) {
    while parking.park().await {
        loop {
            tokio::time::sleep(WRITE_EVERY).await;
            let Some(log) = log.upgrade() else { return };
            if log.write_buffered().await {
                break;
            }
        }
    }
}
