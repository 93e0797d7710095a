//! The failure campaign: a gateway may lose its database, its network or its process at
//! any moment and still never over-spend a budget, never resurrect a closed session, and
//! never report success for something that is not durable.
//!
//! Network failures go through a TCP proxy in front of the real PostgreSQL; outcomes that a
//! network cannot produce on cue (a commit whose answer is lost, a write that hangs exactly
//! once) use `FaultyStorage` around the real `PgStorage`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arbiter_session::testing::ManualClock;
use arbiter_session::{PgStorage, SessionError, SessionStatus, SessionStore};
use common::{audited_calls, drained, event_kinds, faulty, proxied_pool, request, row};
use sqlx::PgPool;
use uuid::Uuid;

/// A liveness bound for one call: generous, because it only proves there is no hang.
const NO_HANG: Duration = Duration::from_secs(15);

/// PostgreSQL stalls (bytes stop flowing, nothing closes): the write gives up at the
/// store's deadline with `StorageWriteThrough`, the cache stays ahead, the session is
/// pending and counted; after healing, the reconciler makes the row equal the cache.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_stalled_network_is_write_through_then_reconciled(pool: PgPool) {
    let (proxy, proxied) = proxied_pool(&pool).await;
    let store = SessionStore::builder(PgStorage::new(proxied))
        .storage_timeout(Duration::from_millis(500))
        .reconcile_interval(Duration::from_millis(50))
        .build();
    let id = common::new_session(&store, &["t"], 5).await;
    common::wait_listening(&store).await;
    store.use_session(id, "t", None).await.unwrap();

    proxy.stall();
    let failed = tokio::time::timeout(NO_HANG, store.use_session(id, "t", None))
        .await
        .expect("a stalled database never hangs the caller");
    assert!(
        matches!(failed, Err(SessionError::StorageWriteThrough { session_id, .. }) if session_id == id)
    );
    assert_eq!(store.get(id).await.unwrap().calls_made, 2, "cache ahead");
    assert_eq!(row(&pool, id).await.calls_made, 1, "storage behind");
    let stats = store.stats();
    assert_eq!((stats.pending, stats.write_failures), (1, 1));

    proxy.heal();
    drained(&store).await;
    assert_eq!(row(&pool, id).await.calls_made, 2);
    assert_eq!(store.get(id).await.unwrap().calls_made, 2);
    assert_eq!(audited_calls(&pool, id).await, 2);
    assert_eq!(store.stats().reconciled, 1);
}

/// The network refuses every connection while several sessions are used: each call is
/// `StorageWriteThrough`, and after healing every pending session drains and every row
/// equals its cache.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_refused_network_drains_every_pending_session(pool: PgPool) {
    let (proxy, proxied) = proxied_pool(&pool).await;
    let store = SessionStore::builder(PgStorage::new(proxied))
        .reconcile_interval(Duration::from_millis(50))
        .build();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(common::new_session(&store, &["t"], 5).await);
    }
    common::wait_listening(&store).await;
    for id in &ids {
        store.get(*id).await.unwrap();
    }
    proxy.refuse();
    for id in &ids {
        let failed = tokio::time::timeout(NO_HANG, store.use_session(*id, "t", None))
            .await
            .unwrap();
        assert!(matches!(
            failed,
            Err(SessionError::StorageWriteThrough { .. })
        ));
    }
    store.close(ids[0]).await.unwrap_err();
    assert_eq!(store.stats().pending, 5);

    proxy.heal();
    drained(&store).await;
    for id in &ids {
        let cached = store.get(*id).await.unwrap();
        let stored = row(&pool, *id).await;
        assert_eq!(
            (stored.calls_made, stored.status.as_str()),
            (1, cached.status.as_str())
        );
        assert_eq!(cached.calls_made, 1);
    }
    assert_eq!(row(&pool, ids[0]).await.status, "closed");
}

