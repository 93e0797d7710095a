//! One behaviour suite for every [`Storage`]: the contract stated in `src/storage/mod.rs`,
//! run over `MemoryStorage` (with batching on, as a store uses it) and `PgStorage`, the way
//! tower-sessions runs one suite over every backend. `MemoryStorage` claims to keep the
//! same guards as the PostgreSQL schema; this is where that claim is checked.
//!
//! Each check is a generic function over a [`Backend`]; the `contract!` macro runs it once
//! per backend, over a fresh `MemoryStorage` and over a fresh database (`#[sqlx::test]`).
//! What only PostgreSQL can do (a row held by another transaction) is checked below the
//! suite and in `tests/regressions.rs` (`LockWait::NoWait` answers `Busy`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arbiter_session::audit::{AuditEvent, Denial, DenialReason, EventKind};
use arbiter_session::error::StorageError;
use arbiter_session::storage::{
    BatchUpdate, CapOutcome, LockWait, LockedUpdate, UpdateOutcome, Version, Versioned,
};
use arbiter_session::testing::ManualClock;
use arbiter_session::{
    CreateSessionRequest, MemoryStorage, PgStorage, SessionStatus, SessionStore, Storage,
    TaskSession,
};
use chrono::{DateTime, Duration, SubsecRound as _, Utc};
use uuid::Uuid;

/// A storage under test, and a way to read back what it stored.
trait Backend: Storage + Clone {
    /// The kinds and keys of the events stored for `session_id`, oldest first.
    fn events(&self, session_id: Uuid) -> impl Future<Output = Vec<(EventKind, Uuid)>> + Send;
}

impl Backend for MemoryStorage {
    async fn events(&self, session_id: Uuid) -> Vec<(EventKind, Uuid)> {
        MemoryStorage::events(self, session_id)
            .into_iter()
            .map(|e| (e.kind, e.key))
            .collect()
    }
}

impl Backend for PgStorage {
    async fn events(&self, session_id: Uuid) -> Vec<(EventKind, Uuid)> {
        let rows = sqlx::query!(
            "SELECT kind, event_key FROM arbiter.session_events
              WHERE session_id = $1 ORDER BY event_id",
            session_id
        )
        .fetch_all(self.pool())
        .await
        .expect("read events");
        rows.into_iter()
            .map(|row| (kind(&row.kind), row.event_key))
            .collect()
    }
}

fn kind(name: &str) -> EventKind {
    [
        EventKind::Created,
        EventKind::CallAllowed,
        EventKind::BatchAllowed,
        EventKind::Closed,
        EventKind::Expired,
        EventKind::Reconciled,
        EventKind::Denied,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == name)
    .unwrap_or_else(|| panic!("unknown event kind {name}"))
}

/// Runs each named check over both backends.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(arbiter_session::MemoryStorage::new().with_batching(true)).await;
                }
            )*
        }
        mod postgres {
            $(
                #[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
                async fn $check(pool: sqlx::PgPool) {
                    super::$check(arbiter_session::PgStorage::new(pool)).await;
                }
            )*
        }
    };
}

contract!(
    an_inserted_session_loads_as_written,
    an_update_applies_only_at_the_expected_version,
    calls_past_the_budget_are_refused,
    rate_window_calls_past_the_limit_are_refused,
    a_terminal_status_is_final,
    an_event_key_is_stored_once,
    a_batch_gives_each_write_its_own_outcome,
    a_locked_update_decides_on_the_stored_row,
    a_denial_is_recorded_once,
    the_cap_and_the_agent_queries_count_what_is_live,
    tool_calls_are_stored_and_refused_past_their_limit,
);

/// A row whose limited tools are not sorted by name (written with SQL: the library writes
/// them sorted) is refused when read. Sorting it on read would put its counts in another
/// order than its tools in the row, and the next update would credit each count to the
/// wrong tool.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn postgres_a_row_with_unsorted_limited_tools_is_refused(pool: sqlx::PgPool) {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO arbiter.sessions (session_id, agent_id, delegation_chain, declared_intent,
             authorized_tools, authorized_credentials, call_budget, rate_window_secs,
             data_sensitivity_ceiling, created_at, expires_at, limited_tools, tool_limits,
             tool_calls)
         VALUES ($1, $2, '{}', '', '{search,write_file}', '{}', 10, 60, 'public', now(),
                 now() + interval '1 hour', '{write_file,search}', '{1,5}', '{0,0}')",
    )
    .bind(id)
    .bind(Uuid::new_v4())
    .execute(&pool)
    .await
    .expect("insert by hand");
    let loaded = PgStorage::new(pool).load(id).await;
    assert!(
        matches!(&loaded, Err(StorageError::Decode(detail)) if detail.contains("not sorted")),
        "{loaded:?}"
    );
}

