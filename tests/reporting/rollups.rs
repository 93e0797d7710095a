//! The rollups behind the reports: the rollup-backed views answer exactly what the raw
//! events do (through late events, purges and concurrent writers), a day's rollup and its
//! inserts wait for each other, today's rollup, each session's totals, and what the
//! rollup leaves in today's partition for the reports' raw read.

use crate::common;
use crate::common::reports::{day, roll_up_all, store_without_upkeep, views_against_raw};
use crate::common::{AGENT_A, AGENT_B, known_dataset};
use arbiter_session::operator::retention::{self, EventRetention};
use arbiter_session::operator::rollup;
use chrono::{NaiveDate, Utc};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

/// The sealed days through `last` and their events.
async fn sealed_days(pool: &PgPool, last: NaiveDate) -> Vec<(NaiveDate, i64)> {
    sqlx::query!(
        "SELECT day, events FROM arbiter.rollup_days WHERE sealed AND day <= $1 ORDER BY day",
        last
    )
    .fetch_all(pool)
    .await
    .expect("sealed days")
    .into_iter()
    .map(|r| (r.day, r.events))
    .collect()
}

/// Rows of the rollup tables for a day (agents, tools, reasons, sessions).
async fn rollup_rows(pool: &PgPool, d: NaiveDate) -> (i64, i64, i64, i64) {
    let row = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM arbiter.agent_day_rollup WHERE day = $1) AS "agents!",
                  (SELECT count(*) FROM arbiter.tool_day_rollup WHERE day = $1) AS "tools!",
                  (SELECT count(*) FROM arbiter.denial_day_rollup WHERE day = $1) AS "reasons!",
                  (SELECT count(*) FROM arbiter.session_day_rollup WHERE day = $1) AS "sessions!""#,
        d
    )
    .fetch_one(pool)
    .await
    .expect("rollup rows");
    (row.agents, row.tools, row.reasons, row.sessions)
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn rollups_answer_exactly_what_the_raw_events_do(pool: PgPool) {
    let data = known_dataset(&pool).await;
    // The data set's store may have rolled up some days with its upkeep while it wrote;
    // the views are exact whatever it did.
    let before = views_against_raw(&pool).await;
    assert_eq!(before, [(0, 3), (0, 5), (0, 4), (0, 3)]);

    roll_up_all(&pool).await;
    // Day 1: S1's created, 3 calls, denial, closed; day 2: S2's created, 2 denials, call,
    // S3's created, call, closed, denial.
    assert_eq!(
        sealed_days(&pool, day(2)).await,
        vec![(day(1), 5), (day(2), 8)]
    );
    let today = Utc::now().date_naive();
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));
    // The data set's days now come from the rollup tables alone, and still match.
    assert_eq!(rollup_rows(&pool, day(1)).await, (1, 2, 1, 1));
    assert_eq!(rollup_rows(&pool, day(2)).await, (2, 3, 3, 2));
    assert_eq!(views_against_raw(&pool).await, before);
    assert!(roll_up_all(&pool).await.is_empty());

    // A late event (a denial on a closed session, occurring on day 2) sends day 2 back to
    // the raw events until the next rollup; day 1 stays rolled up.
    let clock =
        arbiter_session::testing::ManualClock::new(day(2).and_hms_opt(13, 0, 0).unwrap().and_utc());
    let store = store_without_upkeep(&pool, &clock);
    store
        .use_session(data.s3, "fetch", Some(AGENT_B))
        .await
        .expect_err("closed");
    assert_eq!(
        store
            .shutdown(Duration::from_secs(5))
            .await
            .unrecorded_denials,
        0
    );
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(day(2)));
    let late = views_against_raw(&pool).await;
    assert_eq!(late.map(|(off, _)| off), [0, 0, 0, 0]);
    let rolled = roll_up_all(&pool).await;
    assert_eq!(rolled.first().map(|r| r.day), Some(day(2)));
    assert_eq!(
        sealed_days(&pool, day(2)).await,
        vec![(day(1), 5), (day(2), 9)]
    );
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));
    assert_eq!(views_against_raw(&pool).await, late);
    assert_eq!(session_totals_off(&pool).await, 0);

    // Retention counts again the days it removed events of. The data set goes; a session
    // of day 2 that ended after the cutoff stays, in day 2's rollup.
    let cutoff = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    let agent = Uuid::new_v4();
    clock.set(day(2).and_hms_opt(14, 0, 0).unwrap().and_utc());
    let store = store_without_upkeep(&pool, &clock);
    let kept = store
        .create(common::request(agent, &["search"], 2))
        .await
        .unwrap()
        .session_id;
    store
        .use_session(kept, "search", Some(agent))
        .await
        .unwrap();
    store.close(kept).await.unwrap();
    assert!(
        store
            .shutdown(Duration::from_secs(5))
            .await
            .unflushed
            .is_empty()
    );
    roll_up_all(&pool).await;
    assert_eq!(rollup_rows(&pool, day(2)).await, (3, 4, 3, 3));

    let purged = retention::purge_before(&pool, cutoff, EventRetention::Delete)
        .await
        .unwrap();
    // The data set's 13 events and the late denial.
    assert_eq!((purged.sessions, purged.events), (3, 14));
    assert_eq!(rollup_rows(&pool, day(1)).await, (0, 0, 0, 0));
    assert_eq!(rollup_rows(&pool, day(2)).await, (1, 1, 0, 1));
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));
    assert_eq!(
        views_against_raw(&pool).await,
        [(0, 1), (0, 1), (0, 0), (0, 1)]
    );
    assert_eq!(session_totals_off(&pool).await, 0);
}