/// Every connection is cut while idle, and again in the middle of a call: the pool notices
/// dead connections and the store carries on without a restart, counting exactly.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_cut_connections_recover_without_restart(pool: PgPool) {
    let (proxy, proxied) = proxied_pool(&pool).await;
    let store = SessionStore::builder(PgStorage::new(proxied))
        .reconcile_interval(Duration::from_millis(20))
        .build();
    let id = common::new_session(&store, &["t"], 100).await;
    let (mut ok, mut counted) = (0, 0);
    for round in 0..20 {
        if round % 5 == 0 {
            proxy.cut();
        }
        match store.use_session(id, "t", None).await {
            Ok(_) => ok += 1,
            Err(SessionError::StorageWriteThrough { .. }) => counted += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    drained(&store).await;
    assert!(
        ok >= 16,
        "only the calls on a freshly cut connection may fail: {ok} ok"
    );
    assert_eq!(row(&pool, id).await.calls_made, ok + counted);
    assert!(proxy.accepted() > 1, "the pool reconnected");
}

/// A pending session is pinned: neither eviction (capacity 1, flooded) nor idle expiry
/// lets a later `get` or `use_session` see the older stored row.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_pending_survives_eviction_and_idle_expiry(pool: PgPool) {
    let storage = faulty(&pool);
    let store = common::manual_reconcile(storage.clone())
        .cache_capacity(1)
        .cache_idle(Duration::from_millis(20))
        .build();
    let id = common::new_session(&store, &["t"], 3).await;
    storage.fail_next_writes(1);
    store.use_session(id, "t", None).await.unwrap_err();
    for _ in 0..50 {
        let other = store
            .create(request(Uuid::new_v4(), &["t"], 3))
            .await
            .unwrap();
        store.get(other.session_id).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        store.get(id).await.unwrap().calls_made,
        1,
        "never the older row"
    );
    assert_eq!(
        store.use_session(id, "t", None).await.unwrap().calls_made,
        2
    );
    assert_eq!(row(&pool, id).await.calls_made, 2);
    assert_eq!(store.stats().pending, 0);
}

/// Conflict during reconciliation: while store A's changes are pending, store B changes
/// the row. A's merge is monotonic: its calls add to B's while the session is active; once
/// B has closed it, closed wins and A's pending call is dropped (it was denied to its
/// caller); the trail records each reconciliation.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_reconcile_conflict_merges_monotonically(pool: PgPool) {
    let storage = faulty(&pool);
    let a = common::manual_reconcile(storage.clone())
        .listen_for_changes(false)
        .build();
    let b = SessionStore::postgres(common::other_process_pool(&pool).await);
    let id = common::new_session(&a, &["t"], 10).await;
    a.use_session(id, "t", None).await.unwrap();

    storage.fail_writes();
    a.use_session_batch(id, &["t", "t"], None)
        .await
        .unwrap_err();
    assert_eq!(a.get(id).await.unwrap().calls_made, 3);
    b.use_session(id, "t", None).await.unwrap();
    storage.heal();
    assert_eq!(a.reconcile_now().await.still_pending, 0);
    assert_eq!(
        a.get(id).await.unwrap().calls_made,
        4,
        "ours added to theirs"
    );
    assert_eq!(row(&pool, id).await.calls_made, 4);

    storage.fail_writes();
    a.use_session(id, "t", None).await.unwrap_err();
    b.close(id).await.unwrap();
    storage.heal();
    assert_eq!(a.reconcile_now().await.still_pending, 0);
    let merged = a.get(id).await.unwrap();
    assert_eq!(
        (merged.calls_made, merged.status),
        (4, SessionStatus::Closed)
    );
    let stored = row(&pool, id).await;
    assert_eq!((stored.calls_made, stored.status.as_str()), (4, "closed"));
    assert_eq!(audited_calls(&pool, id).await, 4);
    assert_eq!(
        event_kinds(&pool, id).await,
        [
            "created",
            "call_allowed",
            "call_allowed",
            "batch_allowed",
            "reconciled",
            "closed",
            "reconciled"
        ]
    );
    assert_eq!(a.stats().reconciled, 2);
}

