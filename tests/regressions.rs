//! Seven defects reviews of the store found, each reproduced with the public API and kept
//! as a regression test: a rate window overspent through a reconcile merge, a pending
//! change lost when a second cache slot met the first, a denial log jammed by an
//! ambiguous commit, a reconciler stopped by one locked row, a caller kept waiting past
//! `storage_timeout` under load, an upkeep run outliving `shutdown` and the store, and a
//! connection left inside a transaction by a call cancelled during `BEGIN`.
//! Each test fails with its fix reverted (checked for each, for each of the three waits
//! the one deadline of defect 5 covers, and for both ends of defect 6).

mod common;

use std::sync::Arc;
use std::time::Duration;

use arbiter_session::testing::{FaultyStorage, ManualClock};
use arbiter_session::{MemoryStorage, PgStorage, SessionError, SessionStatus, SessionStore};
use common::{faulty, manual_reconcile, new_session, request, row, until, wait_listening};
use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

fn is_write_through(result: &Result<arbiter_session::TaskSession, SessionError>) -> bool {
    matches!(result, Err(SessionError::StorageWriteThrough { .. }))
}

/// Defect 1. Store B fills the rate window (5 per 60 s); store A, whose cache is older,
/// fails one write 2 s later and then keeps calling. The merge of A's unwritten call must
/// count it in B's window, which is still running, so A gets no `Ok` inside that window.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_reconcile_merge_never_overspends_a_running_rate_window(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let storage = faulty(&pool);
    let a = manual_reconcile(storage.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let b = common::store(&pool, &clock);
    let mut req = request(Uuid::new_v4(), &["t"], 100);
    req.rate_limit_per_minute = Some(5);
    let id = b.create(req).await.expect("create").session_id;
    a.get(id).await.expect("A caches the session");
    for _ in 0..5 {
        b.use_session(id, "t", None)
            .await
            .expect("B's window has room");
    }

    clock.advance(chrono::Duration::seconds(2));
    storage.fail_next_writes(1);
    assert!(is_write_through(&a.use_session(id, "t", None).await));
    for _ in 0..5 {
        let result = a.use_session(id, "t", None).await;
        assert!(
            matches!(result, Err(SessionError::RateLimited { .. })),
            "B's window is full for another 58 s: {result:?}"
        );
    }
    let report = a.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    let stored = row(&pool, id).await;
    assert_eq!(
        (stored.calls_made, stored.rate_window_calls),
        (5, 5),
        "the unwritten call did not fit the window and was dropped"
    );

    // Once B's window is over, A's calls open a new one.
    clock.advance(chrono::Duration::seconds(58));
    a.use_session(id, "t", None).await.expect("a new window");
    assert_eq!(row(&pool, id).await.rate_window_calls, 1);
}

/// Defect 2. A `use_session` write is in flight when the change feed resets (the whole
/// cache is dropped); a `close` of the same session follows, and both writes fail. Both
/// changes stay pending, whatever order they fail in, and reach storage after healing.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_listener_reset_mid_write_loses_no_pending_change(pool: PgPool) {
    let storage = faulty(&pool);
    let store = manual_reconcile(storage.clone())
        .storage_timeout(Duration::from_secs(60))
        .build();
    let id = new_session(&store, &["t"], 10).await;
    wait_listening(&store).await;
    store.get(id).await.expect("cached");

    storage.hang_writes();
    let call = tokio::spawn({
        let store = store.clone();
        async move { store.use_session(id, "t", None).await }
    });
    until("the call's write hangs", || storage.hung_writes() == 1).await;
    let resets = store.stats().listener_reconnects;
    storage.reset_change_feed();
    until("the cache was dropped", || {
        store.stats().listener_reconnects > resets
    })
    .await;
    let close = tokio::spawn({
        let store = store.clone();
        async move { store.close(id).await }
    });
    // Let the close reach its write, or the session's queue behind the call.
    tokio::time::sleep(Duration::from_millis(100)).await;
    storage.fail_writes();
    storage.release_writes();
    assert!(is_write_through(&call.await.expect("call task")));
    assert!(is_write_through(&close.await.expect("close task")));

    let cached = store.get(id).await.expect("get");
    assert_eq!(
        (cached.calls_made, cached.status),
        (1, SessionStatus::Closed),
        "the cache holds both changes"
    );
    storage.heal();
    let report = store.shutdown(Duration::from_secs(10)).await;
    assert!(report.is_clean(), "{report:?}");
    let stored = row(&pool, id).await;
    assert_eq!((stored.calls_made, stored.status.as_str()), (1, "closed"));
}