/// Stored sessions whose row of `arbiter.session_rollup` is not exactly the totals of their
/// rows of `arbiter.session_day_rollup` with their creation day, or is missing, or is there
/// without rows (migration `20261205000011`): 0 when its invariant holds.
async fn session_totals_off(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(
        r#"WITH expected AS (
               SELECT r.session_id, (s.created_at AT TIME ZONE 'UTC')::date AS session_day,
                      sum(r.denials)::bigint AS denials, min(r.closed_at) AS closed_at,
                      max(r.day) AS last_day
                 FROM arbiter.session_day_rollup r
                 JOIN arbiter.sessions s ON s.session_id = r.session_id
                GROUP BY r.session_id, s.created_at
           ), kept AS (
               SELECT t.session_id, t.session_day, t.denials, t.closed_at, t.last_day
                 FROM arbiter.session_rollup t
                 JOIN arbiter.sessions s ON s.session_id = t.session_id
           )
           SELECT count(*) AS "off!"
             FROM ((SELECT * FROM expected EXCEPT ALL SELECT * FROM kept)
                   UNION ALL (SELECT * FROM kept EXCEPT ALL SELECT * FROM expected)) d"#
    )
    .fetch_one(pool)
    .await
    .expect("session totals")
}

/// A purge that keeps the events keeps their day rows too, but not the totals of the
/// sessions it deleted (docs/reporting.md, "Rollups").
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_purge_removes_the_totals_of_the_sessions_it_deleted(pool: PgPool) {
    known_dataset(&pool).await;
    roll_up_all(&pool).await;
    let totals = || {
        sqlx::query_scalar!(r#"SELECT count(*) AS "count!" FROM arbiter.session_rollup"#)
            .fetch_one(&pool)
    };
    // S1, S2 and S3 each had a denial or a close.
    assert_eq!(totals().await.unwrap(), 3);
    let now = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    let purged = retention::purge_before(&pool, now, EventRetention::Keep)
        .await
        .unwrap();
    assert_eq!((purged.sessions, purged.events), (3, 0));
    assert_eq!(rollup_rows(&pool, day(2)).await.3, 2);
    assert_eq!(totals().await.unwrap(), 0);
}

/// A session's totals over two days stay exact when the two days are rolled up at once:
/// the second rollup waits for the first's totals, instead of writing totals that miss
/// its day. (Both days are sealed first: a day is counted for the first time only once
/// every day before it is sealed, so two days are counted at once when they are counted
/// again, as after late events.)
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn session_totals_stay_exact_when_two_of_its_days_roll_up_at_once(pool: PgPool) {
    // A session across midnight two days ago: a denial on each day, closed on the second.
    let yesterday = Utc::now().date_naive() - chrono::Days::new(1);
    let before = yesterday - chrono::Days::new(1);
    let clock = arbiter_session::testing::ManualClock::new(
        before.and_hms_opt(23, 59, 58).unwrap().and_utc(),
    );
    let store = store_without_upkeep(&pool, &clock);
    let id = store
        .create(common::request(AGENT_A, &["search"], 5))
        .await
        .expect("create")
        .session_id;
    store
        .use_session(id, "rm", Some(AGENT_A))
        .await
        .expect_err("rm is not authorized");
    clock.set(yesterday.and_hms_opt(0, 0, 2).unwrap().and_utc());
    store
        .use_session(id, "rm", Some(AGENT_A))
        .await
        .expect_err("rm is not authorized");
    store.close(id).await.expect("close");
    assert_eq!(
        store
            .shutdown(Duration::from_secs(5))
            .await
            .unrecorded_denials,
        0
    );

    roll_up_all(&pool).await;
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut first = pool.begin().await.unwrap();
    let counted = sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", before)
        .fetch_one(&mut *first)
        .await
        .unwrap();
    assert_eq!(counted, Some(2));
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", yesterday)
                .fetch_one(&pool)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second day's totals wait for the first's"
    );
    first.commit().await.unwrap();
    assert_eq!(second.await.unwrap().unwrap(), Some(2));

    let totals = sqlx::query!(
        "SELECT denials, closed_at, last_day FROM arbiter.session_rollup WHERE session_id = $1",
        id
    )
    .fetch_one(&pool)
    .await
    .expect("the session's totals");
    assert_eq!(totals.denials, 2);
    assert_eq!(
        totals.closed_at,
        Some(yesterday.and_hms_opt(0, 0, 2).unwrap().and_utc())
    );
    assert_eq!(totals.last_day, yesterday);
    assert_eq!(session_totals_off(&pool).await, 0);
    roll_up_all(&pool).await;
    assert_eq!(views_against_raw(&pool).await[3], (0, 1));
}