/// A row another transaction holds is a conflict at once: the update neither waits for the
/// lock nor writes. This is how a refused statement's lingering lock shows up (a CI run saw
/// `a_terminal_status_is_final` answered `Conflict` where it expected the refusal), and why
/// [`update_refused_by`] tries a conflict again.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn postgres_update_of_a_locked_row_is_a_conflict_at_once(pool: sqlx::PgPool) {
    let storage = PgStorage::new(pool.clone());
    let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
    let id = stored.session.session_id;
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query!(
        "SELECT session_id FROM arbiter.sessions WHERE session_id = $1 FOR UPDATE",
        id
    )
    .fetch_one(&mut *holder)
    .await
    .expect("lock the row");
    let one = after_calls(&stored.session, 1);
    let events = [event(EventKind::CallAllowed, &one)];
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        storage.update(&one, stored.version, &events),
    )
    .await
    .expect("the update does not wait for the lock")
    .expect("update");
    assert_eq!(outcome, UpdateOutcome::Conflict);
    holder.rollback().await.expect("release the row");
    assert_eq!(storage.events(id).await.len(), 1, "nothing was written");
    assert_eq!(
        apply(&storage, &one, stored.version).await,
        stored.version + 1
    );
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A session stored through a store over `storage` (the only public way to make one), with
/// `budget` calls and an optional rate limit, at version 1. Each is created a millisecond
/// after the one before, so their time limits run out in the order they were made.
async fn stored<S: Backend>(
    storage: &S,
    agent: Uuid,
    budget: u64,
    rate_limit: Option<u64>,
) -> Versioned {
    stored_with(storage, agent, budget, rate_limit, None).await
}