/// Defect 3. The first denial batch commits but its answer is lost. Retrying it must not
/// fail on its own event keys forever: every denial is recorded exactly once.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_ambiguous_denial_batch_is_recorded_once_and_does_not_jam(pool: PgPool) {
    let storage = faulty(&pool);
    let store = manual_reconcile(storage.clone()).build();
    let id = new_session(&store, &["t"], 10).await;
    storage.commit_then_fail_next_writes(1);
    let denied = store.use_session(id, "rm", None).await;
    assert!(matches!(
        denied,
        Err(SessionError::ToolNotAuthorized { .. })
    ));
    until("the denial batch was written", || storage.injected() == 1).await;
    for _ in 0..5 {
        store.use_session(id, "rm", None).await.expect_err("denied");
    }
    let report = store.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(denials_of(&pool, id).await, 6);
}

/// Defect 3, second half. A batch storage refuses (not an outage) is not retried forever
/// and does not hold up the denials after it: refused denials are counted and dropped.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_refused_denial_batch_is_counted_and_does_not_block_later_ones(pool: PgPool) {
    let storage = faulty(&pool);
    let store = manual_reconcile(storage.clone()).build();
    let id = new_session(&store, &["t"], 10).await;
    storage.refuse_writes();
    for _ in 0..3 {
        store.use_session(id, "rm", None).await.expect_err("denied");
    }
    let report = store.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.unrecorded_denials, 0, "{report:?}");
    assert_eq!(store.stats().denials_refused, 3);

    storage.heal();
    store.use_session(id, "rm", None).await.expect_err("denied");
    let report = store.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(denials_of(&pool, id).await, 1);
    assert_eq!(store.stats().denials_recorded, 1);
}

async fn denials_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.session_events WHERE session_id = $1 AND kind = 'denied'"#,
        id
    )
    .fetch_one(pool)
    .await
    .expect("events readable")
}

/// Defect 4. Twenty sessions are pending; another transaction holds one of their rows.
/// A pass skips that row and makes the other nineteen durable; the locked one follows once
/// its lock is released.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn one_locked_row_does_not_stop_the_reconciler(pool: PgPool) {
    let storage = faulty(&pool);
    let store = manual_reconcile(storage.clone())
        .storage_timeout(Duration::from_millis(300))
        .build();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(new_session(&store, &["t"], 10).await);
    }
    // Three rows in turn are the locked one: at most one of them can come last in a pass,
    // so no pass order can hide the defect.
    for (n, locked) in ids.iter().take(3).enumerate() {
        storage.fail_writes();
        for id in &ids {
            assert!(is_write_through(&store.use_session(*id, "t", None).await));
        }
        storage.heal();
        assert_eq!(store.stats().pending, 20);
        #[expect(
            clippy::disallowed_methods,
            reason = "a test's transaction, never cancelled"
        )]
        let mut holder = pool.begin().await.expect("begin");
        sqlx::query!(
            "SELECT session_id FROM arbiter.sessions WHERE session_id = $1 FOR UPDATE",
            locked
        )
        .fetch_one(&mut *holder)
        .await
        .expect("lock one row");
        let report = store.reconcile_now().await;
        assert_eq!(
            (report.reconciled, report.still_pending),
            (19, 1),
            "row {n} locked"
        );
        holder.rollback().await.expect("release the row");
        let report = store.reconcile_now().await;
        assert_eq!((report.reconciled, report.still_pending), (1, 0));
    }
    for id in &ids {
        assert_eq!(row(&pool, *id).await.calls_made, 3);
    }
}

