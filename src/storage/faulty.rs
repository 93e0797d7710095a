//! [`FaultyStorage`]: a wrapper that injects failures into another storage, for tests that
//! must fail deterministically (what a real outage cannot do on cue). Exported as
//! [`crate::testing::FaultyStorage`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use super::{
    CapOutcome, Change, ChangeFeed, LockWait, LockedUpdate, ShareGrant, ShareRequest, Storage,
    StoredReservation, UpdateOutcome, Version, Versioned,
};
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
    refuse_writes: AtomicBool,
    fail_reads: AtomicBool,
    /// `true` while writes hang; a write waits for it to turn `false`.
    hang_writes: watch::Sender<bool>,
    /// Writes still let through before writes start to hang; negative when not armed.
    hang_after: AtomicI64,
    /// Writes waiting in a hang right now.
    hung: AtomicUsize,
    /// Latency added to every write, in microseconds.
    write_delay_micros: AtomicU64,
    /// `true` while the upkeep hangs; a [`Storage::maintain`] run waits for it to turn
    /// `false`.
    hang_maintenance: watch::Sender<bool>,
    /// Upkeep runs waiting in a hang right now.
    hung_maintenance: AtomicUsize,
    /// `true` while session loads hang; a [`Storage::load`] waits for it to turn `false`.
    hang_loads: watch::Sender<bool>,
    /// Loads waiting in a hang right now.
    hung_loads: AtomicUsize,
    /// Bumped to make the change feed report a reconnection.
    feed_resets: watch::Sender<u64>,
    injected: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_writes: AtomicBool::new(false),
            fail_next_writes: AtomicU64::new(0),
            commit_then_fail_next_writes: AtomicU64::new(0),
            refuse_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            hang_writes: watch::Sender::new(false),
            hang_after: AtomicI64::new(-1),
            hung: AtomicUsize::new(0),
            write_delay_micros: AtomicU64::new(0),
            hang_maintenance: watch::Sender::new(false),
            hung_maintenance: AtomicUsize::new(0),
            hang_loads: watch::Sender::new(false),
            hung_loads: AtomicUsize::new(0),
            feed_resets: watch::Sender::new(0),
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
    /// Refuse the write as a constraint would: not worth retrying as is.
    Refuse,
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

    /// Lets the next `n` writes through, then makes every write hang as
    /// [`Self::hang_writes`] does: a server that stalls in the middle of an operation.
    pub fn hang_writes_after(&self, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.faults.hang_after.store(n, Ordering::SeqCst);
    }

    /// Makes every write take `delay` longer (until [`Self::heal`]): a slow server.
    pub fn delay_writes(&self, delay: std::time::Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.faults
            .write_delay_micros
            .store(micros, Ordering::SeqCst);
    }

    /// Lets hung writes (and later ones) proceed.
    pub fn release_writes(&self) {
        self.faults.hang_after.store(-1, Ordering::SeqCst);
        self.faults.hang_writes.send_replace(false);
    }

    /// How many writes are waiting in a hang right now.
    pub fn hung_writes(&self) -> usize {
        self.faults.hung.load(Ordering::SeqCst)
    }

    /// Makes every upkeep run ([`Storage::maintain`]) wait until [`Self::heal`]: a run that
    /// takes long, as the first rollup of a big trail does.
    pub fn hang_maintenance(&self) {
        self.faults.hang_maintenance.send_replace(true);
    }

    /// How many upkeep runs are waiting in a hang right now (a cancelled run stops counting).
    pub fn hung_maintenance(&self) -> usize {
        self.faults.hung_maintenance.load(Ordering::SeqCst)
    }

    /// Makes every session load ([`Storage::load`]) wait until [`Self::heal`]: a server
    /// slow to answer reads, as when a flood of lookups holds its connections.
    pub fn hang_loads(&self) {
        self.faults.hang_loads.send_replace(true);
    }

    /// How many session loads are waiting in a hang right now (a cancelled one stops
    /// counting).
    pub fn hung_loads(&self) -> usize {
        self.faults.hung_loads.load(Ordering::SeqCst)
    }

    /// Refuses every write with [`StorageError::Constraint`] (named `injected`) until
    /// [`Self::heal`]: a write storage will never accept as it is.
    pub fn refuse_writes(&self) {
        self.faults.refuse_writes.store(true, Ordering::SeqCst);
    }

    /// Makes the change feed report [`Change::Reset`] next, as after a reconnection whose
    /// gap may have lost notifications: the store drops its whole cache.
    pub fn reset_change_feed(&self) {
        self.faults.feed_resets.send_modify(|resets| *resets += 1);
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
        self.faults.refuse_writes.store(false, Ordering::SeqCst);
        self.faults.write_delay_micros.store(0, Ordering::SeqCst);
        self.faults.fail_reads.store(false, Ordering::SeqCst);
        self.faults.hang_maintenance.send_replace(false);
        self.faults.hang_loads.send_replace(false);
        self.release_writes();
    }

    /// How many operations have been failed so far.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::SeqCst)
    }

    /// Waits while writes hang, then decides this write's fault.
    async fn write_fault(&self) -> WriteFault {
        let f = &self.faults;
        let delay = f.write_delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_micros(delay)).await;
        }
        let armed = f
            .hang_after
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n >= 0).then(|| n - 1)
            });
        if armed == Ok(0) {
            f.hang_writes.send_replace(true);
        }
        wait_while_hung(&f.hang_writes, &f.hung).await;
        let take = |counter: &AtomicU64| {
            counter
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let fault = if f.refuse_writes.load(Ordering::SeqCst) {
            WriteFault::Refuse
        } else if take(&f.fail_next_writes) || f.fail_writes.load(Ordering::SeqCst) {
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
            WriteFault::Refuse => Err(StorageError::Constraint {
                name: "injected".to_owned(),
                source: "injected refusal".into(),
            }),
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

/// Waits while `hang` is `true`, counted in `hung` meanwhile.
async fn wait_while_hung(hang: &watch::Sender<bool>, hung: &AtomicUsize) {
    let mut hanging = hang.subscribe();
    if *hanging.borrow() {
        hung.fetch_add(1, Ordering::SeqCst);
        let _unhung = Unhung(hung);
        // An error means the sender is gone, which cannot happen while the caller holds it.
        let _ = hanging.wait_for(|hanging| !hanging).await;
    }
}

/// Counts a hung write (or load, or upkeep run) out again when it stops waiting, cancelled or not.
struct Unhung<'a>(&'a AtomicUsize);

impl Drop for Unhung<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The inner storage's change feed, plus the resets injected by
/// [`FaultyStorage::reset_change_feed`]. Over a storage without a feed, only those.
struct FaultyFeed {
    inner: Option<Box<dyn ChangeFeed>>,
    resets: watch::Receiver<u64>,
}

impl ChangeFeed for FaultyFeed {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Change> + Send + '_>> {
        Box::pin(async move {
            let FaultyFeed { inner, resets } = self;
            let injected = async {
                match resets.changed().await {
                    Ok(()) => Change::Reset,
                    // The switches are gone: nothing will be injected any more.
                    Err(_) => std::future::pending().await,
                }
            };
            match inner {
                Some(inner) => tokio::select! {
                    change = injected => change,
                    change = inner.next() => change,
                },
                None => injected.await,
            }
        })
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        Some(Box::new(FaultyFeed {
            inner: self.inner.change_feed(),
            resets: self.faults.feed_resets.subscribe(),
        }))
    }

    fn batches_writes(&self) -> bool {
        self.inner.batches_writes()
    }

    async fn maintain(&self) -> Result<(), StorageError> {
        let f = &self.faults;
        wait_while_hung(&f.hang_maintenance, &f.hung_maintenance).await;
        self.inner.maintain().await
    }

    /// A batch is one write: a fault fails (or commits and then fails) all of it.
    async fn update_many(
        &self,
        batch: &[super::BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        self.write(self.inner.update_many(batch)).await
    }

    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        let f = &self.faults;
        wait_while_hung(&f.hang_loads, &f.hung_loads).await;
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
        wait: LockWait,
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        self.write(
            self.inner
                .update_locked(session_id, probe_keys, wait, decide),
        )
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

    async fn grant_share(&self, request: ShareRequest<'_>) -> Result<ShareGrant, StorageError> {
        self.write(self.inner.grant_share(request)).await
    }

    async fn reservation(
        &self,
        reservation_id: Uuid,
    ) -> Result<Option<StoredReservation>, StorageError> {
        self.check_read()?;
        self.inner.reservation(reservation_id).await
    }

    async fn release_share(
        &self,
        share_id: Uuid,
        keep: u64,
        close: bool,
    ) -> Result<u64, StorageError> {
        self.write(self.inner.release_share(share_id, keep, close))
            .await
    }
}