/// The last migration before the sessions' rollup.
const BEFORE_SESSION_ROLLUP: i64 = 20261201000003;

/// A database rolled up before migration `20261201000004` gets the sessions' part of its
/// sealed days from the migration: the horizon stays where it was and session_utilization
/// answers what the raw events say.
#[sqlx::test(migrations = false)]
async fn a_rolled_up_trail_upgrades_with_its_sessions_rolled_up_too(pool: PgPool) {
    arbiter_session::MIGRATOR
        .run_to(BEFORE_SESSION_ROLLUP, &pool)
        .await
        .expect("migrate to the schema before the sessions' rollup");
    // Written with that schema's SQL: today's store writes columns it does not have yet.
    sqlx::raw_sql(TRAIL_BEFORE_SESSION_ROLLUP)
        .execute(&pool)
        .await
        .expect("write the trail");
    // With that schema's SQL too: the library's rollup calls functions of later ones.
    sqlx::raw_sql(
        "SELECT count(arbiter.rollup_day(d))
           FROM (SELECT d FROM arbiter.rollup_pending_days() AS d ORDER BY 1) AS pending",
    )
    .execute(&pool)
    .await
    .expect("roll up with that schema");
    let today = Utc::now().date_naive();
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));

    arbiter_session::migrate(&pool).await.expect("migrate");

    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));
    // Day 1: A's denial and close; day 2: B's two denials and its close (one row each).
    assert_eq!(rollup_rows(&pool, day(1)).await.3, 1);
    assert_eq!(rollup_rows(&pool, day(2)).await.3, 1);
    let [agents, tools, reasons, sessions] = views_against_raw(&pool).await;
    assert_eq!(
        [agents.0, tools.0, reasons.0, sessions.0],
        [0, 0, 0, 0],
        "every view answers what the raw events say"
    );
    assert_eq!(sessions.1, 2);
    assert_eq!(session_totals_off(&pool).await, 0);
}

/// Two ended sessions of one agent in March 2026, as the schema of migration
/// `20261201000003` stores them: A on day 1 (a call, a denial, its close), B on day 2 (two
/// denials, a call, its close).
const TRAIL_BEFORE_SESSION_ROLLUP: &str = "
SELECT arbiter.create_event_partition(DATE '2026-03-01');
SELECT arbiter.create_event_partition(DATE '2026-03-02');
INSERT INTO arbiter.sessions (session_id, agent_id, delegation_chain, declared_intent,
    authorized_tools, authorized_credentials, call_budget, calls_made, rate_window_secs,
    data_sensitivity_ceiling, status, created_at, expires_at)
VALUES
    ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-0000000000ee', '{}', '',
     '{search}', '{}', 5, 1, 60, 'public', 'closed', '2026-03-01 10:00:00+00', '2026-03-01 11:00:00+00'),
    ('00000000-0000-0000-0000-0000000000b1', '00000000-0000-0000-0000-0000000000ee', '{}', '',
     '{search}', '{}', 5, 1, 60, 'public', 'closed', '2026-03-02 09:00:00+00', '2026-03-02 10:00:00+00');
INSERT INTO arbiter.session_events (event_key, session_id, agent_id, kind, tools, calls_made,
    rate_window_calls, status, session_version, occurred_at, instance_id, reason, session_day)
