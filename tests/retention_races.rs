//! Retention beside everything else that runs at the same time: a purge with a reader in the
//! way, a late event committed while a purge decides, a rollup of a day the purge deletes
//! from. Each race is stepped explicitly over two or three connections (the audit trail
//! under concurrency, defects 1, 2 and 4).

mod common;

use std::sync::Arc;
use std::time::Duration;

use arbiter_session::operator::chain;
use arbiter_session::operator::retention::{self, EventRetention};
use arbiter_session::testing::ManualClock;
use arbiter_session::{PgStorage, SessionStore};
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// A store whose time is `at` and which runs no upkeep (no rollup but the test's own).
fn store_at(pool: &PgPool, at: DateTime<Utc>) -> (SessionStore, ManualClock) {
    let clock = ManualClock::new(at);
    let store = SessionStore::builder(PgStorage::new(pool.clone()))
        .clock(Arc::new(clock.clone()))
        .maintenance_interval(None)
        .build();
    (store, clock)
}

/// Ten days ago, with its partition.
async fn old_day(pool: &PgPool) -> NaiveDate {
    let day = Utc::now().date_naive() - chrono::Days::new(10);
    sqlx::query_scalar!("SELECT arbiter.create_event_partition($1)", day)
        .fetch_one(pool)
        .await
        .expect("create the old day's partition");
    day
}

/// A session of `agent` created at 10:00 on `day` with a call, a denied call and its close
/// (four events, all in `day`'s partition); its id.
async fn ended_session(pool: &PgPool, day: NaiveDate, agent: Uuid) -> Uuid {
    let ten = day.and_hms_opt(10, 0, 0).expect("10:00 exists");
    let (store, clock) = store_at(pool, ten.and_utc());
    let id = store
        .create(common::request(agent, &["search"], 5))
        .await
        .expect("create")
        .session_id;
    clock.advance(chrono::Duration::minutes(1));
    store
        .use_session(id, "search", Some(agent))
        .await
        .expect("a call");
    store
        .use_session(id, "rm", Some(agent))
        .await
        .expect_err("rm is not authorized");
    store.close(id).await.expect("close");
    assert!(store.shutdown(Duration::from_secs(5)).await.is_clean());
    id
}

/// The database's clock.
async fn now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(pool)
        .await
        .expect("the database's clock")
}

/// Backends of this database waiting for a lock now.
async fn waiting_on_a_lock(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "waiting!" FROM pg_stat_activity
            WHERE datname = current_database() AND wait_event_type = 'Lock'"#
    )
    .fetch_one(pool)
    .await
    .expect("pg_stat_activity")
}

/// Waits until `task` has finished or some backend waits for a lock (bounded).
async fn finished_or_waiting<T>(pool: &PgPool, task: &tokio::task::JoinHandle<T>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !task.is_finished() && waiting_on_a_lock(pool).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither finished nor waiting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A purge of everything that ended before `cutoff`, events too, in a task of its own.
fn purge_in_background(
    pool: &PgPool,
    cutoff: DateTime<Utc>,
) -> tokio::task::JoinHandle<retention::PurgeReport> {
    let pool = pool.clone();
    tokio::spawn(async move {
        retention::purge_before(&pool, cutoff, EventRetention::Delete)
            .await
            .expect("purge")
    })
}

/// Records a denial of `session` (of `day`) now, in `conn`'s transaction, as a gateway that
/// still caches the session would: in the partition of the session's day.
async fn late_denial(conn: &mut sqlx::PgConnection, session: Uuid, agent: Uuid, day: NaiveDate) {
    sqlx::query!(
        "INSERT INTO arbiter.session_events (event_key, session_id, agent_id, kind, tools,
             calls_made, rate_window_calls, status, occurred_at, instance_id, reason, session_day)
         VALUES (gen_random_uuid(), $1, $2, 'denied', '{search}', 1, 1, 'closed', now(),
             gen_random_uuid(), 'closed', $3)",
        session,
        agent,
        day
    )
    .execute(conn)
    .await
    .expect("a late denial");
}

async fn partition_exists(pool: &PgPool, day: NaiveDate) -> bool {
    let name = format!("arbiter.session_events_{}", day.format("%Y%m%d"));
    sqlx::query_scalar!(r#"SELECT to_regclass($1) IS NOT NULL AS "exists!""#, name)
        .fetch_one(pool)
        .await
        .expect("to_regclass")
}

/// Defect 1. A purge that drops a partition while a reader holds the events (an export, a
/// report) must not make a gateway's write wait behind its lock request: the write is
/// answered within a small bound, the purge keeps the partition for a later run, and the
/// next purge, with no reader in the way, drops it.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_purge_with_a_reader_in_the_way_never_holds_up_a_write(pool: PgPool) {
    let day = old_day(&pool).await;
    ended_session(&pool, day, Uuid::new_v4()).await;
    let agent = Uuid::new_v4();
    let (live, _) = store_at(&pool, now(&pool).await);
    let id = live
        .create(common::request(agent, &["search"], 100))
        .await
        .unwrap()
        .session_id;
    live.use_session(id, "search", Some(agent)).await.unwrap();

    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut reader = pool.begin().await.unwrap();
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.session_events"#)
        .fetch_one(&mut *reader)
        .await
        .unwrap();
    let purge = purge_in_background(&pool, now(&pool).await);
    finished_or_waiting(&pool, &purge).await;

    let written = tokio::time::timeout(
        Duration::from_secs(2),
        live.use_session(id, "search", Some(agent)),
    )
    .await;
    assert!(
        matches!(written, Ok(Ok(_))),
        "a write waited behind the purge: {written:?}"
    );
    reader.commit().await.unwrap();
    let report = purge.await.unwrap();
    assert_eq!(report.sessions, 1);
    if partition_exists(&pool, day).await {
        let again = retention::purge_before(&pool, now(&pool).await, EventRetention::Delete)
            .await
            .unwrap();
        assert_eq!(again.events, 4);
    }
    assert!(!partition_exists(&pool, day).await);
    assert!(live.shutdown(Duration::from_secs(5)).await.is_clean());
}

