//! The error contract: `Display` strings are fixed and opaque, every variant maps to an
//! HTTP status, and every variant is reachable through the public API.

mod common;

use arbiter_session::http::status_code_for_error;
use arbiter_session::testing::{FaultyStorage, ManualClock};
use arbiter_session::{PgStorage, SessionError, SessionStore};
use chrono::Duration;
use common::request;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

/// Each variant with field values that cannot occur in any fixed message.
fn every_variant() -> Vec<(SessionError, &'static str, u16, Vec<String>)> {
    let id = Uuid::new_v4();
    let other = Uuid::new_v4();
    let ids = |ids: &[Uuid]| ids.iter().map(Uuid::to_string).collect::<Vec<_>>();
    vec![
        (
            SessionError::NotFound(id),
            "session not found",
            404,
            ids(&[id]),
        ),
        (
            SessionError::Expired(id),
            "session expired",
            408,
            ids(&[id]),
        ),
        (
            SessionError::BudgetExceeded {
                session_id: id,
                limit: 987_654,
                used: 123_456,
            },
            "session budget exceeded",
            429,
            [ids(&[id]), vec!["987654".into(), "123456".into()]].concat(),
        ),
        (
            SessionError::ToolNotAuthorized {
                session_id: id,
                tool: "exfiltrate_db".into(),
            },
            "tool not authorized in session",
            403,
            [ids(&[id]), vec!["exfiltrate_db".into()]].concat(),
        ),
        (
            SessionError::AlreadyClosed(id),
            "session already closed",
            410,
            ids(&[id]),
        ),
        (
            SessionError::RateLimited {
                session_id: id,
                limit_per_minute: 424_242,
            },
            "session rate limit exceeded",
            429,
            [ids(&[id]), vec!["424242".into()]].concat(),
        ),
        (
            SessionError::AgentMismatch {
                session_id: id,
                expected: other,
                actual: id,
            },
            "agent mismatch",
            403,
            ids(&[id, other]),
        ),
        (
            SessionError::StorageWriteThrough {
                session_id: id,
                detail: "connection reset by peer".into(),
            },
            "storage write-through failed",
            503,
            [ids(&[id]), vec!["connection reset by peer".into()]].concat(),
        ),
        (
            SessionError::TooManySessions {
                agent_id: other.to_string(),
                max: 31_337,
                current: 31_338,
            },
            "too many concurrent sessions",
            429,
            [ids(&[other]), vec!["31337".into(), "31338".into()]].concat(),
        ),
        (
            SessionError::StorageRead {
                session_id: Some(id),
                detail: "pool timed out".into(),
            },
            "session storage unavailable",
            503,
            [ids(&[id]), vec!["pool timed out".into()]].concat(),
        ),
        (
            SessionError::InvalidRequest {
                reason: "call_budget must be positive".into(),
            },
            "invalid session request",
            400,
            vec!["call_budget must be positive".into()],
        ),
    ]
}

#[test]
fn errors_display_is_fixed_and_leaks_no_field() {
    for (err, display, _, secrets) in every_variant() {
        let shown = err.to_string();
        assert_eq!(shown, display, "{err:?}");
        let debug = format!("{err:?}");
        for secret in secrets {
            assert!(!shown.contains(&secret), "{shown:?} leaks {secret:?}");
            assert!(
                debug.contains(&secret),
                "Debug must keep {secret:?}: {debug}"
            );
        }
    }
}

#[test]
fn errors_map_to_http_status() {
    for (err, _, status, _) in every_variant() {
        assert_eq!(status_code_for_error(&err), status, "{err:?}");
    }
}

/// Every variant, produced by the store against a real PostgreSQL.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn errors_every_variant_reached_through_the_api(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let faulty = FaultyStorage::new(PgStorage::new(pool.clone()));
    let store = SessionStore::builder(faulty.clone())
        .clock(Arc::new(clock.clone()))
        .build();
    let agent = Uuid::new_v4();
    let mut req = request(agent, &["read"], 1);
    req.rate_limit_per_minute = Some(1);
    req.call_budget = 2;

    let missing = Uuid::new_v4();
    assert!(matches!(store.get(missing).await, Err(SessionError::NotFound(id)) if id == missing));

    let s = store.create(req.clone()).await.unwrap();
    let id = s.session_id;
    let stranger = Uuid::new_v4();
    assert!(matches!(
        store.use_session(id, "read", Some(stranger)).await,
        Err(SessionError::AgentMismatch { expected, actual, .. }) if expected == agent && actual == stranger
    ));
    assert!(matches!(
        store.use_session(id, "write", Some(agent)).await,
        Err(SessionError::ToolNotAuthorized { tool, .. }) if tool == "write"
    ));
    store.use_session(id, "read", Some(agent)).await.unwrap();
    assert!(matches!(
        store.use_session(id, "read", Some(agent)).await,
        Err(SessionError::RateLimited {
            limit_per_minute: 1,
            ..
        })
    ));
    clock.advance(Duration::minutes(1));
    store.use_session(id, "read", Some(agent)).await.unwrap();
    assert!(matches!(
        store.use_session(id, "read", Some(agent)).await,
        Err(SessionError::BudgetExceeded {
            limit: 2,
            used: 2,
            ..
        })
    ));

    let s2 = store.create(request(agent, &["read"], 5)).await.unwrap();
    store.close(s2.session_id).await.unwrap();
    assert!(matches!(
        store.use_session(s2.session_id, "read", None).await,
        Err(SessionError::AlreadyClosed(_))
    ));

    let s3 = store.create(request(agent, &["read"], 5)).await.unwrap();
    clock.advance(Duration::minutes(10));
    assert!(matches!(
        store.use_session(s3.session_id, "read", None).await,
        Err(SessionError::Expired(_))
    ));

    // Nothing of this agent is live now (past their time or closed): the cap admits one.
    let fresh = store
        .create_if_under_cap(request(agent, &["read"], 5), 1)
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_if_under_cap(request(agent, &["read"], 5), 1)
            .await,
        Err(SessionError::TooManySessions {
            max: 1,
            current: 1,
            ..
        })
    ));

    let mut bad = request(agent, &["read"], 1);
    bad.call_budget = 0;
    assert!(matches!(
        store.create(bad).await,
        Err(SessionError::InvalidRequest { .. })
    ));

    faulty.fail_next_writes(1);
    assert!(matches!(
        store.use_session(fresh.session_id, "read", None).await,
        Err(SessionError::StorageWriteThrough { session_id, .. }) if session_id == fresh.session_id
    ));

    let uncached = SessionStore::new(faulty.clone());
    faulty.fail_reads();
    assert!(matches!(
        uncached.get(fresh.session_id).await,
        Err(SessionError::StorageRead { session_id: Some(sid), .. }) if sid == fresh.session_id
    ));
}

/// A real outage rather than an injected one: with the pool closed, a cached session's
/// mutation fails its write and a cold read fails its load — never `NotFound`.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn errors_closed_pool_is_write_through_and_read_failure(pool: PgPool) {
    let own_pool = common::other_process_pool(&pool).await;
    let store = SessionStore::postgres(own_pool.clone());
    let s = store
        .create(request(Uuid::new_v4(), &["read"], 3))
        .await
        .unwrap();
    own_pool.close().await;
    assert!(matches!(
        store.use_session(s.session_id, "read", None).await,
        Err(SessionError::StorageWriteThrough { .. })
    ));
    assert!(matches!(
        store.get(Uuid::new_v4()).await,
        Err(SessionError::StorageRead { .. })
    ));
    assert_eq!(store.stats().pending, 1);
}