/// [`stored`], with a limit of its own for `search` if `search_limit` is given.
async fn stored_with<S: Backend>(
    storage: &S,
    agent: Uuid,
    budget: u64,
    rate_limit: Option<u64>,
    search_limit: Option<u64>,
) -> Versioned {
    static CREATED: AtomicI64 = AtomicI64::new(0);
    let offset = Duration::milliseconds(CREATED.fetch_add(1, Ordering::Relaxed));
    let store = SessionStore::builder(storage.clone())
        .listen_for_changes(false)
        .clock(Arc::new(ManualClock::new(now() + offset)))
        .build();
    let mut req =
        CreateSessionRequest::new(agent, ["search", "fetch"], budget, Duration::minutes(5));
    req.rate_limit_per_minute = rate_limit;
    if let Some(limit) = search_limit {
        req = req.with_tool_limit("search", limit);
    }
    let session = store.create(req).await.expect("create");
    let loaded = storage
        .load(session.session_id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(
        loaded.session, session,
        "storage holds what the store cached"
    );
    loaded
}

/// `session` after `calls` more calls in its window (of `search`, if it is limited).
fn after_calls(session: &TaskSession, calls: u64) -> TaskSession {
    let mut next = session.clone();
    next.calls_made += calls;
    next.rate_window_started_at = Some(next.rate_window_started_at.unwrap_or(session.created_at));
    next.rate_window_calls += calls;
    next.tool_limits = session
        .tool_limits
        .iter()
        .map(|limit| {
            let mut limit = limit.clone();
            if &*limit.tool == "search" {
                limit.calls += calls;
            }
            limit
        })
        .collect();
    next
}

/// The calls of `search` in the stored row of `id`.
async fn search_calls<S: Backend>(storage: &S, id: Uuid) -> u64 {
    let loaded = storage.load(id).await.expect("load").expect("stored");
    loaded
        .session
        .tool_limit("search")
        .expect("search is limited")
        .calls
}

fn with_status(session: &TaskSession, status: SessionStatus) -> TaskSession {
    let mut next = session.clone();
    next.status = status;
    next
}

fn event(kind: EventKind, after: &TaskSession) -> AuditEvent {
    let tools = match kind {
        EventKind::CallAllowed => vec!["search".to_owned()],
        _ => Vec::new(),
    };
    AuditEvent::new(kind, tools, after, now(), Uuid::nil())
}

/// Applies `next` at `expected` and expects `constraint` to refuse it. A conflict is tried
/// again: PostgreSQL reports a refused statement's error before its transaction has rolled
/// back, so right after one refusal the row can still be locked, and an update through
/// another pooled connection skips it (the contract in `src/storage/mod.rs`). Bounded: a
/// conflict that does not clear within a second fails the check.
async fn update_refused_by<S: Backend>(
    storage: &S,
    next: &TaskSession,
    expected: Version,
    events: &[AuditEvent],
    constraint: &str,
) {
    for _ in 0..100 {
        match storage.update(next, expected, events).await {
            Ok(UpdateOutcome::Conflict) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return refused_by(other, constraint),
        }
    }
    panic!("expected a refusal by {constraint}, the update kept conflicting");
}

fn refused_by(result: Result<impl std::fmt::Debug, StorageError>, constraint: &str) {
    match result {
        Err(StorageError::Constraint { name, .. }) if name == constraint => {}
        other => panic!("expected a refusal by {constraint}, got {other:?}"),
    }
}

/// Applies `next` at `expected`, which must succeed; returns the new version.
async fn apply<S: Backend>(storage: &S, next: &TaskSession, expected: Version) -> Version {
    match storage
        .update(next, expected, &[event(EventKind::CallAllowed, next)])
        .await
    {
        Ok(UpdateOutcome::Applied(version)) => version,
        other => panic!("expected the update to apply, got {other:?}"),
    }
}

async fn an_inserted_session_loads_as_written<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 5, Some(3)).await;
    assert_eq!(stored.version, 1);
    assert_eq!(
        storage.events(stored.session.session_id).await.len(),
        1,
        "the insert wrote its created event"
    );
    assert_eq!(storage.load(Uuid::new_v4()).await.expect("load"), None);
    // The same id again is refused by the primary key, and writes nothing.
    let again = event(EventKind::Created, &stored.session);
    refused_by(
        storage.insert(&stored.session, &again).await,
        "sessions_pkey",
    );
    assert_eq!(storage.events(stored.session.session_id).await.len(), 1);
}

async fn an_update_applies_only_at_the_expected_version<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
    let id = stored.session.session_id;
    let one = after_calls(&stored.session, 1);
    let v2 = apply(&storage, &one, stored.version).await;
    assert!(
        v2 > stored.version,
        "every applied update advances the version"
    );
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!((loaded.session.calls_made, loaded.version), (1, v2));

    // The version it was decided from is gone: a conflict, and nothing is written.
    let stale = after_calls(&stored.session, 2);
    let outcome = storage
        .update(
            &stale,
            stored.version,
            &[event(EventKind::CallAllowed, &stale)],
        )
        .await
        .expect("update");
    assert_eq!(outcome, UpdateOutcome::Conflict);
    let mut unknown = stale.clone();
    unknown.session_id = Uuid::new_v4();
    let outcome = storage.update(&unknown, 1, &[]).await.expect("update");
    assert_eq!(
        outcome,
        UpdateOutcome::Conflict,
        "a missing row is a conflict"
    );
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!((loaded.session.calls_made, loaded.version), (1, v2));
    let kinds: Vec<EventKind> = storage.events(id).await.into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, [EventKind::Created, EventKind::CallAllowed]);

    // Several events in one update are stored in the order given.
    let three = after_calls(&one, 2);
    let events = [
        event(EventKind::CallAllowed, &after_calls(&one, 1)),
        event(EventKind::CallAllowed, &three),
    ];
    let outcome = storage.update(&three, v2, &events).await.expect("update");
    assert!(matches!(outcome, UpdateOutcome::Applied(v3) if v3 > v2));
    let keys: Vec<Uuid> = storage.events(id).await.into_iter().map(|e| e.1).collect();
    assert_eq!(keys[2..], [events[0].key, events[1].key]);
}