/// Defect 2, the drop path. A denial committed while the purge decides whether the
/// partition can go must never be dropped with it.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_purge_never_drops_an_event_committed_while_it_decides(pool: PgPool) {
    let day = old_day(&pool).await;
    let agent = Uuid::new_v4();
    let session = ended_session(&pool, day, agent).await;
    let cutoff = now(&pool).await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut gateway = pool.begin().await.unwrap();
    late_denial(&mut gateway, session, agent, day).await;
    let purge = purge_in_background(&pool, cutoff);
    finished_or_waiting(&pool, &purge).await;
    gateway.commit().await.unwrap();
    purge.await.unwrap();

    assert_eq!(
        common::event_kinds(&pool, session).await.len(),
        5,
        "the late denial and the trail it chains to are kept"
    );
    let verdict = chain::verify_audit_chain(&pool, session).await.unwrap();
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// Defect 2, the row path. A partition that cannot go whole (a session of its day is still
/// stored) loses its purged sessions' events row by row; a denial committed meanwhile must
/// never be left chained to a deleted link (`verify` would report a tampered trail that
/// no one touched).
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_purge_never_cuts_a_chain_a_late_denial_extends(pool: PgPool) {
    let day = old_day(&pool).await;
    let agent = Uuid::new_v4();
    let purged = ended_session(&pool, day, agent).await;
    let (store, _) = store_at(&pool, day.and_hms_opt(11, 0, 0).unwrap().and_utc());
    let kept = store
        .create(common::request(agent, &["search"], 5))
        .await
        .unwrap()
        .session_id;
    let cutoff = now(&pool).await;
    // Closed after the cutoff: it stays, and so does its day's partition.
    sqlx::query!(
        "UPDATE arbiter.sessions SET status = 'closed' WHERE session_id = $1",
        kept
    )
    .execute(&pool)
    .await
    .unwrap();

    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut gateway = pool.begin().await.unwrap();
    late_denial(&mut gateway, purged, agent, day).await;
    let purge = purge_in_background(&pool, cutoff);
    finished_or_waiting(&pool, &purge).await;
    gateway.commit().await.unwrap();
    purge.await.unwrap();

    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact(), "{:?}", summary.broken);
    assert!(partition_exists(&pool, day).await);
}

/// Defect 4. A rollup of a day not sealed yet counts on a snapshot; a purge that deletes
/// events of that day meanwhile must not leave the day sealed with counts of events that
/// no longer exist: the views answer exactly what the raw events say.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_purge_beside_a_rollup_of_its_day_leaves_the_reports_exact(pool: PgPool) {
    let day = old_day(&pool).await;
    let agent = Uuid::new_v4();
    ended_session(&pool, day, agent).await;
    // A session of the day that stays: the purge deletes row by row.
    let (store, _) = store_at(&pool, day.and_hms_opt(11, 0, 0).unwrap().and_utc());
    let kept = store
        .create(common::request(agent, &["search"], 5))
        .await
        .unwrap()
        .session_id;
    let cutoff = now(&pool).await;
    sqlx::query!(
        "UPDATE arbiter.sessions SET status = 'closed' WHERE session_id = $1",
        kept
    )
    .execute(&pool)
    .await
    .unwrap();
    // Inserted late, the events unsealed their day; the rollup below is its first count.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut rollup = pool.begin().await.unwrap();
    let counted = sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", day)
        .fetch_one(&mut *rollup)
        .await
        .unwrap();
    assert_eq!(counted, Some(5));
    let purge = purge_in_background(&pool, cutoff);
    finished_or_waiting(&pool, &purge).await;
    rollup.commit().await.unwrap();
    purge.await.unwrap();

    let counts = sqlx::query!(
        r#"SELECT (SELECT coalesce(sum(calls_allowed + calls_denied), 0)::bigint
                     FROM arbiter.agent_daily_activity WHERE day = $1) AS "view!",
                  (SELECT count(*) FILTER (WHERE kind IN ('call_allowed', 'batch_allowed', 'denied'))
                     FROM arbiter.session_events
                    WHERE occurred_at >= $1::date AND occurred_at < $1::date + 1) AS "raw!""#,
        day
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        counts.view, counts.raw,
        "the view counts what the events hold"
    );
}

/// The purge's SQL procedure (for psql and pg_cron) runs the same steps, each committed
/// before the next, and answers what it deleted.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_sql_procedure_purges_step_by_step(pool: PgPool) {
    let day = old_day(&pool).await;
    ended_session(&pool, day, Uuid::new_v4()).await;
    let cutoff = now(&pool).await;
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CALL arbiter.purge_before('{}', true)",
        cutoff.to_rfc3339()
    )))
    .fetch_one(&pool)
    .await
    .expect("the procedure runs");
    use sqlx::Row as _;
    let deleted: (i64, i64) = (row.get("sessions_deleted"), row.get("events_deleted"));
    assert_eq!(deleted, (1, 4));
    assert!(!partition_exists(&pool, day).await);
}