SELECT gen_random_uuid(), s::uuid, '00000000-0000-0000-0000-0000000000ee', kind, tools::text[],
       calls, 0, status, version, at::timestamptz, '00000000-0000-0000-0000-0000000000ff',
       reason, (at::timestamptz AT TIME ZONE 'UTC')::date
  FROM (VALUES
    ('00000000-0000-0000-0000-0000000000a1', 'created', '{}', 0, 'active', 1, '2026-03-01 10:00:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a1', 'call_allowed', '{search}', 1, 'active', 2, '2026-03-01 10:01:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a1', 'denied', '{rm}', 1, 'active', NULL, '2026-03-01 10:02:00+00', 'tool'),
    ('00000000-0000-0000-0000-0000000000a1', 'closed', '{}', 1, 'closed', 3, '2026-03-01 10:03:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000b1', 'created', '{}', 0, 'active', 1, '2026-03-02 09:00:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000b1', 'denied', '{rm}', 0, 'active', NULL, '2026-03-02 09:01:00+00', 'tool'),
    ('00000000-0000-0000-0000-0000000000b1', 'denied', '{rm}', 0, 'active', NULL, '2026-03-02 09:02:00+00', 'tool'),
    ('00000000-0000-0000-0000-0000000000b1', 'call_allowed', '{search}', 1, 'active', 2, '2026-03-02 09:03:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000b1', 'closed', '{}', 1, 'closed', 3, '2026-03-02 09:04:00+00', NULL)
  ) AS t(s, kind, tools, calls, status, version, at, reason)
 -- In order: each chain follows its events' order.
 ORDER BY at;
";

/// Records a denial that occurred at `at` on a session of `at`'s day, in `conn`'s
/// transaction, as a store's denial log would.
async fn insert_denial(conn: &mut sqlx::PgConnection, at: chrono::DateTime<Utc>) {
    sqlx::query!(
        "INSERT INTO arbiter.session_events (event_key, session_id, agent_id, kind, tools,
             calls_made, rate_window_calls, status, occurred_at, instance_id, reason, session_day)
         VALUES (gen_random_uuid(), gen_random_uuid(), $1, 'denied', '{search}', 0, 0,
             'closed', $2, gen_random_uuid(), 'closed', $3)",
        AGENT_A,
        at,
        at.date_naive()
    )
    .execute(conn)
    .await
    .expect("insert a denial");
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_rollup_and_an_insert_of_the_same_day_wait_for_each_other(pool: PgPool) {
    let yesterday = Utc::now().date_naive() - chrono::Days::new(1);
    let late = yesterday.and_hms_opt(23, 59, 59).unwrap().and_utc();

    // An insert in flight: the rollup cannot count it, so it does not seal the day.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut inserting = pool.begin().await.unwrap();
    insert_denial(&mut inserting, late).await;
    let outcome = tokio::time::timeout(Duration::from_secs(10), rollup::roll_up(&pool))
        .await
        .expect("a rollup does not queue behind an insert")
        .unwrap();
    assert_eq!(outcome.stopped_at, Some(yesterday));
    assert!(outcome.rolled.is_empty());
    inserting.commit().await.unwrap();
    assert_eq!(
        views_against_raw(&pool).await,
        [(0, 1), (0, 1), (0, 1), (0, 0)]
    );
    assert_eq!(rollup::roll_up(&pool).await.unwrap().stopped_at, None);
    assert_eq!(sealed_days(&pool, yesterday).await, vec![(yesterday, 1)]);

    // A rollup in flight: an insert of its day waits for it, then sends the day back to
    // the raw events, so that the event it adds is never left out of a sealed count.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut rolling = pool.begin().await.unwrap();
    let counted = sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", yesterday)
        .fetch_one(&mut *rolling)
        .await
        .unwrap();
    assert_eq!(counted, Some(1));
    let insert = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            insert_denial(&mut conn, late).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !insert.is_finished(),
        "the insert waits for the rollup's lock"
    );
    rolling.commit().await.unwrap();
    insert.await.unwrap();
    // Its only sealed day unsealed, the views read raw events only.
    assert_eq!(rollup::horizon(&pool).await.unwrap(), None);
    assert_eq!(sealed_days(&pool, yesterday).await, vec![]);
    assert_eq!(
        views_against_raw(&pool).await,
        [(0, 1), (0, 1), (0, 1), (0, 0)]
    );
    assert_eq!(rollup::roll_up(&pool).await.unwrap().stopped_at, None);
    assert_eq!(sealed_days(&pool, yesterday).await, vec![(yesterday, 2)]);
    // The two denials are of two sessions: two rows of session_day_rollup.
    assert_eq!(rollup_rows(&pool, yesterday).await, (1, 1, 1, 2));
}

