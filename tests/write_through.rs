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

/// Backends of this database waiting for a lock now.
async fn waiting_on_a_lock(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "waiting!" FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'"#
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// The audit trail under concurrency, defect 6. A late event (one a store decided long
/// before it writes it: a write that failed, carried by the session's next one) may wait
/// for today's rollup, which counts under a lock late events take. It must wait alone:
/// with two such writes in flight, a write of another session, on time, is still answered
/// at once, not queued behind them for the group commit's lanes.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn write_through_late_events_never_hold_up_the_writes_beside_them(pool: PgPool) {
    let storage = FaultyStorage::new(PgStorage::new(pool.clone()));
    let clock = ManualClock::new(chrono::Utc::now() - chrono::Duration::seconds(30));
    let store = common::manual_reconcile(storage.clone())
        .clock(Arc::new(clock.clone()))
        .maintenance_interval(None)
        .build();
    let agent = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            store
                .create(request(agent, &["search"], 10))
                .await
                .unwrap()
                .session_id,
        );
    }
    let [late_one, late_two, on_time] = [ids[0], ids[1], ids[2]];
    // Two calls whose writes fail: their events, 30 s old by the time they are written,
    // ride on their sessions' next writes.
    storage.fail_next_writes(2);
    for id in [late_one, late_two] {
        assert!(matches!(
            store.use_session(id, "search", Some(agent)).await,
            Err(SessionError::StorageWriteThrough { .. })
        ));
    }
    // Their denials (write_through), late too, are recorded before the rollup starts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stats().denials_recorded < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "denials not recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    clock.set(chrono::Utc::now());

    // Today's rollup, counting: late events wait for it.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut rollup = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('arbiter.rollup_today'), 1)")
        .execute(&mut *rollup)
        .await
        .unwrap();
    let late: Vec<_> = [late_one, late_two]
        .into_iter()
        .map(|id| {
            let store = store.clone();
            tokio::spawn(async move { store.use_session(id, "search", Some(agent)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while waiting_on_a_lock(&pool).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the late writes did not wait"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let beside = tokio::time::timeout(
        Duration::from_secs(1),
        store.use_session(on_time, "search", Some(agent)),
    )
    .await;
    assert!(
        matches!(beside, Ok(Ok(_))),
        "a write on time waited behind late ones: {beside:?}"
    );
    rollup.rollback().await.unwrap();
    for write in late {
        write.await.unwrap().unwrap();
    }
    for id in [late_one, late_two] {
        assert_eq!(row(&pool, id).await.calls_made, 2);
    }
}
