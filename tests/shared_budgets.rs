//! Sessions drawing on shared budgets, through the store over a real PostgreSQL: several
//! stores (each with its own pool, as gateway processes have) spend one budget tree to
//! exactly its root's limit, never a unit past any level's, and the trail explains every
//! unit; what a call costs (explicit, `tool_costs`, 1); a shared budget is checked last,
//! consumes nothing when it denies, and its denial names the budget; a store that can no
//! longer reach the database gives its units back within its lease.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arbiter_session::testing::FaultyStorage;
use arbiter_session::{PgStorage, SessionError, SessionStore};
use common::{assert_the_trail_explains_every_unit, budget_id as id, put_budget as put};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// A store with its own pool of `connections`, as another gateway process has.
async fn process(pool: &PgPool, connections: u32, lease: Duration) -> SessionStore {
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect(&common::database_url(pool).await)
        .await
        .expect("a pool");
    SessionStore::builder(PgStorage::new(pool))
        .share_lease(lease)
        .build()
}

/// A session of a new agent allowed `tools`, with `calls` calls, drawing on `budget`.
async fn session_on(
    store: &SessionStore,
    budget: &str,
    tools: &[&str],
    calls: u64,
    costs: &[(&str, u64)],
) -> (Uuid, Uuid) {
    let agent = Uuid::new_v4();
    let mut request = common::request(agent, tools, calls).with_budget(id(budget));
    for (tool, cost) in costs {
        request = request.with_tool_cost(*tool, *cost);
    }
    let session = store.create(request).await.expect("create");
    (session.session_id, agent)
}

/// The units `budget` used in its current period, as storage reports it.
async fn used(store: &SessionStore, budget: &str) -> u64 {
    store
        .budget(&id(budget))
        .await
        .expect("read")
        .expect("the budget exists")
        .used
}