/// Today's rollup state: (valid, events counted, the instant counted up to).
async fn today_state(pool: &PgPool) -> Option<(bool, i64, chrono::DateTime<Utc>)> {
    sqlx::query!("SELECT valid, events, counted_until FROM arbiter.rollup_today")
        .fetch_optional(pool)
        .await
        .expect("today's rollup state")
        .map(|r| (r.valid, r.events, r.counted_until))
}

/// Rolls up until today is rolled up too (an upkeep's rollup of today in flight makes this
/// one skip it); the instant today is rolled up to.
async fn roll_up_today(pool: &PgPool) -> chrono::DateTime<Utc> {
    for _ in 0..20 {
        let outcome = rollup::roll_up(pool).await.expect("roll up");
        if let Some(until) = outcome.today_until {
            return until;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("today stayed busy through 20 rollups");
}

/// Writes, through a store whose clock reads `at`, a session of `agent` with three calls
/// of search and a denied call of rm, and closes it: six events at `at`.
async fn session_at(pool: &PgPool, at: chrono::DateTime<Utc>, agent: Uuid) -> Uuid {
    let clock = arbiter_session::testing::ManualClock::new(at);
    let store = store_without_upkeep(pool, &clock);
    let id = store
        .create(common::request(agent, &["search"], 5))
        .await
        .expect("create")
        .session_id;
    for _ in 0..3 {
        store
            .use_session(id, "search", Some(agent))
            .await
            .expect("a call");
    }
    store
        .use_session(id, "rm", Some(agent))
        .await
        .expect_err("rm is not authorized");
    store.close(id).await.expect("close");
    let report = store.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.unrecorded_denials, 0);
    assert!(report.unflushed.is_empty());
    id
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn todays_rollup_answers_exactly_what_the_raw_events_do(pool: PgPool) {
    known_dataset(&pool).await;
    roll_up_all(&pool).await;
    let today = Utc::now().date_naive();
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));

    // Six events a minute ago (a minute after midnight, at the day's start): counted.
    let minute_ago = std::cmp::max(
        Utc::now() - chrono::Duration::minutes(1),
        today.and_hms_opt(0, 0, 1).unwrap().and_utc(),
    );
    session_at(&pool, minute_ago, AGENT_A).await;
    let until = roll_up_today(&pool).await;
    assert!(until > minute_ago);
    assert_eq!(today_state(&pool).await, Some((true, 6, until)));
    let rolled = views_against_raw(&pool).await;
    assert_eq!(rolled.map(|(off, _)| off), [0, 0, 0, 0]);

    // Six more right after that instant: the next rollup adds them to what it counted.
    session_at(&pool, until + chrono::Duration::milliseconds(1), AGENT_B).await;
    assert_eq!(today_state(&pool).await, Some((true, 6, until)));
    let next = roll_up_today(&pool).await;
    assert!(next > until);
    assert_eq!(today_state(&pool).await, Some((true, 12, next)));
    assert_eq!(
        views_against_raw(&pool).await.map(|(off, _)| off),
        [0, 0, 0, 0]
    );

    // A late session (its events occurred before that instant): today's rollup is no
    // longer read, and the views still answer what the raw events say; the next rollup
    // counts the day again.
    let late = std::cmp::max(
        minute_ago - chrono::Duration::seconds(30),
        today.and_hms_opt(0, 0, 0).unwrap().and_utc(),
    );
    session_at(&pool, late, AGENT_A).await;
    assert_eq!(
        today_state(&pool).await.map(|(valid, ..)| valid),
        Some(false)
    );
    assert_eq!(
        views_against_raw(&pool).await.map(|(off, _)| off),
        [0, 0, 0, 0]
    );
    let recounted = roll_up_today(&pool).await;
    assert_eq!(today_state(&pool).await, Some((true, 18, recounted)));
    let [agents, tools, reasons, _] = views_against_raw(&pool).await;
    assert_eq!([agents.0, tools.0, reasons.0], [0, 0, 0]);

    // Retention deletes the sessions (every one here has ended) and the data set's old
    // trails, but keeps every event that occurred since yesterday's start, whose lock each
    // insert takes: today's rollup stays read, and exact.
    let cutoff = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .unwrap();
    let purged = retention::purge_before(&pool, cutoff, EventRetention::Delete)
        .await
        .unwrap();
    assert_eq!((purged.sessions, purged.events), (6, 13));
    assert_eq!(
        today_state(&pool).await.map(|(valid, ..)| valid),
        Some(true)
    );
    let [agents, tools, reasons, _] = views_against_raw(&pool).await;
    assert_eq!([agents.0, tools.0, reasons.0], [0, 0, 0]);
}

