//! [`FaultyStorage`]: a wrapper that injects failures into another storage, for tests that
//! must fail deterministically (what a real outage cannot do on cue). Gateway authors can
//! use it too, to test their handling of `StorageWriteThrough`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use super::{CapOutcome, LockedUpdate, Storage, UpdateOutcome, Version, Versioned};
use crate::audit::{AuditEvent, Denial};
use crate::error::StorageError;
use crate::model::TaskSession;

/// Wraps a storage and fails its reads or writes on demand. Clones share the switches.
#[derive(Debug, Clone)]
pub struct FaultyStorage<S> {
    inner: S,
    faults: Arc<Faults>,
}

#[derive(Debug)]
struct Faults {
    fail_writes: AtomicBool,
    fail_next_writes: AtomicU64,
    commit_then_fail_next_writes: AtomicU64,
    fail_reads: AtomicBool,
    /// `true` while writes hang; a write waits for it to turn `false`.
    hang_writes: watch::Sender<bool>,
    injected: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_writes: AtomicBool::new(false),
            fail_next_writes: AtomicU64::new(0),
            commit_then_fail_next_writes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            hang_writes: watch::Sender::new(false),
            injected: AtomicU64::new(0),
        }
    }
}

/// What an injected write fault does.
enum WriteFault {
    None,
    /// Fail before reaching storage.
    Fail,
    /// Let the write commit, then report a failure: the ambiguous outcome of a connection
    /// lost while the commit's answer was on its way.
    CommitThenFail,
}

impl<S> FaultyStorage<S> {
    /// Wraps `inner` with no fault switched on.
    pub fn new(inner: S) -> Self {
        FaultyStorage {
            inner,
            faults: Arc::default(),
        }
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Fails every write (insert, update) until [`Self::heal`].
    pub fn fail_writes(&self) {
        self.faults.fail_writes.store(true, Ordering::SeqCst);
    }

    /// Fails the next `n` writes, then lets writes through again.
    pub fn fail_next_writes(&self, n: u64) {
        self.faults.fail_next_writes.store(n, Ordering::SeqCst);
    }

    /// Lets the next `n` writes commit, then reports each as failed: the caller cannot tell
    /// whether its change is durable.
    pub fn commit_then_fail_next_writes(&self, n: u64) {
        self.faults
            .commit_then_fail_next_writes
            .store(n, Ordering::SeqCst);
    }

    /// Makes every write wait, without failing, until [`Self::release_writes`] or
    /// [`Self::heal`]: a stalled server.
    pub fn hang_writes(&self) {
        self.faults.hang_writes.send_replace(true);
    }

    /// Lets hung writes (and later ones) proceed.
    pub fn release_writes(&self) {
        self.faults.hang_writes.send_replace(false);
    }

    /// Fails every read (load, count, list) until [`Self::heal`].
    pub fn fail_reads(&self) {
        self.faults.fail_reads.store(true, Ordering::SeqCst);
    }

    /// Switches every fault off.
    pub fn heal(&self) {
        self.faults.fail_writes.store(false, Ordering::SeqCst);
        self.faults.fail_next_writes.store(0, Ordering::SeqCst);
        self.faults
            .commit_then_fail_next_writes
            .store(0, Ordering::SeqCst);
        self.faults.fail_reads.store(false, Ordering::SeqCst);
        self.release_writes();
    }

    /// How many operations have been failed so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::SeqCst)
    }

    /// Waits while writes hang, then decides this write's fault.
    async fn write_fault(&self) -> WriteFault {
        let f = &self.faults;
        let mut hang = f.hang_writes.subscribe();
        // An error means the sender is gone, which cannot happen while `self` holds it.
        let _ = hang.wait_for(|hanging| !hanging).await;
        let take = |counter: &AtomicU64| {
            counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let fault = if take(&f.fail_next_writes) || f.fail_writes.load(Ordering::SeqCst) {
            WriteFault::Fail
        } else if take(&f.commit_then_fail_next_writes) {
            WriteFault::CommitThenFail
        } else {
            return WriteFault::None;
        };
        f.injected.fetch_add(1, Ordering::SeqCst);
        fault
    }

    /// Runs `write` under the injected write fault.
    async fn write<T>(
        &self,
        write: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        match self.write_fault().await {
            WriteFault::None => write.await,
            WriteFault::Fail => Err(injected("write")),
            WriteFault::CommitThenFail => {
                write.await?;
                Err(injected("write (after commit)"))
            }
        }
    }

    fn check_read(&self) -> Result<(), StorageError> {
        if self.faults.fail_reads.load(Ordering::SeqCst) {
            self.faults.injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected("read"));
        }
        Ok(())
    }
}

fn injected(what: &str) -> StorageError {
    StorageError::Transient(format!("injected {what} failure").into())
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn change_feed(&self) -> Option<Box<dyn super::ChangeFeed>> {
        self.inner.change_feed()
    }

    fn batches_writes(&self) -> bool {
        self.inner.batches_writes()
    }

    /// A batch is one write: a fault fails (or commits and then fails) all of it.
    async fn update_many(
        &self,
        batch: &[super::BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        self.write(self.inner.update_many(batch)).await
    }

    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        self.check_read()?;
        self.inner.load(session_id).await
    }

    async fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        self.write(self.inner.insert(session, event)).await
    }

    async fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        self.write(self.inner.insert_if_under_cap(session, event, max, now))
            .await
    }

    async fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        self.write(self.inner.update(session, expected, events))
            .await
    }

    async fn update_locked<F>(
        &self,
        session_id: Uuid,
        probe_keys: &[Uuid],
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        self.write(self.inner.update_locked(session_id, probe_keys, decide))
            .await
    }

    async fn record_denials(&self, denials: &[Denial]) -> Result<(), StorageError> {
        self.write(self.inner.record_denials(denials)).await
    }

    async fn count_live_for_agent(
        &self,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        self.check_read()?;
        self.inner.count_live_for_agent(agent_id, now).await
    }

    async fn active_for_agent(&self, agent_id: Uuid) -> Result<Vec<Uuid>, StorageError> {
        self.check_read()?;
        self.inner.active_for_agent(agent_id).await
    }

    async fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StorageError> {
        self.check_read()?;
        self.inner.due_for_expiry(now, limit).await
    }
}
