//! Concurrency inside one store, on `MemoryStorage` wrapped to count and stall operations:
//! what only a controllable storage can show deterministically.
#![allow(
    clippy::unwrap_used,
    reason = "test scaffolding: a poisoned lock or closed semaphore is a test bug"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arbiter_session::audit::{AuditEvent, Denial};
use arbiter_session::error::StorageError;
use arbiter_session::storage::{
    CapOutcome, LockWait, LockedUpdate, UpdateOutcome, Version, Versioned,
};
use arbiter_session::{MemoryStorage, SessionError, SessionStore, Storage, TaskSession};
use chrono::{DateTime, Utc};
use common::request;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// Counts loads (each takes a little while, so concurrent misses overlap) and can hold the
/// updates of one session until released.
#[derive(Debug, Clone)]
struct Instrumented {
    inner: MemoryStorage,
    loads: Arc<AtomicU64>,
    stalled: Arc<std::sync::Mutex<Option<Uuid>>>,
    release: Arc<Semaphore>,
}

impl Instrumented {
    fn new() -> Self {
        Instrumented {
            inner: MemoryStorage::new(),
            loads: Arc::default(),
            stalled: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        }
    }

    fn stall_updates_of(&self, id: Uuid) {
        *self.stalled.lock().unwrap() = Some(id);
    }

    async fn wait_if_stalled(&self, id: Uuid) {
        let stalled = *self.stalled.lock().unwrap();
        if stalled == Some(id) {
            self.release.acquire().await.unwrap().forget();
        }
    }
}

impl Storage for Instrumented {
    async fn load(&self, id: Uuid) -> Result<Option<Versioned>, StorageError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.inner.load(id).await
    }
    async fn insert(&self, s: &TaskSession, e: &AuditEvent) -> Result<Version, StorageError> {
        self.inner.insert(s, e).await
    }
    async fn insert_if_under_cap(
        &self,
        s: &TaskSession,
        e: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        self.inner.insert_if_under_cap(s, e, max, now).await
    }
    async fn update(
        &self,
        s: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        self.wait_if_stalled(s.session_id).await;
        self.inner.update(s, expected, events).await
    }
    async fn update_locked<F>(
        &self,
        id: Uuid,
        keys: &[Uuid],
        wait: LockWait,
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        self.wait_if_stalled(id).await;
        self.inner.update_locked(id, keys, wait, decide).await
    }
    async fn record_denials(&self, denials: &[Denial]) -> Result<(), StorageError> {
        self.inner.record_denials(denials).await
    }
    async fn count_live_for_agent(&self, a: Uuid, now: DateTime<Utc>) -> Result<u64, StorageError> {
        self.inner.count_live_for_agent(a, now).await
    }
    async fn active_for_agent(&self, a: Uuid) -> Result<Vec<Uuid>, StorageError> {
        self.inner.active_for_agent(a).await
    }
    async fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StorageError> {
        self.inner.due_for_expiry(now, limit).await
    }
}

/// The store, its handles and its futures cross tokio tasks.
#[test]
fn store_and_its_futures_are_send_and_sync() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let store = SessionStore::new(MemoryStorage::new());
    send_sync(&store);
    let id = Uuid::new_v4();
    send(store.use_session(id, "t", None));
    send(store.use_session_batch(id, &["t"], None));
    send(store.create(request(id, &["t"], 1)));
    send(store.get(id));
    send(store.expire_due());
    send(store.shutdown(Duration::ZERO));
}

/// Sixteen concurrent misses for one id share a single load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_concurrent_misses_load_once() {
    let storage = Instrumented::new();
    let id = SessionStore::new(storage.clone())
        .create(request(Uuid::new_v4(), &["t"], 5))
        .await
        .unwrap()
        .session_id;
    let cold = SessionStore::new(storage.clone());
    let gets: Vec<_> = (0..16)
        .map(|_| {
            let cold = cold.clone();
            tokio::spawn(async move { cold.get(id).await })
        })
        .collect();
    for get in gets {
        assert_eq!(get.await.unwrap().unwrap().session_id, id);
    }
    assert_eq!(storage.loads.load(Ordering::SeqCst), 1);
}

/// A write stalled on one session holds up that session only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_a_stalled_session_does_not_block_others() {
    let storage = Instrumented::new();
    let store = SessionStore::new(storage.clone());
    let slow = common::new_session(&store, &["t"], 5).await;
    let fast = common::new_session(&store, &["t"], 5).await;
    storage.stall_updates_of(slow);
    let stalled = tokio::spawn({
        let store = store.clone();
        async move { store.use_session(slow, "t", None).await }
    });
    // Liveness, not speed: the other session completes while `slow` is still held.
    let other = tokio::time::timeout(Duration::from_secs(10), async {
        store.use_session(fast, "t", None).await.unwrap();
        store.close(fast).await.unwrap();
        store.get(fast).await.unwrap()
    })
    .await
    .expect("an unrelated session never waits for a stalled one");
    assert_eq!(other.calls_made, 1);
    assert!(!stalled.is_finished());
    storage.release.add_permits(1);
    assert_eq!(stalled.await.unwrap().unwrap().calls_made, 1);
}

/// Same-session calls are serialized: 50 concurrent callers, budget 30, exactly 30 `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_same_session_calls_are_exact() {
    let storage = MemoryStorage::new();
    let store = SessionStore::new(storage.clone());
    let id = common::new_session(&store, &["t"], 30).await;
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.use_session(id, "t", None).await })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(SessionError::BudgetExceeded { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 30);
    assert_eq!(
        storage.load(id).await.unwrap().unwrap().session.calls_made,
        30
    );
    let allowed = storage
        .events(id)
        .iter()
        .filter(|e| e.kind == arbiter_session::audit::EventKind::CallAllowed)
        .count();
    assert_eq!(allowed, 30);
}

/// Security review, defect 4. Any agent controls the session id it presents, so random
/// unknown ids must not take storage from live sessions: however many lookups of ids the
/// cache does not hold are waiting on storage, at most the cold-load lane's width (1 by
/// default, 3 here) reach it at once, and the writes of cached sessions are answered
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_unknown_ids_take_a_bounded_share_of_storage() {
    let storage = arbiter_session::testing::FaultyStorage::new(MemoryStorage::new());
    let store = SessionStore::builder(storage.clone())
        .storage_timeout(Duration::from_secs(30))
        .cold_loads(3)
        .build();
    let agent = Uuid::new_v4();
    let live = store
        .create(request(agent, &["search"], 100))
        .await
        .unwrap()
        .session_id;
    storage.hang_loads();
    let lookups: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.get(Uuid::new_v4()).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while storage.hung_loads() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no load reached storage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every lookup has had time to reach storage, were it let through.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(storage.hung_loads(), 3, "loads of unknown ids at once");
    for _ in 0..10 {
        store
            .use_session(live, "search", Some(agent))
            .await
            .unwrap();
    }
    storage.heal();
    for lookup in lookups {
        assert!(matches!(
            lookup.await.unwrap(),
            Err(SessionError::NotFound(_))
        ));
    }
    assert_eq!(store.get(live).await.unwrap().calls_made, 10);
}
