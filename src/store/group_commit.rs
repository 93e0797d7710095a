//! Group commit: versioned writes of different sessions that wait at the same time share
//! one statement and one commit ([`Storage::update_many`]).
//!
//! # Invariant: no timer, no Ok before the commit
//! A write that finds nothing in flight or waiting goes out at once, on its own task;
//! writes that arrive while [`MAX_IN_FLIGHT`] statements are in flight form the next batch,
//! sent as soon as a lane frees. So an idle store pays no
//! batching delay, and a busy one sends as many calls per commit as arrived during the
//! previous commit. Each write keeps its own version check and outcome; a failed statement
//! fails every write in it (each caller then goes to the pending set). A caller learns its
//! outcome only after the statement returned.
//!
//! # Isolation
//! A batch statement never waits for a row lock: PostgreSQL's batch skips rows another
//! transaction holds and reports them as conflicts, which their callers resolve alone
//! (DESIGN §4 invariant 8: a session stalled elsewhere holds up no other session). Up to
//! [`MAX_IN_FLIGHT`] batches are in flight at once, each on its own connection, so a slow
//! statement does not stop the next batch either. A storage that cannot write a batch in
//! one step ([`Storage::batches_writes`] is false) gets every write on its own.
//!
//! A write alone goes out on its caller's task; batches go out on flusher tasks, so a
//! caller that gives up (a cancelled future) cannot strand the other writes of its batch.
//! Both take a lane, and both use the batch statement, so neither waits on a row lock.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Inner;
use crate::audit::AuditEvent;
use crate::error::StorageError;
use crate::model::TaskSession;
use crate::storage::{BatchUpdate, Storage, UpdateOutcome, Version};

/// Most writes per statement: bounds the statement's size and the time its row locks are
/// held; more waiting writes simply form the next batch.
const MAX_BATCH: usize = 128;

/// Most statements in flight at once (see the module documentation). Few lanes make big
/// batches: on the 2-core machine of the README's table, 2 lanes carried 64 writers at
/// 8,600 calls/s where 8 lanes managed 7,100 (`scripts/bench --quick`); measured again
/// once the audit trigger had become cheap, 3 lanes were slower than 2 at both 16 and 64
/// writers (three alternating runs each).
const MAX_IN_FLIGHT: usize = 2;

/// A write's outcome, as its caller receives it. A failed statement's error is shared by
/// every write of its batch.
pub(super) type WriteOutcome = Result<UpdateOutcome, Arc<StorageError>>;

struct Write {
    session: TaskSession,
    expected: Version,
    events: Vec<AuditEvent>,
    reply: oneshot::Sender<WriteOutcome>,
}

/// The writes waiting for the next batch.
#[derive(Default)]
pub(super) struct GroupCommit {
    waiting: Mutex<Vec<Write>>,
    /// Flush tasks running; each exits when nothing waits.
    flushers: AtomicUsize,
}

impl GroupCommit {
    /// The next batch, oldest first. Writes whose caller stopped waiting (its deadline
    /// passed, or it was cancelled) are dropped unsent: the caller already treats the write
    /// as failed with an unknown outcome, so not sending it is one of the outcomes it
    /// expects, and the cheapest.
    fn take_batch(&self) -> Vec<Write> {
        let mut waiting = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting.retain(|write| !write.reply.is_closed());
        let n = std::cmp::min(waiting.len(), MAX_BATCH);
        waiting.drain(..n).collect()
    }