/// Today's sessions, as today's rollup holds them: (session, denials, first close).
async fn todays_session_rows(pool: &PgPool) -> Vec<(Uuid, i64, Option<chrono::DateTime<Utc>>)> {
    sqlx::query!(
        "SELECT session_id, denials, closed_at FROM arbiter.session_today_rollup
          WHERE day = (SELECT day FROM arbiter.rollup_today) ORDER BY closed_at"
    )
    .fetch_all(pool)
    .await
    .expect("today's sessions")
    .into_iter()
    .map(|r| (r.session_id, r.denials, r.closed_at))
    .collect()
}

/// Today's rollup counts each session's denials and close too (migration
/// `20261205000011`), which session_utilization reads instead of all of today's events.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn todays_rollup_holds_each_sessions_denials_and_close(pool: PgPool) {
    use chrono::SubsecRound as _;
    roll_up_all(&pool).await;
    let today = Utc::now().date_naive();
    let minute_ago = std::cmp::max(
        Utc::now().trunc_subsecs(0) - chrono::Duration::minutes(1),
        today.and_hms_opt(0, 0, 1).unwrap().and_utc(),
    );
    let first = session_at(&pool, minute_ago, AGENT_A).await;
    let until = roll_up_today(&pool).await;
    assert_eq!(
        todays_session_rows(&pool).await,
        vec![(first, 1, Some(minute_ago))]
    );
    assert_eq!(views_against_raw(&pool).await[3], (0, 1));

    // One more after that instant: read raw until the next rollup adds it.
    let after = until + chrono::Duration::milliseconds(1);
    let second = session_at(&pool, after, AGENT_B).await;
    assert_eq!(todays_session_rows(&pool).await.len(), 1);
    assert_eq!(views_against_raw(&pool).await[3], (0, 2));
    roll_up_today(&pool).await;
    assert_eq!(
        todays_session_rows(&pool).await,
        vec![(first, 1, Some(minute_ago)), (second, 1, Some(after))]
    );
    assert_eq!(views_against_raw(&pool).await[3], (0, 2));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn todays_rollup_waits_for_the_inserts_in_flight(pool: PgPool) {
    // An empty trail: its first rollup seals yesterday, so today's rollup is read.
    roll_up_all(&pool).await;
    let today = Utc::now().date_naive();
    assert_eq!(rollup::horizon(&pool).await.unwrap(), Some(today));

    // An insert of today's events in flight when the rollup starts: the rollup waits for
    // it to end, then counts what it wrote.
    let at = std::cmp::max(
        Utc::now() - chrono::Duration::minutes(1),
        today.and_hms_opt(0, 0, 0).unwrap().and_utc(),
    );
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut inserting = pool.begin().await.unwrap();
    insert_denial(&mut inserting, at).await;
    let rolling = {
        let pool = pool.clone();
        tokio::spawn(async move { rollup::roll_up(&pool).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rolling.is_finished(), "the rollup waits for the insert");
    inserting.commit().await.unwrap();
    let outcome = rolling.await.unwrap().unwrap();
    let until = outcome.today_until.expect("today rolled up");
    assert_eq!(today_state(&pool).await, Some((true, 1, until)));
    assert_eq!(
        views_against_raw(&pool).await,
        [(0, 1), (0, 1), (0, 1), (0, 0)]
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn todays_rollup_stays_exact_beside_concurrent_writers(pool: PgPool) {
    roll_up_all(&pool).await;
    // Two writers, one on time and one late (its events occur before what the rollups
    // count up to, so each of them may invalidate today's rollup), beside rollups of
    // today in a loop.
    let today_start = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let late = std::cmp::max(Utc::now() - chrono::Duration::seconds(30), today_start);
    let writers: Vec<_> = [None, Some(late)]
        .into_iter()
        .map(|at| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let agent = Uuid::new_v4();
                for _ in 0..4 {
                    session_at(&pool, at.unwrap_or_else(Utc::now), agent).await;
                }
            })
        })
        .collect();
    let rollups = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                rollup::roll_up(&pool).await.expect("roll up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    rollups.await.unwrap();
    // 8 sessions of 6 events: every view answers exactly what they say, before and after
    // one more rollup.
    let [agents, tools, reasons, _] = views_against_raw(&pool).await;
    assert_eq!([agents.0, tools.0, reasons.0], [0, 0, 0]);
    let until = roll_up_today(&pool).await;
    let (valid, counted, _) = today_state(&pool).await.expect("today rolled up");
    assert!(valid);
    let before_until = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM arbiter.session_events
            WHERE occurred_at >= $1 AND occurred_at < $2"#,
        today_start,
        until
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counted, before_until);
    let [agents, tools, reasons, _] = views_against_raw(&pool).await;
    assert_eq!([agents.0, tools.0, reasons.0], [0, 0, 0]);
}

/// Rows a BRIN scan of `partition` for events an hour ahead (there are none) reads and
/// throws away: every row of a block range without a summary.
async fn rows_rechecked_by_brin(pool: &PgPool, partition: &str) -> i64 {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    // Only a bitmap scan is left, and only the BRIN index can serve it.
    sqlx::query!("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query!("SET LOCAL enable_indexscan = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    // EXPLAIN of a table named at run time cannot be a checked macro.
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT JSON)
         SELECT count(*) FROM {partition} WHERE occurred_at > now() + interval '1 hour'"
    )))
    .fetch_one(&mut *tx)
    .await
    .expect("explain");
    fn find(node: &serde_json::Value) -> Option<i64> {
        if node.get("Node Type").and_then(|t| t.as_str()) == Some("Bitmap Heap Scan") {
            return Some(
                node.get("Rows Removed by Index Recheck")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0),
            );
        }
        node.get("Plans")?.as_array()?.iter().find_map(find)
    }
    find(&plan[0]["Plan"]).unwrap_or_else(|| panic!("no bitmap scan: {plan}"))
}

