//! Session behaviour through the public API against a real PostgreSQL: budget, batch,
//! rate window, time limit, binding, close, per-agent operations.

mod common;

use arbiter_session::testing::ManualClock;
use arbiter_session::{SessionError, SessionStatus};
use chrono::Duration;
use common::{event_kinds, request, row, store};
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn budget_exhaustion_is_exact(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let s = store
        .create(request(Uuid::new_v4(), &["*"], 5))
        .await
        .unwrap();
    for n in 1..=5 {
        let after = store
            .use_session(s.session_id, "search", None)
            .await
            .unwrap();
        assert_eq!(after.calls_made, n);
    }
    let denied = store.use_session(s.session_id, "search", None).await;
    assert!(matches!(
        denied,
        Err(SessionError::BudgetExceeded {
            limit: 5,
            used: 5,
            ..
        })
    ));
    let stored = row(&pool, s.session_id).await;
    assert_eq!(stored.calls_made, 5);
    let kinds = event_kinds(&pool, s.session_id).await;
    assert_eq!(kinds.iter().filter(|k| *k == "call_allowed").count(), 5);
    assert_eq!(kinds[0], "created");
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn batch_with_one_bad_tool_consumes_nothing(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let s = store
        .create(request(Uuid::new_v4(), &["a", "b"], 10))
        .await
        .unwrap();
    let before = row(&pool, s.session_id).await;
    let denied = store
        .use_session_batch(s.session_id, &["a", "nope", "b"], None)
        .await;
    assert!(matches!(denied, Err(SessionError::ToolNotAuthorized { tool, .. }) if tool == "nope"));
    assert_eq!(
        row(&pool, s.session_id).await,
        before,
        "a denial writes nothing"
    );
    assert_eq!(store.get(s.session_id).await.unwrap().calls_made, 0);

    let after = store
        .use_session_batch(s.session_id, &["a", "b", "a"], None)
        .await
        .unwrap();
    assert_eq!(after.calls_made, 3);
    assert_eq!(row(&pool, s.session_id).await.calls_made, 3);
    let tools = sqlx::query_scalar!(
        "SELECT tools FROM arbiter.session_events WHERE session_id = $1 AND kind = 'batch_allowed'",
        s.session_id
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tools, ["a", "b", "a"]);

    let too_many = store.use_session_batch(s.session_id, &["a"; 8], None).await;
    assert!(matches!(
        too_many,
        Err(SessionError::BudgetExceeded {
            limit: 10,
            used: 3,
            ..
        })
    ));
    assert_eq!(row(&pool, s.session_id).await.calls_made, 3);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn rate_window_limits_and_resets_with_injected_clock(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let mut req = request(Uuid::new_v4(), &["a"], 100);
    req.rate_limit_per_minute = Some(3);
    req.rate_limit_window_secs = 60;
    let s = store.create(req).await.unwrap();
    for _ in 0..3 {
        store.use_session(s.session_id, "a", None).await.unwrap();
    }
    clock.advance(Duration::seconds(59));
    assert!(matches!(
        store.use_session(s.session_id, "a", None).await,
        Err(SessionError::RateLimited {
            limit_per_minute: 3,
            ..
        })
    ));
    clock.advance(Duration::seconds(1));
    let after = store.use_session(s.session_id, "a", None).await.unwrap();
    assert_eq!((after.calls_made, after.rate_window_calls), (4, 1));
    let stored = row(&pool, s.session_id).await;
    assert_eq!((stored.calls_made, stored.rate_window_calls), (4, 1));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn time_limit_denies_and_expire_due_marks_without_deleting(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let agent = Uuid::new_v4();
    let short = store.create(request(agent, &["a"], 5)).await.unwrap();
    let mut long_req = request(agent, &["a"], 5);
    long_req.time_limit = Duration::hours(2);
    let long = store.create(long_req).await.unwrap();

    clock.advance(Duration::minutes(10));
    assert!(matches!(
        store.use_session(short.session_id, "a", None).await,
        Err(SessionError::Expired(_))
    ));
    assert_eq!(store.count_live_for_agent(agent).await.unwrap(), 1);
    assert_eq!(store.expire_due().await.unwrap(), 1);
    assert_eq!(
        store.expire_due().await.unwrap(),
        0,
        "expiring is idempotent"
    );
    assert_eq!(row(&pool, short.session_id).await.status, "expired");
    assert_eq!(
        store.get(short.session_id).await.unwrap().status,
        SessionStatus::Expired
    );
    assert_eq!(
        event_kinds(&pool, short.session_id).await,
        ["created", "expired"]
    );
    assert_eq!(row(&pool, long.session_id).await.status, "active");
    assert!(matches!(
        store.close(short.session_id).await,
        Err(SessionError::Expired(_))
    ));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn agent_binding_refuses_other_agents_and_allows_trusted_callers(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let agent = Uuid::new_v4();
    let s = store.create(request(agent, &["a"], 5)).await.unwrap();
    let stranger = Uuid::new_v4();
    assert!(matches!(
        store.use_session(s.session_id, "a", Some(stranger)).await,
        Err(SessionError::AgentMismatch { .. })
    ));
    assert!(matches!(
        store
            .use_session_batch(s.session_id, &["a"], Some(stranger))
            .await,
        Err(SessionError::AgentMismatch { .. })
    ));
    assert_eq!(row(&pool, s.session_id).await.calls_made, 0);
    store
        .use_session(s.session_id, "a", Some(agent))
        .await
        .unwrap();
    store.use_session(s.session_id, "a", None).await.unwrap();
    assert_eq!(row(&pool, s.session_id).await.calls_made, 2);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn close_is_final_and_recorded(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let s = store
        .create(request(Uuid::new_v4(), &["a"], 5))
        .await
        .unwrap();
    let closed = store.close(s.session_id).await.unwrap();
    assert_eq!(closed.status, SessionStatus::Closed);
    assert!(matches!(
        store.close(s.session_id).await,
        Err(SessionError::AlreadyClosed(_))
    ));
    assert_eq!(row(&pool, s.session_id).await.status, "closed");
    assert_eq!(
        event_kinds(&pool, s.session_id).await,
        ["created", "closed"]
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn per_agent_count_and_close_touch_only_that_agent(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let (agent, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(
            store
                .create(request(agent, &["a"], 5))
                .await
                .unwrap()
                .session_id,
        );
    }
    let theirs = store
        .create(request(other, &["a"], 5))
        .await
        .unwrap()
        .session_id;
    store.close(mine[0]).await.unwrap();
    assert_eq!(store.count_live_for_agent(agent).await.unwrap(), 2);
    assert_eq!(store.close_sessions_for_agent(agent).await.unwrap(), 2);
    assert_eq!(store.count_live_for_agent(agent).await.unwrap(), 0);
    for id in &mine {
        assert_eq!(row(&pool, *id).await.status, "closed");
        assert_eq!(store.get(*id).await.unwrap().status, SessionStatus::Closed);
    }
    assert_eq!(row(&pool, theirs).await.status, "active");
    assert_eq!(store.count_live_for_agent(other).await.unwrap(), 1);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn invalid_create_writes_nothing(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = store(&pool, &clock);
    let agent = Uuid::new_v4();
    let mut req = request(agent, &["a"], 5);
    req.authorized_tools.push("bad\0tool".into());
    assert!(matches!(
        store.create(req.clone()).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    assert!(matches!(
        store.create_if_under_cap(req, 10).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    let rows = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.sessions"#)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}