/// The ambiguous commit: the statement commits but the caller is told it failed. Neither
/// the reconciler nor the next call counts it twice, and it is not lost.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_ambiguous_commit_is_counted_exactly_once(pool: PgPool) {
    let storage = faulty(&pool);
    let store = common::manual_reconcile(storage.clone()).build();
    let id = common::new_session(&store, &["t"], 10).await;

    // Resolved by the reconciler.
    storage.commit_then_fail_next_writes(1);
    store.use_session(id, "t", None).await.unwrap_err();
    assert_eq!(row(&pool, id).await.calls_made, 1, "it did commit");
    assert_eq!(store.reconcile_now().await.still_pending, 0);
    assert_eq!(row(&pool, id).await.calls_made, 1);
    assert_eq!(store.get(id).await.unwrap().calls_made, 1);

    // Resolved by the next call.
    storage.commit_then_fail_next_writes(1);
    store
        .use_session_batch(id, &["t", "t"], None)
        .await
        .unwrap_err();
    assert_eq!(
        store.use_session(id, "t", None).await.unwrap().calls_made,
        4
    );
    assert_eq!(row(&pool, id).await.calls_made, 4);
    assert_eq!(audited_calls(&pool, id).await, 4);
    assert_eq!(store.stats().pending, 0);

    // Ambiguous twice in a row, then the reconciler.
    storage.commit_then_fail_next_writes(2);
    store.use_session(id, "t", None).await.unwrap_err();
    store.use_session(id, "t", None).await.unwrap_err();
    assert_eq!(store.reconcile_now().await.still_pending, 0);
    assert_eq!(row(&pool, id).await.calls_made, 6);
    assert_eq!(audited_calls(&pool, id).await, 6);
}

/// A process that dies with changes pending (dropped without shutdown): a new store sees
/// the durable state; what is lost are only the increments of calls that were denied.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_process_death_loses_only_denied_calls(pool: PgPool) {
    let storage = faulty(&pool);
    let id;
    let mut ok = 0;
    {
        let dying = common::manual_reconcile(storage.clone()).build();
        id = common::new_session(&dying, &["t"], 10).await;
        for _ in 0..3 {
            dying.use_session(id, "t", None).await.unwrap();
            ok += 1;
        }
        storage.fail_writes();
        for _ in 0..2 {
            assert!(matches!(
                dying.use_session(id, "t", None).await,
                Err(SessionError::StorageWriteThrough { .. })
            ));
        }
        assert_eq!(dying.get(id).await.unwrap().calls_made, 5);
    }
    storage.heal();
    let reborn = SessionStore::postgres(pool.clone());
    assert_eq!(reborn.get(id).await.unwrap().calls_made, ok);
    assert_eq!(row(&pool, id).await.calls_made, 3);
}

/// A write that hangs holds only its own session, and gives up at the deadline.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_hung_write_gives_up_at_the_deadline(pool: PgPool) {
    let storage = faulty(&pool);
    let store = common::manual_reconcile(storage.clone())
        .storage_timeout(Duration::from_millis(200))
        .build();
    let id = common::new_session(&store, &["t"], 10).await;
    storage.hang_writes();
    let failed = tokio::time::timeout(NO_HANG, store.use_session(id, "t", None))
        .await
        .unwrap();
    assert!(
        matches!(failed, Err(SessionError::StorageWriteThrough { detail, .. }) if detail.contains("within"))
    );
    storage.release_writes();
    // A pass's own write has the same 200 ms. In a full `cargo test` run the server can
    // stall longer than that for seconds (each test database dropped forces a checkpoint),
    // and the reconciler tries again: so does this, until a liveness bound of 30 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.reconcile_now().await.still_pending > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still pending after 30 s: {:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(row(&pool, id).await.calls_made, 1);
}