async fn calls_past_the_budget_are_refused<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 2, None).await;
    let over = after_calls(&stored.session, 3);
    update_refused_by(
        &storage,
        &over,
        stored.version,
        &[event(EventKind::CallAllowed, &over)],
        "sessions_calls_within_budget",
    )
    .await;
    let loaded = storage
        .load(stored.session.session_id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(loaded, stored, "a refused write writes nothing");
    assert_eq!(storage.events(stored.session.session_id).await.len(), 1);
}

async fn rate_window_calls_past_the_limit_are_refused<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 10, Some(2)).await;
    let full = after_calls(&stored.session, 2);
    let version = apply(&storage, &full, stored.version).await;
    let over = after_calls(&full, 1);
    update_refused_by(
        &storage,
        &over,
        version,
        &[event(EventKind::CallAllowed, &over)],
        "sessions_rate_calls_bounded",
    )
    .await;
    let loaded = storage
        .load(stored.session.session_id)
        .await
        .expect("load")
        .expect("stored");
    assert_eq!(
        (loaded.session.rate_window_calls, loaded.version),
        (2, version)
    );
}

async fn a_terminal_status_is_final<S: Backend>(storage: S) {
    for terminal in [SessionStatus::Closed, SessionStatus::Expired] {
        let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
        let ended = with_status(&stored.session, terminal);
        let version = apply(&storage, &ended, stored.version).await;
        for other in [
            SessionStatus::Active,
            SessionStatus::Closed,
            SessionStatus::Expired,
        ] {
            if other == terminal {
                continue;
            }
            let next = with_status(&ended, other);
            update_refused_by(&storage, &next, version, &[], "sessions_status_monotonic").await;
        }
        let loaded = storage
            .load(stored.session.session_id)
            .await
            .expect("load")
            .expect("stored");
        assert_eq!(loaded.session.status, terminal);
    }
}

async fn an_event_key_is_stored_once<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
    let id = stored.session.session_id;
    let one = after_calls(&stored.session, 1);
    let first = event(EventKind::CallAllowed, &one);
    let outcome = storage
        .update(&one, stored.version, std::slice::from_ref(&first))
        .await
        .expect("update");
    let UpdateOutcome::Applied(version) = outcome else {
        panic!("expected the update to apply, got {outcome:?}");
    };
    // The same event again (a retried write whose first attempt committed): refused whole.
    let two = after_calls(&one, 1);
    update_refused_by(
        &storage,
        &two,
        version,
        &[first],
        "session_events_key_unique",
    )
    .await;
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!((loaded.session.calls_made, loaded.version), (1, version));
    assert_eq!(storage.events(id).await.len(), 2);
}

async fn a_batch_gives_each_write_its_own_outcome<S: Backend>(storage: S) {
    let agent = Uuid::new_v4();
    let a = stored(&storage, agent, 5, None).await;
    let b = stored(&storage, agent, 5, None).await;
    let c = stored(&storage, agent, 5, None).await;
    let (a1, b1, c1) = (
        after_calls(&a.session, 1),
        after_calls(&b.session, 1),
        after_calls(&c.session, 1),
    );
    let events: Vec<[AuditEvent; 1]> = [&a1, &b1, &c1, &a1]
        .into_iter()
        .map(|s| [event(EventKind::CallAllowed, s)])
        .collect();
    let batch = [
        BatchUpdate {
            session: &a1,
            expected: a.version,
            events: &events[0],
        },
        // Decided from a version that is not stored.
        BatchUpdate {
            session: &b1,
            expected: b.version + 1,
            events: &events[1],
        },
        BatchUpdate {
            session: &c1,
            expected: c.version,
            events: &events[2],
        },
        // The same session twice: the second names a version the first replaced.
        BatchUpdate {
            session: &a1,
            expected: a.version,
            events: &events[3],
        },
    ];
    let outcomes = storage.update_many(&batch).await.expect("batch");
    assert_eq!(outcomes.len(), 4, "one outcome per write, in order");
    assert!(matches!(outcomes[0], UpdateOutcome::Applied(v) if v > a.version));
    assert_eq!(outcomes[1], UpdateOutcome::Conflict);
    assert!(matches!(outcomes[2], UpdateOutcome::Applied(v) if v > c.version));
    assert_eq!(outcomes[3], UpdateOutcome::Conflict);
    let calls = |v: Option<Versioned>| v.expect("stored").session.calls_made;
    assert_eq!(
        calls(storage.load(a.session.session_id).await.expect("load")),
        1
    );
    assert_eq!(
        calls(storage.load(b.session.session_id).await.expect("load")),
        0
    );
    assert_eq!(
        calls(storage.load(c.session.session_id).await.expect("load")),
        1
    );
    assert_eq!(storage.events(a.session.session_id).await.len(), 2);
    assert_eq!(storage.events(b.session.session_id).await.len(), 1);
}

