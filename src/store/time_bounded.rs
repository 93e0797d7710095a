//! A deadline on every storage operation the store makes, so that a stalled network or
//! server turns into `StorageWriteThrough` / `StorageRead` in bounded time instead of a
//! hang (a pool's acquire timeout covers only waiting for a connection).
//!
//! # Invariant: one deadline per public call
//! Each storage operation is bounded by `storage_timeout` on its own, and a public call
//! that makes several, or waits before making one (for a group-commit lane, or behind
//! another write of the same session), bounds the whole call by one deadline taken when it
//! started ([`TimeBounded::by`]). So every call is answered within `storage_timeout` plus
//! the time to decide and to be scheduled again (microseconds, and tokio's 1 ms timer
//! resolution), however loaded the store is.
//!
//! Async cancellation safety: a timed-out operation's future is dropped. A write may still
//! commit on the server; the store treats it as a failure whose outcome is unknown (cache
//! ahead, pending), and the event keys tell the reconciler whether it landed.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use crate::audit::{AuditEvent, Denial};
use crate::error::StorageError;
use crate::model::TaskSession;
use crate::storage::{
    BatchUpdate, CapOutcome, LockWait, LockedUpdate, ShareGrant, ShareRequest, Storage,
    StoredReservation, UpdateOutcome, Version, Versioned,
};

/// A storage whose every operation is bounded in time: each by `after`, and a call's by
/// one deadline ([`Self::for_call`]).
#[derive(Debug)]
pub(crate) struct TimeBounded<S> {
    inner: S,
    after: Duration,
}

impl<S> TimeBounded<S> {
    pub(crate) fn new(inner: S, after: Duration) -> Self {
        TimeBounded { inner, after }
    }

    /// The storage itself.
    pub(crate) fn inner(&self) -> &S {
        &self.inner
    }

    /// The time each call (and each operation) is given.
    pub(crate) fn after(&self) -> Duration {
        self.after
    }

    /// The deadline of a public call starting now.
    pub(crate) fn for_call(&self) -> Instant {
        Instant::now() + self.after
    }

    /// Runs `operation`, or any wait, until `deadline` (a call's, from [`Self::for_call`]).
    pub(crate) async fn by<T>(
        &self,
        deadline: Instant,
        operation: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        tokio::time::timeout_at(deadline, operation)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    /// The error of an operation or wait that ran out of time.
    pub(crate) fn timed_out(&self) -> StorageError {
        StorageError::TimedOut { after: self.after }
    }

    async fn run<T>(
        &self,
        operation: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        tokio::time::timeout(self.after, operation)
            .await
            .unwrap_or(Err(StorageError::TimedOut { after: self.after }))
    }
}

impl<S: Storage> Storage for TimeBounded<S> {
    fn change_feed(&self) -> Option<Box<dyn crate::storage::ChangeFeed>> {
        self.inner.change_feed()
    }

    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        self.run(self.inner.load(session_id)).await
    }

    /// Not bounded by the call timeout: maintenance is nobody's call (see `maintenance`).
    async fn maintain(&self) -> Result<(), StorageError> {
        self.inner.maintain().await
    }

    fn batches_writes(&self) -> bool {
        self.inner.batches_writes()
    }

    async fn update_many(
        &self,
        batch: &[BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        self.run(self.inner.update_many(batch)).await
    }

    async fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        self.run(self.inner.insert(session, event)).await
    }

    async fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        self.run(self.inner.insert_if_under_cap(session, event, max, now))
            .await
    }

    async fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        self.run(self.inner.update(session, expected, events)).await
    }

    async fn update_locked<F>(
        &self,
        session_id: Uuid,
        probe_keys: &[Uuid],
        wait: LockWait,
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        self.run(
            self.inner
                .update_locked(session_id, probe_keys, wait, decide),
        )
        .await
    }

    async fn record_denials(&self, denials: &[Denial]) -> Result<(), StorageError> {
        self.run(self.inner.record_denials(denials)).await
    }

    async fn count_live_for_agent(
        &self,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        self.run(self.inner.count_live_for_agent(agent_id, now))
            .await
    }

    async fn active_for_agent(&self, agent_id: Uuid) -> Result<Vec<Uuid>, StorageError> {
        self.run(self.inner.active_for_agent(agent_id)).await
    }

    async fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StorageError> {
        self.run(self.inner.due_for_expiry(now, limit)).await
    }

    async fn grant_share(&self, request: ShareRequest<'_>) -> Result<ShareGrant, StorageError> {
        self.run(self.inner.grant_share(request)).await
    }

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<StoredReservation>, StorageError> {
        self.run(self.inner.reservation(reservation_id)).await
    }

    async fn release_share(
        &self,
        share_id: Uuid,
        keep: u64,
        close: bool,
    ) -> Result<u64, StorageError> {
        self.run(self.inner.release_share(share_id, keep, close))
            .await
    }
}