/// Whether `partition` (`arbiter.session_events_…`) has statistics on `occurred_at`.
async fn has_occurred_at_statistics(pool: &PgPool, partition: &str) -> bool {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_stats
                           WHERE schemaname || '.' || tablename = $1
                             AND attname = 'occurred_at') AS "exists!""#,
        partition
    )
    .fetch_one(pool)
    .await
    .expect("pg_stats")
}

/// Writes 3,000 calls of the session `id` with SQL, through the chain trigger, into its
/// creation day's partition: enough blocks for several BRIN ranges.
async fn write_3000_calls(pool: &PgPool, id: Uuid) {
    let written = sqlx::query!(
        "INSERT INTO arbiter.session_events (
             event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
             status, session_version, occurred_at, instance_id, session_day)
         SELECT gen_random_uuid(), s.session_id, s.agent_id, 'call_allowed', '{search}', 1, 1,
                'closed', s.version, clock_timestamp(), gen_random_uuid(),
                (s.created_at AT TIME ZONE 'UTC')::date
           FROM arbiter.sessions s, generate_series(1, 3000)
          WHERE s.session_id = $1",
        id
    )
    .execute(pool)
    .await
    .expect("write today's events")
    .rows_affected();
    assert_eq!(written, 3000);
}

/// Migration 20261203000010: the rollup leaves today's partition so that the reports' raw
/// read of today (from the instant rolled up to) reads only the newest blocks: its BRIN
/// ranges summarized, and statistics that show the planner occurred_at's order. Without
/// them (autovacuum off, or not yet come round) a BRIN scan reads every row written since
/// the last VACUUM, and the planner reads the whole partition instead.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_rollup_keeps_todays_partition_ready_for_the_raw_read(pool: PgPool) {
    let id = session_at(&pool, Utc::now(), AGENT_A).await;
    let partition = format!("arbiter.session_events_{}", Utc::now().format("%Y%m%d"));
    // Autovacuum, where it is on, would do the same some time: not during this test.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {partition} SET (autovacuum_enabled = false)"
    )))
    .execute(&pool)
    .await
    .expect("autovacuum off");
    write_3000_calls(&pool, id).await;
    // Of the 3,006 events, those after the first block range (which has a summary from the
    // index's creation on, kept up by each insert) are in ranges without one.
    let rechecked = rows_rechecked_by_brin(&pool, &partition).await;
    assert!(rechecked > 1000, "{rechecked} rows read in vain");
    assert!(!has_occurred_at_statistics(&pool, &partition).await);

    roll_up_today(&pool).await;
    assert_eq!(rows_rechecked_by_brin(&pool, &partition).await, 0);
    assert!(has_occurred_at_statistics(&pool, &partition).await);
    // The rollup does not analyze it again: once is what the planner needs.
    let analyzed = sqlx::query_scalar!("SELECT arbiter.refresh_recent_partitions()")
        .fetch_one(&pool)
        .await
        .expect("refresh");
    assert_eq!(analyzed, Some(0));
}