async fn a_locked_update_decides_on_the_stored_row<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
    let id = stored.session.session_id;
    let one = after_calls(&stored.session, 1);
    let landed = event(EventKind::CallAllowed, &one);
    let outcome = storage
        .update(&one, stored.version, std::slice::from_ref(&landed))
        .await
        .expect("update");
    let UpdateOutcome::Applied(version) = outcome else {
        panic!("expected the update to apply, got {outcome:?}");
    };

    // `decide` sees the stored row and how many probed keys are stored; what it returns
    // is written at that row's version.
    let probe = [landed.key, Uuid::new_v4()];
    let mut seen = None;
    let outcome = storage
        .update_locked(id, &probe, LockWait::Wait, |fresh, landed| {
            let next = after_calls(&fresh.session, 1);
            seen = Some((fresh.version, fresh.session.calls_made, landed));
            let events = vec![event(EventKind::CallAllowed, &next)];
            Some((next, events))
        })
        .await
        .expect("locked update");
    assert_eq!(seen, Some((version, 1, 1)));
    let LockedUpdate::Applied(written) = outcome else {
        panic!("expected the decision to be written, got {outcome:?}");
    };
    assert!(written > version);
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!((loaded.session.calls_made, loaded.version), (2, written));

    // Nothing to write: declined, and nothing changes.
    let outcome = storage
        .update_locked(id, &[], LockWait::NoWait, |_, _| None)
        .await
        .expect("locked update");
    assert_eq!(outcome, LockedUpdate::Declined);
    assert_eq!(storage.load(id).await.expect("load"), Some(loaded));

    // No such session: missing, and `decide` is not called.
    let mut called = false;
    let outcome = storage
        .update_locked(Uuid::new_v4(), &[], LockWait::Wait, |_, _| {
            called = true;
            None
        })
        .await
        .expect("locked update");
    assert_eq!(outcome, LockedUpdate::Missing);
    assert!(!called);
}

async fn a_denial_is_recorded_once<S: Backend>(storage: S) {
    let stored = stored(&storage, Uuid::new_v4(), 5, None).await;
    let id = stored.session.session_id;
    let denial = Denial::new(
        DenialReason::Tool,
        &["rm"],
        &stored.session,
        now(),
        Uuid::nil(),
    );
    let other = Denial::new(
        DenialReason::Rate,
        &["search"],
        &stored.session,
        now(),
        Uuid::nil(),
    );
    storage
        .record_denials(&[denial.clone(), other.clone()])
        .await
        .expect("record");
    // A retried batch whose first attempt committed unseen: each denial stays recorded once.
    storage
        .record_denials(&[denial.clone(), other.clone()])
        .await
        .expect("record again");
    let events = storage.events(id).await;
    let denied: Vec<Uuid> = events
        .iter()
        .filter(|e| e.0 == EventKind::Denied)
        .map(|e| e.1)
        .collect();
    assert_eq!(denied, [denial.event.key, other.event.key]);
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!(loaded, stored, "a denial changes no session");
}

