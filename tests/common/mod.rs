//! Shared helpers for the integration tests. Every database test runs under
//! `#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]`: a fresh database per test,
//! migrations applied, dropped afterwards.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::Arc;

use arbiter_session::testing::{FaultyStorage, ManualClock};
use arbiter_session::{CreateSessionRequest, PgStorage, SessionStore};
use chrono::Duration;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// A [`FaultyStorage`] over `pool`: the real database, with faults injected on cue.
pub fn faulty(pool: &PgPool) -> FaultyStorage<PgStorage> {
    FaultyStorage::new(PgStorage::new(pool.clone()))
}

/// Waits until `done` holds, polling every 5 ms; fails naming `what` after 10 s (a
/// liveness bound, never a measure of speed).
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A request for `agent` with the given tools and budget, ten minutes long.
/// A budget id the test spells correctly.
pub fn budget_id(budget: &str) -> arbiter_session::budget::BudgetId {
    arbiter_session::budget::BudgetId::new(budget).expect("a valid budget id")
}

/// Creates (or replaces) `budget` with `limit` and `parent` through the store.
pub async fn put_budget(store: &SessionStore, budget: &str, limit: u64, parent: Option<&str>) {
    let mut terms = arbiter_session::budget::BudgetTerms::new(limit);
    terms.parent_id = parent.map(budget_id);
    store
        .put_budget(&budget_id(budget), &terms)
        .await
        .expect("the budget is written");
}

/// The trail explains every unit: each share's units are the sum of the costs of the events
/// naming it, and no event names a share that does not exist (`arbiter-session verify`'s
/// check).
pub async fn assert_the_trail_explains_every_unit(pool: &PgPool) {
    let charges = arbiter_session::operator::budgets::verify_charges(pool)
        .await
        .expect("the check runs");
    assert!(charges.is_exact(), "{:?}", charges.mismatched);
}

pub fn request(agent: Uuid, tools: &[&str], budget: u64) -> CreateSessionRequest {
    CreateSessionRequest::new(agent, tools.iter().copied(), budget, Duration::minutes(10))
}

/// Creates a session for a new agent with the given tools and budget; its id.
pub async fn new_session<S: arbiter_session::Storage>(
    store: &SessionStore<S>,
    tools: &[&str],
    budget: u64,
) -> Uuid {
    store
        .create(request(Uuid::new_v4(), tools, budget))
        .await
        .expect("create a session")
        .session_id
}

/// A store over `pool` whose time is `clock`.
pub fn store(pool: &PgPool, clock: &ManualClock) -> SessionStore {
    SessionStore::builder(PgStorage::new(pool.clone()))
        .clock(Arc::new(clock.clone()))
        .build()
}

/// A second, independent pool on the same database: what another gateway process has.
pub async fn other_process_pool(pool: &PgPool) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .expect("second pool connects")
}

/// The stored row's counters and status, read with plain SQL.
#[derive(Debug, PartialEq, Eq)]
pub struct Row {
    pub calls_made: i64,
    pub rate_window_calls: i64,
    pub status: String,
    pub version: i64,
}

pub async fn row(pool: &PgPool, id: Uuid) -> Row {
    sqlx::query_as!(
        Row,
        "SELECT calls_made, rate_window_calls, status, version FROM arbiter.sessions WHERE session_id = $1",
        id
    )
    .fetch_one(pool)
    .await
    .expect("session row exists")
}

/// Audit event kinds of `id`, oldest first.
pub async fn event_kinds(pool: &PgPool, id: Uuid) -> Vec<String> {
    sqlx::query_scalar!(
        "SELECT kind FROM arbiter.session_events WHERE session_id = $1 ORDER BY event_id",
        id
    )
    .fetch_all(pool)
    .await
    .expect("events readable")
}

pub mod proxy;
pub mod reports;
#[cfg(feature = "server")]
pub mod routes;
#[cfg(feature = "server")]
pub mod service;

/// A proxy in front of the test database's server, and a pool that goes through it.
/// The pool gives up acquiring after 1 s, so a refused network fails fast.
pub async fn proxied_pool(pool: &PgPool) -> (proxy::FaultProxy, PgPool) {
    let options = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(1));
    proxied_pool_with(pool, options).await
}

/// [`proxied_pool`] with the pool's options given.
pub async fn proxied_pool_with(
    pool: &PgPool,
    pool_options: PgPoolOptions,
) -> (proxy::FaultProxy, PgPool) {
    let options = pool.connect_options();
    let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
        .await
        .expect("database host resolves")
        .next()
        .expect("database host has an address");
    let proxy = proxy::FaultProxy::start(upstream).await;
    let through = options
        .as_ref()
        .clone()
        .host("127.0.0.1")
        .port(proxy.addr().port());
    let proxied = pool_options
        .connect_with(through)
        .await
        .expect("pool connects through the proxy");
    (proxy, proxied)
}

