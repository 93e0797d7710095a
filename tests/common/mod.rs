//! Shared helpers for the integration tests. Every database test runs under
//! `#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]`: a fresh database per test,
//! migrations applied, dropped afterwards.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::Arc;

use arbiter_session::{CreateSessionRequest, ManualClock, PgPool, PgStorage, SessionStore};
use chrono::Duration;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// A request for `agent` with the given tools and budget, ten minutes long.
pub fn request(agent: Uuid, tools: &[&str], budget: u64) -> CreateSessionRequest {
    CreateSessionRequest::new(agent, tools.iter().copied(), budget, Duration::minutes(10))
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

/// A proxy in front of the test database's server, and a pool that goes through it.
/// The pool gives up acquiring after 1 s, so a refused network fails fast.
pub async fn proxied_pool(pool: &PgPool) -> (proxy::FaultProxy, PgPool) {
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
    let proxied = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(std::time::Duration::from_secs(1))
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