/// PostgreSQL kills every connection of the database, three times, while 8 tasks use 4
/// sessions. The store recovers without a restart, and each session's row counts exactly
/// the calls that got `Ok` plus those that got `StorageWriteThrough` (counted, then
/// reconciled, or committed unbeknownst to the caller, counted once either way).
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_server_side_connection_kills_mid_load(pool: PgPool) {
    let store = SessionStore::builder(PgStorage::new(common::other_process_pool(&pool).await))
        .reconcile_interval(Duration::from_millis(20))
        .build();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(common::new_session(&store, &["t"], 100_000).await);
    }
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (store, id) = (store.clone(), ids[worker % ids.len()]);
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut counted) = (0i64, 0i64);
            for _ in 0..150 {
                match store.use_session(id, "t", None).await {
                    Ok(_) => ok += 1,
                    Err(SessionError::StorageWriteThrough { .. }) => counted += 1,
                    Err(SessionError::StorageRead { .. }) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            (id, ok, counted)
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        sqlx::query!(
            r#"SELECT count(pg_terminate_backend(pid)) AS "killed!"
                 FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()"#
        )
        .fetch_one(&pool)
        .await
        .unwrap();
    }
    let mut expected: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for task in tasks {
        let (id, ok, counted) = task.await.unwrap();
        let entry = expected.entry(id).or_default();
        entry.0 += ok;
        entry.1 += counted;
    }
    drained(&store).await;
    for id in &ids {
        let (ok, counted) = expected[id];
        let stored = row(&pool, *id).await.calls_made;
        assert_eq!(
            stored,
            ok + counted,
            "session {id}: ok {ok}, write-through {counted}"
        );
        assert_eq!(audited_calls(&pool, *id).await, stored);
    }
    // And the store works on without a restart.
    assert!(store.use_session(ids[0], "t", None).await.is_ok());
}

/// Unknown ids are `NotFound`, and asking for the same unknown ids again and again costs
/// one storage lookup per id, not one per request.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_unknown_ids_are_negatively_cached(pool: PgPool) {
    let store = SessionStore::postgres(pool);
    let unknown: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for _ in 0..100 {
        for id in &unknown {
            assert!(
                matches!(store.use_session(*id, "t", None).await, Err(SessionError::NotFound(missing)) if missing == *id)
            );
        }
    }
    let stats = store.stats();
    assert_eq!((stats.cache_misses, stats.negative_hits), (10, 990));
}

/// A flushing shutdown returns what it could not flush, and flushes once storage is back.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_shutdown_reports_then_flushes(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let storage = faulty(&pool);
    let store = common::manual_reconcile(storage.clone())
        .clock(Arc::new(clock))
        .build();
    let id = common::new_session(&store, &["t"], 3).await;
    storage.fail_writes();
    store.use_session(id, "t", None).await.unwrap_err();
    store.close(id).await.unwrap_err();
    let report = tokio::time::timeout(NO_HANG, store.shutdown(Duration::from_millis(100)))
        .await
        .unwrap();
    assert_eq!(report.unflushed, [id]);
    storage.heal();
    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());
    let stored = row(&pool, id).await;
    assert_eq!((stored.calls_made, stored.status.as_str()), (1, "closed"));
}

/// The network silently stops carrying the listening connection (half-open: no error, no
/// close). The feed's idle round trip finds it: `listening` turns false, and once the
/// network heals the feed reconnects and resets the cache.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn failure_half_open_listener_is_detected_and_replaced(pool: PgPool) {
    let (proxy, proxied) = proxied_pool(&pool).await;
    let store =
        SessionStore::new(PgStorage::new(proxied).listener_check(Duration::from_millis(200)));
    common::new_session(&store, &["t"], 5).await;
    common::wait_listening(&store).await;

    proxy.stall();
    let deadline = tokio::time::Instant::now() + NO_HANG;
    while store.stats().listening {
        assert!(
            tokio::time::Instant::now() < deadline,
            "half-open listener never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.heal();
    common::wait_listening(&store).await;
    assert!(store.stats().listener_reconnects >= 1);
}

/// `PgStorage::connect` has PostgreSQL itself end what a vanished client would hold: a
/// statement stuck on a lock, a transaction left open (row and advisory locks), and an
/// idle connection whose client is gone.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn connect_sets_server_side_timeouts(pool: PgPool) {
    let storage = PgStorage::connect(&common::database_url(&pool).await)
        .await
        .expect("connect");
    let settings = sqlx::query!(
        r#"SELECT current_setting('statement_timeout') AS "statement!",
                  current_setting('idle_in_transaction_session_timeout') AS "idle_in_transaction!",
                  current_setting('tcp_keepalives_idle') AS "keepalive_idle!",
                  current_setting('tcp_keepalives_interval') AS "keepalive_interval!",
                  current_setting('tcp_keepalives_count') AS "keepalive_count!""#
    )
    .fetch_one(storage.pool())
    .await
    .expect("settings readable");
    assert_eq!(
        (
            settings.statement.as_str(),
            settings.idle_in_transaction.as_str(),
            settings.keepalive_idle.as_str(),
            settings.keepalive_interval.as_str(),
            settings.keepalive_count.as_str(),
        ),
        ("5s", "10s", "10", "5", "3")
    );
}

