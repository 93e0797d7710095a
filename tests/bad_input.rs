//! Bad input at the boundary: every field of a create request at and past its limits, and
//! hostile tool names and batches at call time. Past a limit: `InvalidRequest` (or a
//! denial) and nothing written. At a limit: accepted and stored faithfully.

mod common;

use arbiter_session::http::parse_session_header;
use arbiter_session::model::limits;
use arbiter_session::{CreateSessionRequest, SessionError, SessionStore};
use chrono::Duration;
use common::{request, row};
use sqlx::PgPool;
use uuid::Uuid;

async fn stored_rows(pool: &PgPool) -> (i64, i64) {
    let sessions = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.sessions"#)
        .fetch_one(pool)
        .await
        .expect("count readable");
    let events = sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.session_events"#)
        .fetch_one(pool)
        .await
        .expect("count readable");
    (sessions, events)
}

fn base() -> CreateSessionRequest {
    request(Uuid::new_v4(), &["t"], 5)
}

/// [`base`] with one field changed.
fn with(change: impl FnOnce(&mut CreateSessionRequest)) -> CreateSessionRequest {
    let mut req = base();
    change(&mut req);
    req
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn bad_input_past_every_limit_is_refused_and_writes_nothing(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    let huge = "x".repeat(1 << 20);
    let cases: Vec<(&str, CreateSessionRequest)> = vec![
        ("budget 0", with(|r| r.call_budget = 0)),
        (
            "budget past bigint",
            with(|r| r.call_budget = limits::MAX_COUNT + 1),
        ),
        ("budget u64::MAX", with(|r| r.call_budget = u64::MAX)),
        ("time limit 0", with(|r| r.time_limit = Duration::zero())),
        (
            "time limit negative",
            with(|r| r.time_limit = Duration::seconds(-60)),
        ),
        (
            "time limit 999 ms",
            with(|r| r.time_limit = Duration::milliseconds(999)),
        ),
        (
            "time limit 24 h + 1 ms",
            with(|r| r.time_limit = Duration::hours(24) + Duration::milliseconds(1)),
        ),
        ("time limit max", with(|r| r.time_limit = Duration::MAX)),
        ("time limit min", with(|r| r.time_limit = Duration::MIN)),
        ("window 0", with(|r| r.rate_limit_window_secs = 0)),
        (
            "window u64::MAX",
            with(|r| r.rate_limit_window_secs = u64::MAX),
        ),
        ("rate 0", with(|r| r.rate_limit_per_minute = Some(0))),
        (
            "rate u64::MAX",
            with(|r| r.rate_limit_per_minute = Some(u64::MAX)),
        ),
        (
            "intent 4 KiB + 1",
            with(|r| r.declared_intent = "i".repeat(4097)),
        ),
        ("intent 1 MiB", with(|r| r.declared_intent = huge.clone())),
        ("intent NUL", with(|r| r.declared_intent = "a\0b".into())),
        (
            "tool empty",
            with(|r| r.authorized_tools = vec![String::new()]),
        ),
        (
            "tool 257 bytes",
            with(|r| r.authorized_tools = vec!["t".repeat(257)]),
        ),
        (
            "tool 1 MiB",
            with(|r| r.authorized_tools = vec![huge.clone()]),
        ),
        (
            "tool NUL",
            with(|r| r.authorized_tools = vec!["re\0ad".into()]),
        ),
        (
            "1025 tools",
            with(|r| r.authorized_tools = vec!["t".into(); 1025]),
        ),
        (
            "a million tools",
            with(|r| r.authorized_tools = (0..1_000_000).map(|i| format!("tool{i}")).collect()),
        ),
        (
            "credential NUL",
            with(|r| r.authorized_credentials = vec!["\0".into()]),
        ),
        (
            "credential empty",
            with(|r| r.authorized_credentials = vec![String::new()]),
        ),
        (
            "delegation 1 MiB",
            with(|r| r.delegation_chain_snapshot = vec![huge.clone()]),
        ),
        (
            "delegation 1025",
            with(|r| r.delegation_chain_snapshot = vec!["d".into(); 1025]),
        ),
    ];
    for (what, req) in cases {
        assert!(
            matches!(
                store.create(req.clone()).await,
                Err(SessionError::InvalidRequest { .. })
            ),
            "create: {what}"
        );
        assert!(
            matches!(
                store.create_if_under_cap(req, 10).await,
                Err(SessionError::InvalidRequest { .. })
            ),
            "create_if_under_cap: {what}"
        );
    }
    assert_eq!(stored_rows(&pool).await, (0, 0));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn bad_input_at_every_limit_is_stored_faithfully(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    let name = |i: usize| format!("{i:0>256}");
    let req = CreateSessionRequest::new(
        Uuid::new_v4(),
        (0..limits::MAX_TOOLS).map(name),
        limits::MAX_COUNT,
        limits::MAX_TIME_LIMIT,
    )
    .with_rate_limit_per_minute(limits::MAX_COUNT)
    .with_rate_limit_window_secs(limits::MAX_RATE_WINDOW_SECS)
    .with_declared_intent("é".repeat(limits::MAX_INTENT_BYTES / 2))
    .with_authorized_credentials((0..limits::MAX_TOOLS).map(name))
    .with_delegation_chain((0..limits::MAX_TOOLS).map(name));
    let created = store.create(req.clone()).await.unwrap();
    let reloaded = SessionStore::postgres(pool.clone())
        .get(created.session_id)
        .await
        .unwrap();
    assert_eq!(reloaded, created);
    assert_eq!(reloaded.authorized_tools.len(), limits::MAX_TOOLS);
    assert_eq!(reloaded.call_budget, limits::MAX_COUNT);
    let last = name(limits::MAX_TOOLS - 1);
    assert_eq!(
        store
            .use_session(created.session_id, &last, None)
            .await
            .unwrap()
            .calls_made,
        1
    );

    let shortest = with(|r| r.time_limit = limits::MIN_TIME_LIMIT);
    let s = store.create(shortest).await.unwrap();
    assert_eq!(s.expires_at - s.created_at, Duration::seconds(1));
}

/// What an agent sends at call time: under a wildcard session, a tool name that could
/// never be an allow-list entry is not authorized (it would otherwise reach the audit
/// trail); batches must have 1..=1024 tools. None of it writes anything.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn bad_input_hostile_tool_names_and_batches_write_nothing(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    let id = common::new_session(&store, &["*"], 5000).await;
    let before = row(&pool, id).await;
    let huge = "x".repeat(1 << 20);
    for tool in ["", "nul\0byte", &"t".repeat(257), &huge] {
        assert!(
            matches!(
                store.use_session(id, tool, None).await,
                Err(SessionError::ToolNotAuthorized { .. })
            ),
            "tool of {} bytes",
            tool.len()
        );
    }
    let too_many = vec!["t"; 1025];
    assert!(matches!(
        store.use_session_batch(id, &too_many, None).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    assert!(matches!(
        store.use_session_batch(id, &[], None).await,
        Err(SessionError::InvalidRequest { .. })
    ));
    assert_eq!(row(&pool, id).await, before);
    assert_eq!(
        store
            .use_session_batch(id, &vec!["t"; 1024], None)
            .await
            .unwrap()
            .calls_made,
        1024
    );
}

/// A malformed session header never reaches the store; an unknown id is `NotFound`.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn bad_input_malformed_or_unknown_session_ids(pool: PgPool) {
    let store = SessionStore::postgres(pool);
    for header in [
        "",
        "42",
        "'; DROP TABLE arbiter.sessions; --",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        assert_eq!(parse_session_header(header), None, "{header:?}");
    }
    let unknown = parse_session_header(" 6f1c2a8e-3b7d-4c59-9a0e-2d4f8b1c7e55 ").unwrap();
    assert!(matches!(store.get(unknown).await, Err(SessionError::NotFound(id)) if id == unknown));
    assert!(matches!(
        store.use_session(unknown, "t", None).await,
        Err(SessionError::NotFound(_))
    ));
    assert!(matches!(
        store.close(unknown).await,
        Err(SessionError::NotFound(_))
    ));
}
