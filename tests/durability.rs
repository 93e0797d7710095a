//! What PostgreSQL holds and defends: restart survival, several stores on one database,
//! an operator's SQL, and the schema's own guards.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arbiter_session::testing::ManualClock;
use arbiter_session::{PgStorage, SessionError, SessionStatus, SessionStore};
use chrono::Duration;
use common::{event_kinds, other_process_pool, request, row, store};
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn restart_keeps_counters_status_window_and_binding(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let agent = Uuid::new_v4();
    let (id, closed_id, before) = {
        let first = store(&pool, &clock);
        let mut req = request(agent, &["a", "b"], 10);
        req.rate_limit_per_minute = Some(3);
        let s = first.create(req).await.unwrap();
        first
            .use_session(s.session_id, "a", Some(agent))
            .await
            .unwrap();
        clock.advance(Duration::milliseconds(1500));
        let before = first
            .use_session_batch(s.session_id, &["a", "b"], Some(agent))
            .await
            .unwrap();
        let closed = first.create(request(agent, &["a"], 10)).await.unwrap();
        first.close(closed.session_id).await.unwrap();
        (s.session_id, closed.session_id, before)
        // `first` is dropped here: a restart without shutdown.
    };
    let second = store(&pool, &clock);
    let after = second.get(id).await.unwrap();
    assert_eq!(
        after, before,
        "the reloaded session equals what the first store returned"
    );
    assert_eq!((after.calls_made, after.rate_window_calls), (3, 3));
    assert!(matches!(
        second.use_session(id, "a", Some(agent)).await,
        Err(SessionError::RateLimited { .. })
    ));
    assert!(matches!(
        second.use_session(id, "a", Some(Uuid::new_v4())).await,
        Err(SessionError::AgentMismatch { .. })
    ));
    assert!(matches!(
        second.use_session(closed_id, "a", None).await,
        Err(SessionError::AlreadyClosed(_))
    ));
    clock.advance(Duration::minutes(1));
    assert_eq!(
        second
            .use_session(id, "b", Some(agent))
            .await
            .unwrap()
            .calls_made,
        4
    );
}

