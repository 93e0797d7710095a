//! Retention: what a purge deletes (ended sessions, their events only when asked), and
//! that nothing else deletes from the audit trail. Purges racing writers, rollups and
//! late events are in `tests/retention_races.rs`.

use crate::common;
use crate::common::known_dataset;
use arbiter_session::operator::report::{self, ReportFilter};
use arbiter_session::operator::retention::{self, EventRetention, PurgeError};
use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn purge_deletes_only_ended_sessions_and_events_only_when_asked(pool: PgPool) {
    let data = known_dataset(&pool).await;
    // A live session: created now, ten minutes long.
    let clock = arbiter_session::testing::ManualClock::starting_now();
    let live = common::store(&pool, &clock)
        .create(common::request(Uuid::new_v4(), &["x"], 1))
        .await
        .unwrap()
        .session_id;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let events_before = count("SELECT count(*) FROM arbiter.session_events").await;

    let future = retention::purge_before(
        &pool,
        Utc::now() + chrono::Duration::hours(1),
        EventRetention::Delete,
    )
    .await;
    assert!(
        matches!(future, Err(PurgeError::CutoffInFuture { .. })),
        "{future:?}"
    );

    // Everything of the data set ended before now; the live session did not.
    let now = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    let kept = retention::purge_before(&pool, now, EventRetention::Keep)
        .await
        .unwrap();
    assert_eq!((kept.sessions, kept.events), (3, 0));
    let ids = sqlx::query_scalar!("SELECT session_id FROM arbiter.sessions")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![live]);
    assert_eq!(
        count("SELECT count(*) FROM arbiter.session_events").await,
        events_before
    );
    // The activity views still answer from the kept trail (three agent-days of the data
    // set, and today's of the live session's agent).
    assert_eq!(
        report::agent_activity(&pool, ReportFilter::default())
            .await
            .unwrap()
            .len(),
        4
    );

    let deleted = retention::purge_before(&pool, now, EventRetention::Delete)
        .await
        .unwrap();
    assert_eq!(deleted.sessions, 0);
    let live_events = count("SELECT count(*) FROM arbiter.session_events WHERE session_id NOT IN (SELECT session_id FROM arbiter.sessions)").await;
    assert_eq!(live_events, 0);
    assert_eq!(
        u64::try_from(events_before).unwrap() - deleted.events,
        u64::try_from(count("SELECT count(*) FROM arbiter.session_events").await).unwrap()
    );
    // The data set wrote 4 + 2 + 3 state-changing events and 4 denials.
    assert_eq!(deleted.events, 13);
    let live_trail = report::session_events(&pool, live).await.unwrap();
    assert_eq!(live_trail.len(), 1);
    for gone in [data.s1, data.s2, data.s3] {
        assert!(
            report::session_events(&pool, gone)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// A transaction with purge_before's switches set by hand (cutoff now, events on).
async fn purge_switches_on(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query!(
        "SELECT set_config('arbiter.purge_cutoff', now()::text, true) AS cutoff,
                set_config('arbiter.purge_events', 'on', true) AS events"
    )
    .fetch_one(&mut *tx)
    .await
    .expect("set the purge switches");
    tx
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn deletion_outside_purge_is_refused(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let clock = arbiter_session::testing::ManualClock::starting_now();
    let live = common::store(&pool, &clock)
        .create(common::request(Uuid::new_v4(), &["x"], 1))
        .await
        .unwrap()
        .session_id;
    for sql in [
        format!(
            "DELETE FROM arbiter.sessions WHERE session_id = '{}'",
            data.s1
        ),
        format!(
            "DELETE FROM arbiter.session_events WHERE session_id = '{}'",
            data.s1
        ),
        "TRUNCATE arbiter.sessions CASCADE".to_owned(),
        "TRUNCATE arbiter.session_events".to_owned(),
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .expect_err(&sql);
        assert!(
            err.to_string().contains("purge_before") || err.to_string().contains("append-only"),
            "{sql}: {err}"
        );
    }
    // Setting purge_before's switches by hand allows only what a purge would delete: never
    // a live session, never an event of a session that still exists.
    let mut tx = purge_switches_on(&pool).await;
    let err = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM arbiter.sessions WHERE session_id = '{live}'"
    )))
    .execute(&mut *tx)
    .await
    .expect_err("a live session is never deleted");
    assert!(err.to_string().contains("once it is over"), "{err}");
    drop(tx);
    let mut tx = purge_switches_on(&pool).await;
    let err = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DELETE FROM arbiter.session_events WHERE session_id = '{}'",
        data.s1
    )))
    .execute(&mut *tx)
    .await
    .expect_err("events of an existing session stay");
    assert!(err.to_string().contains("append-only"), "{err}");
    drop(tx);
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM arbiter.sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sessions, 4);
}
