//! [`FaultyStorage`]: a wrapper that injects failures into another storage, for tests that
//! must fail deterministically (what a real outage cannot do on cue). Gateway authors can
//! use it too, to test their handling of `StorageWriteThrough`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CapOutcome, LockedUpdate, Storage, UpdateOutcome, Version, Versioned};
use crate::audit::AuditEvent;
use crate::error::StorageError;
use crate::model::TaskSession;

/// Wraps a storage and fails its reads or writes on demand. Clones share the switches.
#[derive(Debug, Clone)]
pub struct FaultyStorage<S> {
    inner: S,
    faults: Arc<Faults>,
}

#[derive(Debug, Default)]
struct Faults {
    fail_writes: AtomicBool,
    fail_next_writes: AtomicU64,
    fail_reads: AtomicBool,
    injected: AtomicU64,
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

    /// Fails every read (load, count, list) until [`Self::heal`].
    pub fn fail_reads(&self) {
        self.faults.fail_reads.store(true, Ordering::SeqCst);
    }

    /// Switches every fault off.
    pub fn heal(&self) {
        self.faults.fail_writes.store(false, Ordering::SeqCst);
        self.faults.fail_next_writes.store(0, Ordering::SeqCst);
        self.faults.fail_reads.store(false, Ordering::SeqCst);
    }

    /// How many operations have been failed so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::SeqCst)
    }

    fn check_write(&self) -> Result<(), StorageError> {
        let f = &self.faults;
        let once = f
            .fail_next_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if once || f.fail_writes.load(Ordering::SeqCst) {
            f.injected.fetch_add(1, Ordering::SeqCst);
            return Err(injected("write"));
        }
        Ok(())
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
    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        self.check_read()?;
        self.inner.load(session_id).await
    }

    async fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        self.check_write()?;
        self.inner.insert(session, event).await
    }

    async fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        self.check_write()?;
        self.inner
            .insert_if_under_cap(session, event, max, now)
            .await
    }

    async fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        self.check_write()?;
        self.inner.update(session, expected, events).await
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
        self.check_write()?;
        self.inner
            .update_locked(session_id, probe_keys, decide)
            .await
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