/// Two stores (two gateway processes: separate caches, separate pools) hammer one session.
/// The race: both decide from their cached `calls_made`; only versioned writes keep the
/// sum exact.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn two_stores_64_tasks_one_session_budget_is_exact(pool: PgPool) {
    let a = SessionStore::postgres(other_process_pool(&pool).await);
    let b = SessionStore::postgres(other_process_pool(&pool).await);
    let id = common::new_session(&a, &["t"], 100).await;
    b.get(id).await.unwrap();
    let oks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone()] {
        for _ in 0..32 {
            let (store, oks) = (store.clone(), Arc::clone(&oks));
            tasks.push(tokio::spawn(async move {
                loop {
                    match store.use_session(id, "t", None).await {
                        Ok(_) => {
                            oks.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(SessionError::BudgetExceeded { .. }) => return,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(oks.load(Ordering::SeqCst), 100);
    assert_eq!(row(&pool, id).await.calls_made, 100);
    let allowed = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.session_events WHERE session_id = $1 AND kind = 'call_allowed'"#,
        id
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(allowed, 100);
    assert_eq!(a.stats().pending + b.stats().pending, 0);
}

/// Two stores, 32 tasks each, on one session whose `write_file` may be called 3 times in a
/// budget of 100: each task calls `write_file` until its limit denies it, then `search`
/// until the budget does. Exactly 3 `write_file` calls are granted between them, and the
/// row and the audit trail count exactly what was granted.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn two_stores_64_tasks_grant_a_limited_tool_exactly_its_limit(pool: PgPool) {
    let a = SessionStore::postgres(other_process_pool(&pool).await);
    let b = SessionStore::postgres(other_process_pool(&pool).await);
    let req =
        request(Uuid::new_v4(), &["search", "write_file"], 100).with_tool_limit("write_file", 3);
    let id = a.create(req).await.unwrap().session_id;
    b.get(id).await.unwrap();
    let (writes, searches) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for store in [a.clone(), b.clone()] {
        for _ in 0..32 {
            let store = store.clone();
            let (writes, searches) = (Arc::clone(&writes), Arc::clone(&searches));
            tasks.push(tokio::spawn(async move {
                let mut tool = "write_file";
                loop {
                    match store.use_session(id, tool, None).await {
                        Ok(_) if tool == "write_file" => {
                            writes.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {
                            searches.fetch_add(1, Ordering::SeqCst);
                        }
                        // The tool's limit (3, below the budget): go on with `search`.
                        Err(SessionError::BudgetExceeded {
                            limit: 3, used: 3, ..
                        }) => {
                            tool = "search";
                        }
                        Err(SessionError::BudgetExceeded { limit: 100, .. }) => return,
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(writes.load(Ordering::SeqCst), 3);
    assert_eq!(searches.load(Ordering::SeqCst), 97);
    let stored = a.get(id).await.unwrap();
    assert_eq!(stored.tool_limit("write_file").map(|l| l.calls), Some(3));
    let row = sqlx::query!(
        r#"SELECT s.calls_made, s.tool_calls,
                  (SELECT count(*) FROM arbiter.session_events e
                    WHERE e.session_id = s.session_id AND e.kind = 'call_allowed'
                      AND e.tools = '{write_file}') AS "audited!"
             FROM arbiter.sessions s WHERE s.session_id = $1"#,
        id
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (row.calls_made, row.tool_calls, row.audited),
        (100, vec![3], 3)
    );
    assert_eq!(a.stats().pending + b.stats().pending, 0);
    // The trail counts them in order, whichever process made each call, and the chain
    // (which hashes the counts) verifies.
    let counted = sqlx::query_scalar!(
        r#"SELECT tool_calls[1] AS "calls!" FROM arbiter.session_events
            WHERE session_id = $1 AND limited_tools = '{write_file}' ORDER BY event_id"#,
        id
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(counted, [1, 2, 3]);
    let chain = arbiter_session::operator::chain::verify_audit_chain(&pool, id)
        .await
        .unwrap();
    assert!(chain.is_intact(), "{chain:?}");
}

/// 20 concurrent capped creates for one agent across two stores: the cap is decided inside
/// PostgreSQL, so exactly `max` succeed.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn two_stores_20_capped_creates_admit_exactly_3(pool: PgPool) {
    let a = SessionStore::postgres(other_process_pool(&pool).await);
    let b = SessionStore::postgres(other_process_pool(&pool).await);
    let agent = Uuid::new_v4();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            store
                .create_if_under_cap(request(agent, &["t"], 5), 3)
                .await
        }));
    }
    let (mut created, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(SessionError::TooManySessions {
                max: 3, current: 3, ..
            }) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((created, refused), (3, 17));
    assert_eq!(a.count_live_for_agent(agent).await.unwrap(), 3);
}

/// An operator's plain-SQL close advances the version, so the cached store's next write
/// conflicts, reloads under a row lock, and denies.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn operator_sql_close_is_honoured_by_a_cached_store(pool: PgPool) {
    // Without the change feed, so the versioned write alone must catch the change (the
    // feed is covered by tests/invalidation.rs).
    let store = SessionStore::builder(arbiter_session::PgStorage::new(pool.clone()))
        .listen_for_changes(false)
        .build();
    let s = store
        .create(request(Uuid::new_v4(), &["a"], 5))
        .await
        .unwrap();
    store.use_session(s.session_id, "a", None).await.unwrap();
    let before = row(&pool, s.session_id).await;
    sqlx::query!(
        "UPDATE arbiter.sessions SET status = 'closed' WHERE session_id = $1",
        s.session_id
    )
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        row(&pool, s.session_id).await.version,
        before.version + 1,
        "plain SQL advances the version"
    );
    assert!(matches!(
        store.use_session(s.session_id, "a", None).await,
        Err(SessionError::AlreadyClosed(_))
    ));
    assert_eq!(
        store.get(s.session_id).await.unwrap().status,
        SessionStatus::Closed
    );
    assert_eq!(row(&pool, s.session_id).await.calls_made, 1);
    assert_eq!(store.stats().conflicts, 1);
}

/// The schema refuses what the library never does, whoever tries it.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn schema_guards_budget_status_and_audit_trail(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let s = store
        .create(request(Uuid::new_v4(), &["a"], 2))
        .await
        .unwrap();
    let id = s.session_id;
    let constraint = |err: sqlx::Error| match err {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    };

    let over = sqlx::query!(
        "UPDATE arbiter.sessions SET calls_made = 3 WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(over).as_deref(),
        Some("sessions_calls_within_budget")
    );

    store.close(id).await.unwrap();
    let reopen = sqlx::query!(
        "UPDATE arbiter.sessions SET status = 'active' WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(reopen).as_deref(),
        Some("sessions_status_monotonic")
    );

    let edit = sqlx::query!(
        "UPDATE arbiter.session_events SET kind = 'closed' WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(edit).as_deref(),
        Some("session_events_append_only")
    );
    let delete = sqlx::query!(
        "DELETE FROM arbiter.session_events WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert_eq!(
        constraint(delete).as_deref(),
        Some("session_events_append_only")
    );
    let truncate = sqlx::query!("TRUNCATE arbiter.session_events")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        constraint(truncate).as_deref(),
        Some("session_events_append_only")
    );
}

/// A group commit that carries the same session twice (the store never sends one, but
/// `update_many`'s contract allows it) applies one write and reports the other as a
/// conflict: never one version, or one budget, for two writers.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn group_commit_with_one_session_twice_applies_one(pool: PgPool) {
    use arbiter_session::Storage;
    use arbiter_session::audit::{AuditEvent, EventKind};
    use arbiter_session::storage::{BatchUpdate, UpdateOutcome};
    let storage = PgStorage::new(pool.clone());
    let store = SessionStore::new(storage.clone());
    let one = store
        .create(request(Uuid::new_v4(), &["t"], 10))
        .await
        .unwrap();
    let other = store
        .create(request(Uuid::new_v4(), &["t"], 10))
        .await
        .unwrap();
    let stored = storage.load(one.session_id).await.unwrap().unwrap();
    let mut plus_one = stored.session.clone();
    plus_one.calls_made = 1;
    let mut plus_five = stored.session.clone();
    plus_five.calls_made = 5;
    let mut other_next = other.clone();
    other_next.calls_made = 1;
    let event = |after| {
        vec![AuditEvent::new(
            EventKind::CallAllowed,
            vec!["t".into()],
            after,
            chrono::Utc::now(),
            Uuid::new_v4(),
        )]
    };
    let (e1, e5, eo) = (event(&plus_one), event(&plus_five), event(&other_next));
    let batch = [
        BatchUpdate {
            session: &plus_one,
            expected: stored.version,
            events: &e1,
        },
        BatchUpdate {
            session: &other_next,
            expected: stored.version,
            events: &eo,
        },
        BatchUpdate {
            session: &plus_five,
            expected: stored.version,
            events: &e5,
        },
    ];
    let outcomes = storage.update_many(&batch).await.unwrap();
    assert_eq!(
        outcomes,
        vec![
            UpdateOutcome::Applied(stored.version + 1),
            UpdateOutcome::Applied(stored.version + 1),
            UpdateOutcome::Conflict
        ]
    );
    assert_eq!(row(&pool, one.session_id).await.calls_made, 1);
    assert_eq!(
        event_kinds(&pool, one.session_id).await,
        ["created", "call_allowed"]
    );
    assert!(
        arbiter_session::operator::chain::verify_all_audit_chains(&pool)
            .await
            .unwrap()
            .is_intact()
    );
}

/// Rows locked by another transaction (another process mid-write, an operator's open
/// transaction) hold up writes of their sessions only: the group commit skips locked rows,
/// so the other sessions' writes are never stuck behind them. Three locked sessions: more
/// than the group commit's lanes, so a statement that waited for a lock would block them.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn rows_locked_elsewhere_hold_up_only_their_sessions(pool: PgPool) {
    // Each waiting session holds a connection while it waits for its row (under
    // update_locked): the pool needs room for them, the listener and the free writes.
    let pool8 = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let store = SessionStore::postgres(pool8);
    let free = store
        .create(request(Uuid::new_v4(), &["t"], 5))
        .await
        .unwrap();
    let mut locked = Vec::new();
    for _ in 0..3 {
        locked.push(common::new_session(&store, &["t"], 5).await);
    }
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut holder = pool.begin().await.unwrap();
    sqlx::query!(
        "SELECT version FROM arbiter.sessions WHERE session_id = ANY($1) FOR UPDATE",
        &locked[..]
    )
    .fetch_all(&mut *holder)
    .await
    .unwrap();
    let waiting: Vec<_> = locked
        .iter()
        .map(|&id| {
            let store = store.clone();
            tokio::spawn(async move { store.use_session(id, "t", None).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Liveness, not speed: while the locks are held, other sessions keep writing.
    tokio::time::timeout(std::time::Duration::from_secs(3), async {
        for _ in 0..3 {
            store.use_session(free.session_id, "t", None).await.unwrap();
        }
    })
    .await
    .expect("writes of other sessions never wait for a row locked elsewhere");
    assert!(waiting.iter().all(|w| !w.is_finished()));
    holder.commit().await.unwrap();
    for w in waiting {
        assert_eq!(w.await.unwrap().unwrap().calls_made, 1);
    }
    assert_eq!(row(&pool, free.session_id).await.calls_made, 3);
}
