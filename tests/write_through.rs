//! Write-through failure, the pending set and reconciliation, with failures injected by
//! `FaultyStorage` around the real `PgStorage`. The thorough campaign (eviction, idle
//! expiry, shutdown, ambiguous commits, network faults) is tests/failure.rs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arbiter_session::testing::{FaultyStorage, ManualClock};
use arbiter_session::{PgStorage, SessionError, SessionStore};
use common::{event_kinds, request, row};
use sqlx::PgPool;
use uuid::Uuid;

fn faulty_store(
    pool: &PgPool,
) -> (
    SessionStore<FaultyStorage<PgStorage>>,
    FaultyStorage<PgStorage>,
) {
    let faulty = FaultyStorage::new(PgStorage::new(pool.clone()));
    let store = common::manual_reconcile(faulty.clone())
        .clock(Arc::new(ManualClock::starting_now()))
        .build();
    (store, faulty)
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn write_failure_keeps_cache_ahead_then_reconciles(pool: PgPool) {
    let (store, faulty) = faulty_store(&pool);
    let s = store
        .create(request(Uuid::new_v4(), &["a"], 5))
        .await
        .unwrap();
    let id = s.session_id;
    store.use_session(id, "a", None).await.unwrap();

    faulty.fail_writes();
    let failed = store.use_session(id, "a", None).await;
    assert!(
        matches!(failed, Err(SessionError::StorageWriteThrough { session_id, .. }) if session_id == id)
    );
    assert_eq!(
        store.get(id).await.unwrap().calls_made,
        2,
        "the cache stays ahead"
    );
    assert_eq!(row(&pool, id).await.calls_made, 1, "storage is behind");
    let stats = store.stats();
    assert_eq!((stats.pending, stats.write_failures), (1, 1));
    assert_eq!(store.reconcile_now().await.still_pending, 1, "still down");

    faulty.heal();
    let report = store.reconcile_now().await;
    assert_eq!((report.reconciled, report.still_pending), (1, 0));
    assert_eq!(row(&pool, id).await.calls_made, 2);
    assert_eq!(store.get(id).await.unwrap().calls_made, 2);
    assert_eq!(
        event_kinds(&pool, id).await,
        ["created", "call_allowed", "call_allowed", "reconciled"]
    );
    assert_eq!(store.stats().reconciled, 1);
}

/// The next successful mutation carries the unwritten change with it.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_later_mutation_makes_the_ahead_state_durable(pool: PgPool) {
    let (store, faulty) = faulty_store(&pool);
    let id = common::new_session(&store, &["a"], 2).await;
    faulty.fail_next_writes(1);
    assert!(store.use_session(id, "a", None).await.is_err());
    // The failed call stays counted: one call left, not two.
    store.use_session(id, "a", None).await.unwrap();
    assert!(matches!(
        store.use_session(id, "a", None).await,
        Err(SessionError::BudgetExceeded { used: 2, .. })
    ));
    assert_eq!(row(&pool, id).await.calls_made, 2);
    assert_eq!(store.stats().pending, 0);
    assert_eq!(
        event_kinds(&pool, id).await,
        ["created", "call_allowed", "call_allowed"]
    );
}

/// Without `reconcile_now`, the background reconciler drains the pending set by itself.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn background_reconciler_drains_pending(pool: PgPool) {
    let faulty = FaultyStorage::new(PgStorage::new(pool.clone()));
    let store = SessionStore::builder(faulty.clone())
        .reconcile_interval(Duration::from_millis(10))
        .build();
    let id = common::new_session(&store, &["a"], 3).await;
    faulty.fail_next_writes(1);
    assert!(store.use_session(id, "a", None).await.is_err());
    common::drained(&store).await;
    assert_eq!(row(&pool, id).await.calls_made, 1);
}