async fn the_cap_and_the_agent_queries_count_what_is_live<S: Backend>(storage: S) {
    let agent = Uuid::new_v4();
    let open = stored(&storage, agent, 5, None).await;
    let closed = stored(&storage, agent, 5, None).await;
    apply(
        &storage,
        &with_status(&closed.session, SessionStatus::Closed),
        closed.version,
    )
    .await;
    let due = stored(&storage, agent, 5, None).await;
    stored(&storage, Uuid::new_v4(), 5, None).await;

    // Before any time limit: two live (the closed one is not).
    let at = now();
    assert_eq!(
        storage
            .count_live_for_agent(agent, at)
            .await
            .expect("count"),
        2
    );
    let mut active = storage.active_for_agent(agent).await.expect("active");
    active.sort();
    let mut expected = vec![open.session.session_id, due.session.session_id];
    expected.sort();
    assert_eq!(active, expected);
    assert!(
        storage
            .due_for_expiry(at, 10)
            .await
            .expect("due")
            .is_empty()
    );

    // Past the time limit of every session: none is live, the active ones are due, earliest
    // first and at most `limit` of them, and still listed as active until marked.
    let later = at + Duration::minutes(10);
    assert_eq!(
        storage
            .count_live_for_agent(agent, later)
            .await
            .expect("count"),
        0
    );
    let due_now = storage.due_for_expiry(later, 10).await.expect("due");
    assert_eq!(due_now.len(), 3, "every active session of both agents");
    assert_eq!(due_now[0], open.session.session_id, "earliest first");
    assert_eq!(
        storage.due_for_expiry(later, 1).await.expect("due").len(),
        1
    );
    assert_eq!(
        storage.active_for_agent(agent).await.expect("active").len(),
        2
    );

    // The cap counts live sessions only, and writes nothing at the cap.
    let req = CreateSessionRequest::new(agent, ["search"], 5, Duration::minutes(5));
    let store = SessionStore::builder(storage.clone())
        .listen_for_changes(false)
        .build();
    let at_cap = store.create_if_under_cap(req.clone(), 2).await;
    assert!(at_cap.is_err(), "{at_cap:?}");
    let candidate = store.create(req).await.expect("create");
    let mut second = candidate.clone();
    second.session_id = Uuid::new_v4();
    let created = event(EventKind::Created, &second);
    let outcome = storage
        .insert_if_under_cap(&second, &created, 10, now())
        .await
        .expect("capped insert");
    assert!(matches!(outcome, CapOutcome::Created(1)), "{outcome:?}");
    let another = {
        let mut s = second.clone();
        s.session_id = Uuid::new_v4();
        s
    };
    let outcome = storage
        .insert_if_under_cap(&another, &event(EventKind::Created, &another), 4, now())
        .await
        .expect("capped insert");
    assert_eq!(outcome, CapOutcome::AtCap { current: 4 });
    assert_eq!(storage.load(another.session_id).await.expect("load"), None);
}

async fn tool_calls_are_stored_and_refused_past_their_limit<S: Backend>(storage: S) {
    let agent = Uuid::new_v4();
    let limited = stored_with(&storage, agent, 10, None, Some(2)).await;
    let other = stored(&storage, agent, 10, None).await;
    let id = limited.session.session_id;
    assert_eq!(search_calls(&storage, id).await, 0);

    // One write, then a batch: both carry the tool's calls.
    let one = after_calls(&limited.session, 1);
    let v2 = apply(&storage, &one, limited.version).await;
    assert_eq!(search_calls(&storage, id).await, 1);
    let two = after_calls(&one, 1);
    let other1 = after_calls(&other.session, 1);
    let events = [
        [event(EventKind::CallAllowed, &two)],
        [event(EventKind::CallAllowed, &other1)],
    ];
    let batch = [
        BatchUpdate {
            session: &two,
            expected: v2,
            events: &events[0],
        },
        BatchUpdate {
            session: &other1,
            expected: other.version,
            events: &events[1],
        },
    ];
    let outcomes = storage.update_many(&batch).await.expect("batch");
    let Some(&UpdateOutcome::Applied(v3)) = outcomes.first() else {
        panic!("the batch applies: {outcomes:?}");
    };
    assert_eq!(search_calls(&storage, id).await, 2);

    // A third call of the tool is past its limit, with room in the budget.
    let over = after_calls(&two, 1);
    update_refused_by(
        &storage,
        &over,
        v3,
        &[event(EventKind::CallAllowed, &over)],
        "sessions_tool_calls_within_limits",
    )
    .await;
    let loaded = storage.load(id).await.expect("load").expect("stored");
    assert_eq!(
        (loaded.version, loaded.session.calls_made),
        (v3, 2),
        "nothing written"
    );
    assert_eq!(search_calls(&storage, id).await, 2);
}