    fn is_idle(&self) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

impl<S: Storage> Inner<S> {
    /// Writes `session` (naming `expected`) with `events` in the next group commit, giving
    /// up at the caller's `deadline` (waiting for a lane included). Only a write that waits
    /// for a batch is copied (it outlives its caller's borrow there).
    pub(super) async fn write(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
        deadline: Instant,
    ) -> WriteOutcome {
        if !self.storage.batches_writes() {
            return self
                .storage
                .by(deadline, self.storage.update(session, expected, events))
                .await
                .map_err(Arc::new);
        }
        // Nothing in flight or waiting: go out at once, on this task (no hop to a flusher).
        if self.commits.is_idle() && self.commits.claim_lane() {
            let lane = Lane { store: self };
            let alone = [BatchUpdate {
                session,
                expected,
                events,
            }];
            let outcome = match self
                .storage
                .by(deadline, self.storage.update_many(&alone))
                .await
            {
                Ok(outcomes) => outcomes.into_iter().next().ok_or_else(|| {
                    Arc::new(StorageError::Decode(
                        "update_many answered no outcome".to_owned(),
                    ))
                }),
                Err(err) => Err(Arc::new(err)),
            };
            drop(lane);
            return outcome;
        }
        let (reply, outcome) = oneshot::channel();
        self.commits
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Write {
                session: session.clone(),
                expected,
                events: events.to_vec(),
                reply,
            });
        self.start_flusher();
        // The flusher answers every write it takes; it is dropped unanswered only if the
        // runtime shuts down mid-flush, when the outcome is unknown. On a timeout `outcome`
        // is dropped, so a flusher that has not taken the write yet drops it unsent.
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Arc::new(StorageError::Transient(
                "the group commit stopped before answering".into(),
            ))),
            Err(_) => Err(Arc::new(self.storage.timed_out())),
        }
    }

    fn start_flusher(&self) {
        if self.commits.claim_lane() {
            tokio::spawn(flush(self.me.clone()));
        }
    }
}

/// A lane taken by a write that went out on its caller's task. Released on drop, also
/// when the caller is cancelled mid-write; writes that queued meanwhile then get a flusher.
struct Lane<'a, S: Storage> {
    store: &'a Inner<S>,
}

impl<S: Storage> Drop for Lane<'_, S> {
    fn drop(&mut self) {
        self.store.commits.flushers.fetch_sub(1, Ordering::AcqRel);
        // Outside a runtime (it is shutting down) nothing can be flushed anyway.
        if !self.store.commits.is_idle() && tokio::runtime::Handle::try_current().is_ok() {
            self.store.start_flusher();
        }
    }
}

impl GroupCommit {
    /// Takes a flusher lane if one is free.
    fn claim_lane(&self) -> bool {
        self.flushers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .is_ok()
    }
}

/// Sends batches until nothing waits. Holds the store only while flushing.
async fn flush<S: Storage>(store: std::sync::Weak<Inner<S>>) {
    loop {
        let Some(inner) = store.upgrade() else { return };
        let batch = inner.commits.take_batch();
        if batch.is_empty() {
            inner.commits.flushers.fetch_sub(1, Ordering::AcqRel);
            // A write pushed after take_batch, while every lane looked busy, started no
            // flusher: take it over if a lane is free now (else a running flusher will).
            if inner.commits.is_idle() || !inner.commits.claim_lane() {
                return;
            }
            continue;
        }
        let updates: Vec<BatchUpdate<'_>> = batch
            .iter()
            .map(|w| BatchUpdate {
                session: &w.session,
                expected: w.expected,
                events: &w.events,
            })
            .collect();
        let result = inner.storage.update_many(&updates).await;
        drop(updates);
        match result {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                for (write, outcome) in batch.into_iter().zip(outcomes) {
                    // A caller that gave up no longer listens; nothing to do for it.
                    let _ = write.reply.send(Ok(outcome));
                }
            }
            Ok(outcomes) => {
                let err = Arc::new(StorageError::Decode(format!(
                    "update_many answered {} outcomes for {} writes",
                    outcomes.len(),
                    batch.len()
                )));
                for write in batch {
                    let _ = write.reply.send(Err(Arc::clone(&err)));
                }
            }
            Err(err) => {
                let err = Arc::new(err);
                for write in batch {
                    let _ = write.reply.send(Err(Arc::clone(&err)));
                }
            }
        }
    }
}