/// Three stores, 48 tasks, a tree whose root allows 240 units and whose branch `team`
/// allows 150: calls go on until every task has been denied for a second and a half (so
/// that idle units came back and were spent). Exactly 240 calls are allowed, `team`'s
/// sessions got at most 150, and the trail explains every unit.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn three_stores_spend_a_tree_exactly(pool: PgPool) {
    let admin = SessionStore::postgres(pool.clone());
    put(&admin, "root", 240, None).await;
    put(&admin, "root/team", 150, Some("root")).await;
    put(&admin, "root/team/a", 1_000, Some("root/team")).await;
    put(&admin, "root/b", 1_000, Some("root")).await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(process(&pool, 8, Duration::from_secs(10)).await);
    }
    let allowed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..48 {
        let store = stores[n % 3].clone();
        let budget = if n % 2 == 0 { "root/team/a" } else { "root/b" };
        let (session, agent) = session_on(&store, budget, &["search"], 1_000, &[]).await;
        let allowed = Arc::clone(&allowed);
        tasks.push(tokio::spawn(async move {
            let mut denied_since: Option<tokio::time::Instant> = None;
            loop {
                match store.use_session(session, "search", Some(agent)).await {
                    Ok(_) => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                        denied_since = None;
                    }
                    Err(SessionError::SharedBudgetExceeded { budget_id, .. }) => {
                        assert!(
                            budget_id == "root" || budget_id == "root/team",
                            "{budget_id}"
                        );
                        let since = *denied_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > Duration::from_millis(1_500) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(other) => panic!("{other:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("the task ran");
    }
    assert_eq!(allowed.load(Ordering::Relaxed), 240);
    assert_eq!(used(&admin, "root").await, 240);
    let team = used(&admin, "root/team").await;
    assert!(team <= 150, "team used {team}");
    assert_eq!(used(&admin, "root/team/a").await, team);
    assert_eq!(used(&admin, "root/b").await, 240 - team);
    for store in &stores {
        let report = store.shutdown(Duration::from_secs(5)).await;
        assert!(report.is_clean(), "{report:?}");
    }
    assert_the_trail_explains_every_unit(&pool).await;
    let verdict = arbiter_session::operator::chain::verify_all_audit_chains(&pool)
        .await
        .expect("verify");
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// A call costs its explicit cost, else its tools' `tool_costs` (0 allowed), else 1 per
/// tool; a shared budget is the last check, and its denial consumes nothing anywhere and
/// is recorded with the budget that had no room.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn costs_check_order_and_the_denials_record(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "tenant", 10, None).await;
    put(&store, "tenant/team", 100, Some("tenant")).await;
    let (session, agent) = session_on(
        &store,
        "tenant/team",
        &["search", "free", "write"],
        100,
        &[("free", 0), ("write", 4)],
    )
    .await;
    store
        .use_session(session, "search", Some(agent))
        .await
        .expect("1 unit");
    store
        .use_session(session, "free", Some(agent))
        .await
        .expect("0 units");
    store
        .use_session_batch(session, &["write", "search"], Some(agent))
        .await
        .expect("5 units");
    store
        .use_session_with_cost(session, "write", Some(agent), 3)
        .await
        .expect("3 units, explicitly");
    assert_eq!(used(&store, "tenant").await, 9);
    let before = store.get(session).await.expect("get");
    let denied = store
        .use_session(session, "write", Some(agent))
        .await
        .expect_err("4 units, 1 left");
    match &denied {
        SessionError::SharedBudgetExceeded { budget_id, .. } => assert_eq!(budget_id, "tenant"),
        other => panic!("{other:?}"),
    }
    assert_eq!(denied.to_string(), "session budget exceeded");
    assert_eq!(arbiter_session::http::status_code_for_error(&denied), 429);
    assert_eq!(
        arbiter_session::http::error_code(&denied),
        "budget_exceeded"
    );
    let after = store.get(session).await.expect("get");
    assert_eq!(
        after.calls_made, before.calls_made,
        "a denial consumes nothing"
    );
    // Checks before the shared budget keep their own errors.
    assert!(matches!(
        store.use_session(session, "rm", Some(agent)).await,
        Err(SessionError::ToolNotAuthorized { .. })
    ));
    assert!(matches!(
        store
            .use_session_with_cost(session, "search", Some(agent), 1_000_000_000_001)
            .await,
        Err(SessionError::InvalidRequest { .. })
    ));
    store
        .use_session(session, "search", Some(agent))
        .await
        .expect("the last unit");
    assert_eq!(used(&store, "tenant").await, 10);
    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());

    let mut events: Vec<(String, Option<i64>)> = sqlx::query!(
        "SELECT kind, tools, cost FROM arbiter.session_events WHERE session_id = $1 AND kind <> 'created'",
        session
    )
    .fetch_all(&pool)
    .await
    .expect("events")
    .into_iter()
    .map(|row| (format!("{} {}", row.kind, row.tools.join("+")), row.cost))
    .collect();
    // Denials are written after the calls: compare without order.
    events.sort();
    let mut expected: Vec<(String, Option<i64>)> = [
        ("call_allowed search", Some(1)),
        ("call_allowed free", Some(0)),
        ("batch_allowed write+search", Some(5)),
        ("call_allowed write", Some(3)),
        ("call_allowed search", Some(1)),
        ("denied write", None),
        ("denied rm", None),
    ]
    .into_iter()
    .map(|(event, cost)| (event.to_owned(), cost))
    .collect();
    expected.sort();
    assert_eq!(events, expected);
    let denial = sqlx::query!(
        "SELECT reason, budget_id FROM arbiter.session_events WHERE session_id = $1 AND reason = 'shared_budget'",
        session
    )
    .fetch_one(&pool)
    .await
    .expect("the shared budget's denial");
    assert_eq!(denial.budget_id.as_deref(), Some("tenant"));
    assert_the_trail_explains_every_unit(&pool).await;
    let verdict = arbiter_session::operator::chain::verify_audit_chain(&pool, session)
        .await
        .expect("verify");
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// A session naming a budget that does not exist is refused (nothing written); tool
/// costs need a budget; a store over memory refuses budgets.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_session_names_an_existing_budget(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    let agent = Uuid::new_v4();
    let unknown = common::request(agent, &["search"], 5).with_budget(id("nobody"));
    assert!(matches!(
        store.create(unknown).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    let costs_alone = common::request(agent, &["search"], 5).with_tool_cost("search", 2);
    assert!(matches!(
        store.create(costs_alone).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    put(&store, "team", 5, None).await;
    let unauthorized = common::request(agent, &["search"], 5)
        .with_budget(id("team"))
        .with_tool_cost("rm", 2);
    assert!(matches!(
        store.create(unauthorized).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    let rows: i64 = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.sessions"#)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
    let memory = SessionStore::new(arbiter_session::MemoryStorage::new());
    assert!(matches!(
        memory
            .create(common::request(agent, &["search"], 5).with_budget(id("team")))
            .await,
        Err(SessionError::InvalidRequest { .. })
    ));
}

/// A store that can no longer reach the database (as good as dead to the others) holds
/// half of a budget; another store is denied while it does, and gets exactly the unspent
/// units once the first one's lease has run out: the budget ends fully spent.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_lost_stores_units_come_back_after_its_lease(pool: PgPool) {
    let admin = SessionStore::postgres(pool.clone());
    put(&admin, "team", 40, None).await;
    let lost_storage = FaultyStorage::new(PgStorage::new(pool.clone()));
    let lost = SessionStore::builder(lost_storage.clone())
        .share_lease(Duration::from_secs(1))
        .build();
    let (session, agent) = {
        let request = common::request(Uuid::new_v4(), &["search"], 100).with_budget(id("team"));
        let session = lost.create(request.clone()).await.expect("create");
        (session.session_id, request.agent_id)
    };
    for _ in 0..3 {
        lost.use_session(session, "search", Some(agent))
            .await
            .expect("within its share");
    }
    lost_storage.fail_writes();

    let other = process(&pool, 4, Duration::from_secs(10)).await;
    let (theirs, their_agent) = session_on(&other, "team", &["search"], 100, &[]).await;
    let mut allowed = 0;
    let mut denied = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while allowed < 37 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 30 s, {allowed} of 37 units came back"
        );
        match other.use_session(theirs, "search", Some(their_agent)).await {
            Ok(_) => allowed += 1,
            Err(SessionError::SharedBudgetExceeded { .. }) => {
                denied += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("{err:?}"),
        }
    }
    assert!(
        denied > 0,
        "the lost store's units were held while its lease ran"
    );
    assert!(matches!(
        other.use_session(theirs, "search", Some(their_agent)).await,
        Err(SessionError::SharedBudgetExceeded { .. })
    ));
    assert_eq!(used(&admin, "team").await, 40);
    assert!(other.shutdown(Duration::from_secs(5)).await.is_clean());
    assert_the_trail_explains_every_unit(&pool).await;
}

/// A call counted while the database was unreachable is charged to the store's share; if
/// the outage outlasts the share's lease, its units may have gone back to the budget, so
/// the reconciler drops the call (it was answered `StorageWriteThrough`) instead of
/// charging it anywhere: the row, the budget and the trail agree.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_call_charged_to_a_share_that_died_is_dropped_at_reconcile(pool: PgPool) {
    let admin = SessionStore::postgres(pool.clone());
    put(&admin, "team", 100, None).await;
    let storage = FaultyStorage::new(PgStorage::new(pool.clone()));
    let lease = Duration::from_millis(500);
    let store = SessionStore::builder(storage.clone())
        .share_lease(lease)
        .reconcile_interval(Duration::from_secs(3_600))
        .build();
    let request = common::request(Uuid::new_v4(), &["search"], 10).with_budget(id("team"));
    let agent = request.agent_id;
    let session = store.create(request).await.expect("create").session_id;
    store
        .use_session(session, "search", Some(agent))
        .await
        .expect("one unit");
    storage.fail_writes();
    assert!(matches!(
        store.use_session(session, "search", Some(agent)).await,
        Err(SessionError::StorageWriteThrough { .. })
    ));
    assert_eq!(store.stats().pending, 1);
    tokio::time::sleep(lease * 3).await;
    storage.heal();
    let report = store.reconcile_now().await;
    assert_eq!(report.still_pending, 0, "{report:?}");
    assert_eq!(common::row(&pool, session).await.calls_made, 1);
    assert_eq!(used(&admin, "team").await, 1);
    let kinds = common::event_kinds(&pool, session).await;
    assert!(kinds.contains(&"reconciled".to_owned()), "{kinds:?}");
    // The store goes on with a new share.
    store
        .use_session(session, "search", Some(agent))
        .await
        .expect("a unit of a new share");
    assert_eq!(used(&admin, "team").await, 2);
    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());
    assert_the_trail_explains_every_unit(&pool).await;
    let verdict = arbiter_session::operator::chain::verify_audit_chain(&pool, session)
        .await
        .expect("verify");
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// Lowering a limit takes effect for the next decisions: the shares holding units of the
/// budget are closed, a store still counting on one finds out at its next write and decides
/// that call again on a new share granted under the new limit (an answer of the budget, not
/// a storage error), and no more than the new limit is ever used. Raising a limit closes
/// nothing.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_lowered_limit_takes_effect_for_the_next_call(pool: PgPool) {
    let admin = SessionStore::postgres(pool.clone());
    put(&admin, "root", 1_000, None).await;
    put(&admin, "team", 100, Some("root")).await;
    let store = process(&pool, 4, Duration::from_secs(10)).await;
    let (session, agent) = session_on(&store, "team", &["search"], 100, &[]).await;
    let call = || store.use_session(session, "search", Some(agent));
    call().await.expect("a unit of a share of several");
    // Raising the root's limit leaves the shares as they are.
    put(&admin, "root", 2_000, None).await;
    call().await.expect("a unit of a share");
    let closed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.budget_shares WHERE closed_at IS NOT NULL"#
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(closed, 0);
    put(&admin, "team", 4, Some("root")).await;
    call().await.expect("decided again on a new share");
    call().await.expect("the last unit");
    match call().await {
        Err(SessionError::SharedBudgetExceeded { budget_id, .. }) => assert_eq!(budget_id, "team"),
        other => panic!("{other:?}"),
    }
    assert_eq!(used(&admin, "team").await, 4);
    assert_eq!(store.stats().pending, 0);
    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());
    assert_the_trail_explains_every_unit(&pool).await;
}
