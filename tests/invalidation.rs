//! Several processes on one database: a status change made by one store, or by an
//! operator's SQL, reaches every other store's cache through LISTEN/NOTIFY, also after the
//! listening connection was killed.

mod common;

use std::time::Duration;

use arbiter_session::{SessionStatus, SessionStore};
use common::other_process_pool;
use sqlx::PgPool;
use uuid::Uuid;

/// How long a status change may take to reach another store's `get` (the issue's bound).
const FRESH_WITHIN: Duration = Duration::from_secs(1);

/// Polls `store.get(id)` (a read: no mutation on that store) until it reports `status`.
async fn seen_within<S: arbiter_session::Storage>(
    store: &SessionStore<S>,
    id: Uuid,
    status: SessionStatus,
) -> bool {
    let deadline = tokio::time::Instant::now() + FRESH_WITHIN;
    loop {
        if store.get(id).await.expect("session exists").status == status {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts `store`'s listener (the first use does) and waits until it is connected.
async fn listening<S: arbiter_session::Storage>(store: &SessionStore<S>, id: Uuid) {
    store.get(id).await.expect("session exists");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.stats().listening {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener never connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn two_stores(pool: &PgPool) -> (SessionStore, SessionStore) {
    (
        SessionStore::postgres(other_process_pool(pool).await),
        SessionStore::postgres(other_process_pool(pool).await),
    )
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn invalidation_close_by_another_store_is_seen(pool: PgPool) {
    let (a, b) = two_stores(&pool).await;
    let id = common::new_session(&a, &["t"], 5).await;
    listening(&b, id).await;
    assert_eq!(b.get(id).await.unwrap().status, SessionStatus::Active);
    a.close(id).await.unwrap();
    assert!(seen_within(&b, id, SessionStatus::Closed).await);
    assert!(b.stats().invalidations >= 1);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn invalidation_survives_a_killed_listener_connection(pool: PgPool) {
    let (a, b) = two_stores(&pool).await;
    let id = common::new_session(&a, &["t"], 5).await;
    listening(&b, id).await;
    let killed = sqlx::query_scalar!(
        r#"SELECT count(pg_terminate_backend(pid)) AS "killed!"
             FROM pg_stat_activity
            WHERE datname = current_database() AND query ILIKE 'LISTEN%'"#
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(killed >= 1, "no listening connection found");
    a.close(id).await.unwrap();
    assert!(seen_within(&b, id, SessionStatus::Closed).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.stats().listener_reconnects == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn invalidation_operator_sql_close_is_seen(pool: PgPool) {
    let (a, _) = two_stores(&pool).await;
    let id = common::new_session(&a, &["t"], 5).await;
    listening(&a, id).await;
    sqlx::query!(
        "UPDATE arbiter.sessions SET status = 'closed' WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .unwrap();
    assert!(seen_within(&a, id, SessionStatus::Closed).await);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn invalidation_can_be_turned_off(pool: PgPool) {
    let a = SessionStore::postgres(other_process_pool(&pool).await);
    let b = SessionStore::builder(arbiter_session::PgStorage::new(
        other_process_pool(&pool).await,
    ))
    .listen_for_changes(false)
    .build();
    let id = common::new_session(&a, &["t"], 5).await;
    b.get(id).await.unwrap();
    a.close(id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.get(id).await.unwrap().status,
        SessionStatus::Active,
        "stale without a listener"
    );
    assert!(
        matches!(
            b.use_session(id, "t", None).await,
            Err(arbiter_session::SessionError::AlreadyClosed(_))
        ),
        "the versioned write still sees the close"
    );
    assert_eq!(b.stats().invalidations, 0);
}