/// Defect 5. With storage hung and `storage_timeout` 250 ms, 1024 concurrent calls on
/// distinct sessions, then 64 on one session, are all answered `StorageWriteThrough` within
/// the timeout: waiting for a group-commit lane, or behind another write of the session,
/// counts against the caller's own deadline. Tokio's paused clock makes the times exact.
#[tokio::test(start_paused = true)]
async fn every_call_is_answered_within_storage_timeout_under_load() {
    const TIMEOUT: Duration = Duration::from_millis(250);
    // What the bound allows beyond the timeout; with a paused clock nothing but the timers
    // moves time, so any slack only has to absorb their 1 ms granularity.
    const SLACK: Duration = Duration::from_millis(5);
    let memory = MemoryStorage::new().with_batching(true);
    let storage = FaultyStorage::new(memory.clone());
    let store = SessionStore::builder(storage.clone())
        .storage_timeout(TIMEOUT)
        .reconcile_interval(Duration::from_secs(3600))
        .build();
    let mut ids = Vec::new();
    for _ in 0..1024 {
        ids.push(new_session(&store, &["t"], 100).await);
    }

    storage.hang_writes();
    let slowest = answered_within(&store, &ids).await;
    assert!(slowest <= TIMEOUT + SLACK, "1024 sessions: {slowest:?}");
    let one = vec![ids[0]; 64];
    let slowest = answered_within(&store, &one).await;
    assert!(slowest <= TIMEOUT + SLACK, "one session: {slowest:?}");

    // A slow conflicting write (200 ms), then a locked write that hangs: one deadline
    // covers both, so the call ends at 250 ms, not 200 + 250.
    storage.heal();
    assert!(store.shutdown(Duration::from_secs(60)).await.is_clean());
    let other = SessionStore::new(memory);
    other
        .use_session(ids[1], "t", None)
        .await
        .expect("another writer");
    storage.delay_writes(Duration::from_millis(200));
    storage.hang_writes_after(1);
    let start = Instant::now();
    let result = store.use_session(ids[1], "t", None).await;
    // The locked read never answered: nothing was decided or changed.
    assert!(
        matches!(result, Err(SessionError::StorageRead { .. })),
        "{result:?}"
    );
    assert!(start.elapsed() <= TIMEOUT + SLACK, "{:?}", start.elapsed());
}