/// Defect found by the HTTP bench: a connection that has run the write statements a few
/// times while the tables were small kept PostgreSQL's generic plan of them (chosen after
/// five executions, without the batch's size or the table's growth), and a long-running
/// gateway's writes became several times slower as its tables grew (`scripts/bench`: 64
/// tasks on the pool used since start-up, 1,400 calls/s, on a new pool 8,100). Every write
/// is planned for its own parameters instead.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn connect_plans_each_write_for_its_own_parameters(pool: PgPool) {
    use arbiter_session::Storage as _;
    use arbiter_session::audit::{AuditEvent, EventKind};
    use arbiter_session::storage::{BatchUpdate, UpdateOutcome, Versioned};

    // One connection, so the statements' plans seen below are those every write used.
    let storage = PgStorage::connect_with(
        &common::database_url(&pool).await,
        PgStorage::pool_options().max_connections(1),
    )
    .await
    .expect("connect");
    let store = SessionStore::builder(storage.clone())
        .listen_for_changes(false)
        .build();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let id = common::new_session(&store, &["t"], 1_000).await;
        sessions.push(storage.load(id).await.expect("load").expect("stored"));
    }
    // `v` after one more call, with its event.
    let one_more = |v: &Versioned| {
        let mut next = v.session.clone();
        next.calls_made += 1;
        let event = AuditEvent::new(
            EventKind::CallAllowed,
            vec!["t".into()],
            &next,
            chrono::Utc::now(),
            Uuid::nil(),
        );
        (next, vec![event])
    };
    let applied = |outcome: UpdateOutcome| match outcome {
        UpdateOutcome::Applied(version) => version,
        UpdateOutcome::Conflict => panic!("a write of the only writer conflicted"),
    };
    for _ in 0..10 {
        // The group commit's statement, then the statement of a write alone.
        let next: Vec<_> = sessions.iter().map(one_more).collect();
        let batch: Vec<BatchUpdate<'_>> = sessions
            .iter()
            .zip(&next)
            .map(|(stored, (session, events))| BatchUpdate {
                session,
                expected: stored.version,
                events,
            })
            .collect();
        let outcomes = storage.update_many(&batch).await.expect("batch");
        for ((stored, (session, _)), outcome) in sessions.iter_mut().zip(next).zip(outcomes) {
            *stored = Versioned {
                session,
                version: applied(outcome),
            };
        }
        let (session, events) = one_more(&sessions[0]);
        let outcome = storage
            .update(&session, sessions[0].version, &events)
            .await
            .expect("update");
        sessions[0] = Versioned {
            session,
            version: applied(outcome),
        };
    }
    let plans = sqlx::query!(
        r#"SELECT statement AS "statement!", generic_plans AS "generic!", custom_plans AS "custom!"
             FROM pg_prepared_statements
            WHERE statement LIKE '%UPDATE arbiter.sessions%'
              AND statement NOT LIKE '%pg_prepared_statements%'"#
    )
    .fetch_all(storage.pool())
    .await
    .expect("plans readable");
    assert_eq!(
        plans.len(),
        2,
        "the batch and the single write were prepared"
    );
    for plan in plans {
        assert_eq!(
            (plan.generic, plan.custom),
            (0, 10),
            "every execution planned for its own parameters: {}",
            plan.statement
        );
    }
}