/// The refresh never waits for a partition's lock: the one holding it is a VACUUM, an
/// ANALYZE or another rollup, and a waiting request would make PostgreSQL cancel an
/// autovacuum of the partition. It skips the partition until the next rollup.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn refreshing_skips_a_partition_whose_lock_is_held(pool: PgPool) {
    let id = session_at(&pool, Utc::now(), AGENT_A).await;
    let partition = format!("arbiter.session_events_{}", Utc::now().format("%Y%m%d"));
    write_3000_calls(&pool, id).await;
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {partition} IN SHARE UPDATE EXCLUSIVE MODE"
    )))
    .execute(&mut *holder)
    .await
    .expect("hold the partition's lock");

    // A wait would end in this timeout's error.
    let mut conn = pool.acquire().await.expect("acquire");
    sqlx::query!("SET statement_timeout = '2s'")
        .execute(&mut *conn)
        .await
        .expect("set");
    let analyzed = sqlx::query_scalar!("SELECT arbiter.refresh_recent_partitions()")
        .fetch_one(&mut *conn)
        .await
        .expect("the refresh skips the held partition");
    assert_eq!(analyzed, Some(0));
    assert!(!has_occurred_at_statistics(&pool, &partition).await);

    holder.rollback().await.expect("release");
    let analyzed = sqlx::query_scalar!("SELECT arbiter.refresh_recent_partitions()")
        .fetch_one(&mut *conn)
        .await
        .expect("refresh");
    assert_eq!(analyzed, Some(1));
    assert!(has_occurred_at_statistics(&pool, &partition).await);
    sqlx::query!("RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .expect("reset");
}

/// The audit trail under concurrency, defect 3. docs/reporting.md's SQL recipe rolls up
/// every pending day in one statement and goes on past a day that is busy: with the
/// first day's rollup held open (and then rolled back), the recipe must not seal a later
/// day, or the horizon would pass the first one, which would then be read neither from
/// rollups nor raw, and never be pending again.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_sql_recipe_never_moves_the_horizon_past_a_busy_day(pool: PgPool) {
    let first = Utc::now().date_naive() - chrono::Days::new(3);
    let mut conn = pool.acquire().await.unwrap();
    for (day, hour) in [(first, 10), (first, 11), (first + chrono::Days::new(1), 9)] {
        let at = day.and_hms_opt(hour, 0, 0).unwrap().and_utc();
        insert_denial(&mut conn, at).await;
    }
    // Inserted on their own days, the events would have left no row in rollup_days: these,
    // inserted late, each marked its day unsealed.
    sqlx::query!("DELETE FROM arbiter.rollup_days")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    // A rollup of the first day, in flight.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut holding = pool.begin().await.unwrap();
    let sealed = sqlx::query_scalar!("SELECT arbiter.rollup_day($1)", first)
        .fetch_one(&mut *holding)
        .await
        .unwrap();
    assert_eq!(sealed, Some(2));
    // The recipe, beside it: it finds the first day busy, and a later day's rollup may
    // wait for the first one's lock on the sessions' totals.
    let recipe = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar!(
                "SELECT arbiter.rollup_day(d) FROM arbiter.rollup_pending_days() AS d"
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !recipe.is_finished() && waiting_on_a_lock(&pool).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the recipe neither ran nor waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holding.rollback().await.unwrap();
    let results = recipe.await.unwrap();
    assert_eq!(results.first(), Some(&None), "the first day is busy");

    let horizon = rollup::horizon(&pool).await.unwrap();
    assert!(
        horizon.is_none_or(|horizon| horizon <= first),
        "the horizon {horizon:?} passed {first}"
    );
    let off = views_against_raw(&pool).await.map(|(off, _)| off);
    assert_eq!(off, [0, 0, 0, 0]);
    // The next rollup counts every day, in order.
    roll_up_all(&pool).await;
    assert_eq!(
        sealed_days(&pool, first + chrono::Days::new(1)).await,
        vec![(first, 2), (first + chrono::Days::new(1), 1)]
    );
    assert_eq!(
        views_against_raw(&pool).await.map(|(off, _)| off),
        [0, 0, 0, 0]
    );
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