/// Defect 5, the queue: a call waiting behind the reconciler, which holds the session's
/// lock for a slow conflicting write and then a locked write that hangs (450 ms in all),
/// still gives up at its own deadline: 250 ms after it started, not when the lock frees.
#[tokio::test(start_paused = true)]
async fn a_call_queued_behind_the_reconciler_is_answered_within_storage_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(250);
    const SLACK: Duration = Duration::from_millis(5);
    let memory = MemoryStorage::new().with_batching(true);
    let storage = FaultyStorage::new(memory.clone());
    let store = SessionStore::builder(storage.clone())
        .storage_timeout(TIMEOUT)
        .reconcile_interval(Duration::from_secs(3600))
        .build();
    let id = new_session(&store, &["t"], 100).await;
    storage.fail_next_writes(1);
    assert!(is_write_through(&store.use_session(id, "t", None).await));
    let other = SessionStore::new(memory);
    other
        .use_session(id, "t", None)
        .await
        .expect("another writer");

    storage.delay_writes(Duration::from_millis(200));
    storage.hang_writes_after(1);
    let reconcile = tokio::spawn({
        let store = store.clone();
        async move { store.reconcile_now().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    assert!(is_write_through(&store.use_session(id, "t", None).await));
    assert!(start.elapsed() <= TIMEOUT + SLACK, "{:?}", start.elapsed());
    let report = reconcile.await.expect("reconcile task");
    assert_eq!(report.still_pending, 1, "the hung locked write timed out");
}

/// Calls `use_session` once per entry of `ids`, all at once; asserts every answer is
/// `StorageWriteThrough` and returns the longest time one took.
async fn answered_within(
    store: &SessionStore<FaultyStorage<MemoryStorage>>,
    ids: &[Uuid],
) -> Duration {
    let calls: Vec<_> = ids
        .iter()
        .map(|&id| {
            let store = store.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let result = store.use_session(id, "t", None).await;
                (start.elapsed(), result)
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (took, result) = call.await.expect("call task");
        assert!(is_write_through(&result), "{result:?}");
        slowest = std::cmp::max(slowest, took);
    }
    slowest
}

/// Defect 6. An upkeep run (a rollup of a big trail takes minutes) went on after
/// `shutdown` returned, writing through the pool for up to its 60 s timeout, and held the
/// store's state, so dropping the store did not end it either. Now `shutdown` cancels a
/// run in progress and starts none after it, and dropping the store cancels its run.
#[tokio::test(start_paused = true)]
async fn shutdown_and_drop_cancel_an_upkeep_run_in_progress() {
    const EVERY: Duration = Duration::from_secs(60);
    let memory = MemoryStorage::new();
    let storage = FaultyStorage::new(memory.clone());
    storage.hang_maintenance();
    let store = SessionStore::builder(storage.clone())
        .maintenance_interval(Some(EVERY))
        .build();
    let id = new_session(&store, &["t"], 5).await;
    until("the first use starts an upkeep run", || {
        storage.hung_maintenance() == 1
    })
    .await;

    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());
    assert_eq!(storage.hung_maintenance(), 0, "shutdown cancelled the run");
    // An hour of paused time: a run after shutdown would hang again, and count.
    tokio::time::sleep(EVERY * 60).await;
    store
        .use_session(id, "t", None)
        .await
        .expect("the store stays usable");
    tokio::time::sleep(EVERY * 2).await;
    assert_eq!(storage.hung_maintenance(), 0, "no upkeep after shutdown");
    assert_eq!(store.stats().maintenance_runs, 0);

    let other = SessionStore::builder(storage.clone())
        .maintenance_interval(Some(EVERY))
        .build();
    other.get(id).await.expect("the first use of another store");
    until("its upkeep run hangs", || storage.hung_maintenance() == 1).await;
    drop(other);
    until("dropping the store cancelled its run", || {
        storage.hung_maintenance() == 0
    })
    .await;
}

/// Defect 7. A storage call cancelled while PostgreSQL's answer to `BEGIN` was in flight (a
/// gateway's client gone, a caller's timeout, `shutdown` cancelling an upkeep run) left its
/// connection inside a transaction: sqlx 0.9.0 counts a transaction only once `BEGIN` is
/// answered, so it queued no `ROLLBACK` and returned the connection to the pool (upstream
/// transact-rs/sqlx#4393). The next write on that connection ran inside the stale
/// transaction: acknowledged, invisible to every other process, and lost when the
/// connection closed. (Found as a flaky retention test: a shutdown's cancelled rollup
/// swallowed a denial, and the purge that followed dropped a trail with an event recorded
/// after its cutoff.)
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_call_cancelled_during_begin_leaves_no_transaction_open(pool: PgPool) {
    // One connection, handed out without a test query: the cancelled call's connection is
    // the one the next write gets, and the first bytes it sends are the `BEGIN`.
    let (proxy, one) = common::proxied_pool_with(
        &pool,
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false),
    )
    .await;
    let storage = PgStorage::new(one.clone());
    let store = SessionStore::builder(storage.clone())
        .maintenance_interval(None)
        .listen_for_changes(false)
        .build();
    let first = store
        .create(request(Uuid::new_v4(), &["t"], 5))
        .await
        .expect("create");

    // The network holds the `BEGIN` until the call has been given up.
    let mut second = first.clone();
    second.session_id = Uuid::new_v4();
    let created = arbiter_session::audit::AuditEvent::new(
        arbiter_session::audit::EventKind::Created,
        Vec::new(),
        &second,
        second.created_at,
        Uuid::nil(),
    );
    until("the connection is back in the pool", || one.num_idle() == 1).await;
    proxy.stall();
    let cancelled = tokio::time::timeout(
        Duration::from_millis(300),
        arbiter_session::Storage::insert_if_under_cap(
            &storage,
            &second,
            &created,
            10,
            second.created_at,
        ),
    )
    .await;
    assert!(cancelled.is_err(), "the call was cancelled in flight");
    proxy.heal();

    store
        .use_session(first.session_id, "t", None)
        .await
        .expect("a call after it");
    assert_eq!(
        row(&pool, first.session_id).await.calls_made,
        1,
        "the call's write is committed: another process sees it"
    );
    drop(store);
    one.close().await;
}