/// Waits (bounded: a liveness check, not a speed one) until `store` has nothing pending.
pub async fn drained<S: arbiter_session::Storage>(store: &SessionStore<S>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.stats().pending > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending set did not drain within 30 s: {:?}",
            store.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Calls counted by the audit trail of `id` (one per tool of each call or batch event).
pub async fn audited_calls(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar!(
        r#"
        SELECT coalesce(sum(cardinality(tools)), 0) AS "calls!"
          FROM arbiter.session_events
         WHERE session_id = $1 AND kind IN ('call_allowed', 'batch_allowed')
        "#,
        id
    )
    .fetch_one(pool)
    .await
    .expect("events readable")
}

/// Waits until `store`'s change feed has connected (its first use started it). The
/// connect-time reset empties the cache, so tests that need a warm cache fill it after.
pub async fn wait_listening<S: arbiter_session::Storage>(store: &SessionStore<S>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !store.stats().listening {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener never connected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A builder whose reconciler only runs when told (`reconcile_now`, `shutdown`): its
/// background retry waits an hour, so every step of a failure test is deterministic.
pub fn manual_reconcile<S: arbiter_session::Storage>(
    storage: S,
) -> arbiter_session::SessionStoreBuilder<S> {
    SessionStore::builder(storage).reconcile_interval(std::time::Duration::from_secs(3600))
}

/// A small audit trail with known content, for the reporting tests: three sessions of two
/// agents over two UTC days in March 2026 (long over by the time the views look at them).
///
/// * S1 (agent A, budget 3, tools search/fetch), 2026-03-01 10:00: search, batch
///   [search, fetch], search (denied: budget); closed at 10:05.
/// * S2 (agent A, budget 10, tools search, 10 min), 2026-03-02 09:00: search presented by
///   agent B (denied: agent_mismatch), rm (denied: tool), search; never closed, so expired.
/// * S3 (agent B, budget 2, tools *), 2026-03-02 12:00: fetch; closed; fetch (denied: closed).
pub struct Dataset {
    pub agent_a: Uuid,
    pub agent_b: Uuid,
    pub s1: Uuid,
    pub s2: Uuid,
    pub s3: Uuid,
}

pub const AGENT_A: Uuid = Uuid::from_u128(0xa);
pub const AGENT_B: Uuid = Uuid::from_u128(0xb);

pub async fn known_dataset(pool: &PgPool) -> Dataset {
    use chrono::TimeZone as _;
    let at = |day: u32, hour: u32, minute: u32| {
        chrono::Utc
            .with_ymd_and_hms(2026, 3, day, hour, minute, 0)
            .single()
            .expect("valid time")
    };
    let clock = ManualClock::new(at(1, 10, 0));
    let store = store(pool, &clock);

    let s1 = store
        .create(request(AGENT_A, &["search", "fetch"], 3))
        .await
        .expect("create s1")
        .session_id;
    store
        .use_session(s1, "search", Some(AGENT_A))
        .await
        .expect("search");
    store
        .use_session_batch(s1, &["search", "fetch"], Some(AGENT_A))
        .await
        .expect("batch");
    store
        .use_session(s1, "search", Some(AGENT_A))
        .await
        .expect_err("budget spent");
    clock.set(at(1, 10, 5));
    store.close(s1).await.expect("close s1");

    clock.set(at(2, 9, 0));
    let s2 = store
        .create(request(AGENT_A, &["search"], 10))
        .await
        .expect("create s2")
        .session_id;
    store
        .use_session(s2, "search", Some(AGENT_B))
        .await
        .expect_err("wrong agent");
    store
        .use_session(s2, "rm", Some(AGENT_A))
        .await
        .expect_err("tool not allowed");
    store
        .use_session(s2, "search", Some(AGENT_A))
        .await
        .expect("search");

    clock.set(at(2, 12, 0));
    let s3 = store
        .create(request(AGENT_B, &["*"], 2))
        .await
        .expect("create s3")
        .session_id;
    store
        .use_session(s3, "fetch", Some(AGENT_B))
        .await
        .expect("fetch");
    store.close(s3).await.expect("close s3");
    store
        .use_session(s3, "fetch", Some(AGENT_B))
        .await
        .expect_err("closed");

    let report = store.shutdown(std::time::Duration::from_secs(5)).await;
    assert!(report.unflushed.is_empty() && report.unrecorded_denials == 0);
    Dataset {
        agent_a: AGENT_A,
        agent_b: AGENT_B,
        s1,
        s2,
        s3,
    }
}

/// A URL for the database `pool` is connected to (a `#[sqlx::test]` database), for the
/// command-line tool: `DATABASE_URL` with its database name replaced.
pub async fn database_url(pool: &PgPool) -> String {
    let name: String = sqlx::query_scalar!(r#"SELECT current_database() AS "name!""#)
        .fetch_one(pool)
        .await
        .expect("database name");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
    let (before_query, query) = match base.split_once('?') {
        Some((url, query)) => (url.to_owned(), format!("?{query}")),
        None => (base.clone(), String::new()),
    };
    let server = before_query
        .rsplit_once('/')
        .map(|(server, _)| server)
        .filter(|server| server.ends_with(|c: char| c != '/'))
        .unwrap_or(&before_query);
    format!("{server}/{name}{query}")
}

/// [`database_url`] of `pool`'s database, through `proxy`.
pub async fn database_url_through(pool: &PgPool, proxy: &proxy::FaultProxy) -> String {
    let url = database_url(pool).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').expect("a database name");
    let credentials = authority
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    format!(
        "{scheme}://{credentials}127.0.0.1:{}/{path}",
        proxy.addr().port()
    )
}

/// Edits the audit trail the way a superuser could: with the append-only trigger disabled.
pub async fn tamper(pool: &PgPool, sql: &str) {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    for statement in [
        "ALTER TABLE arbiter.session_events DISABLE TRIGGER session_events_append_only",
        sql,
        "ALTER TABLE arbiter.session_events ENABLE TRIGGER session_events_append_only",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut *tx)
            .await
            .expect(statement);
    }
    tx.commit().await.expect("commit");
}

/// Deletes sessions the way a superuser could: with the retention trigger disabled.
pub async fn tamper_sessions(pool: &PgPool, sql: &str) {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    for statement in [
        "ALTER TABLE arbiter.sessions DISABLE TRIGGER sessions_retention_only",
        sql,
        "ALTER TABLE arbiter.sessions ENABLE TRIGGER sessions_retention_only",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut *tx)
            .await
            .expect(statement);
    }
    tx.commit().await.expect("commit");
}
