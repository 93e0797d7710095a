//! The audit trail's daily partitions (migration `20261201000001_event_partitions.sql`):
//! where events land, what guards each partition, retention by whole partition, and the
//! migration of a populated, unpartitioned trail.

mod common;

use std::time::Duration;

use arbiter_session::error::StorageError;
use arbiter_session::operator::chain;
use arbiter_session::operator::partitions;
use arbiter_session::operator::retention::{self, EventRetention};
use arbiter_session::testing::ManualClock;
use chrono::{DateTime, NaiveDate, TimeZone as _, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// The partitions holding the events of `id`.
async fn partitions_of(pool: &PgPool, id: Uuid) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT DISTINCT tableoid::regclass::text FROM arbiter.session_events
          WHERE session_id = $1",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("read partitions")
}

fn partition_name(day: NaiveDate) -> String {
    format!("arbiter.session_events_{}", day.format("%Y%m%d"))
}

async fn exists(pool: &PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("to_regclass")
}

async fn events_of(pool: &PgPool, id: Uuid) -> i64 {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM arbiter.session_events WHERE session_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .expect("count events")
}

/// Creates the partitions of `days`, none of which may exist yet.
async fn create_partitions<const N: usize>(pool: &PgPool, days: [NaiveDate; N]) {
    for day in days {
        let made = sqlx::query_scalar::<_, bool>("SELECT arbiter.create_event_partition($1)")
            .bind(day)
            .fetch_one(pool)
            .await
            .expect("create a partition");
        assert!(made, "{day} had no partition");
    }
}

async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar::<_, DateTime<Utc>>("SELECT now()")
        .fetch_one(pool)
        .await
        .expect("now")
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn every_event_of_a_session_lands_in_its_creation_days_partition(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let store = common::store(&pool, &clock);
    let session = store
        .create(common::request(Uuid::new_v4(), &["search"], 2))
        .await
        .expect("create");
    let id = session.session_id;
    store.use_session(id, "search", None).await.expect("call");
    store
        .use_session_batch(id, &["search"], None)
        .await
        .expect("batch");
    store
        .use_session(id, "search", None)
        .await
        .expect_err("budget spent: a denial");
    store.close(id).await.expect("close");
    // The upkeep started with the store's first call; bounded wait (liveness, not speed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stats().maintenance_runs == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            store.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.shutdown(Duration::from_secs(10)).await.is_clean());

    assert_eq!(events_of(&pool, id).await, 5);
    assert_eq!(
        partitions_of(&pool, id).await,
        [partition_name(session.created_at.date_naive())],
        "the whole trail, denial included, is in its creation day's partition"
    );
    assert!(!partitions::default_partition_used(&pool).await.unwrap());
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact() && summary.events == 4, "{summary:?}");

    // A session of a day without a partition: the default partition takes its events,
    // and that day cannot get a partition while they are there.
    let long_ago = Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap();
    let old = common::store(&pool, &ManualClock::new(long_ago))
        .create(common::request(Uuid::new_v4(), &["search"], 2))
        .await
        .expect("create");
    assert_eq!(
        partitions_of(&pool, old.session_id).await,
        ["arbiter.session_events_default"]
    );
    assert!(partitions::default_partition_used(&pool).await.unwrap());
    let made = sqlx::query_scalar::<_, bool>("SELECT arbiter.create_event_partition('2026-03-02')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!made);
    assert!(!exists(&pool, "arbiter.session_events_20260302").await);

    // The migration made yesterday through a week ahead; two more days make two more.
    assert_eq!(partitions::ensure(&pool, 7).await.unwrap(), 0);
    assert_eq!(partitions::ensure(&pool, 9).await.unwrap(), 2);
    let listed = partitions::list(&pool).await.unwrap();
    assert_eq!(listed.len(), 1 + 11, "{listed:?}");
    assert_eq!(listed[0].name, "arbiter.session_events_default");
    let refused = partitions::ensure(&pool, partitions::MAX_DAYS_AHEAD + 1).await;
    assert!(
        matches!(&refused, Err(StorageError::Constraint { name, .. }) if name == "partition_days_ahead_range"),
        "{refused:?}"
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn every_partition_is_append_only(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let session = common::store(&pool, &clock)
        .create(common::request(Uuid::new_v4(), &["search"], 2))
        .await
        .expect("create");
    let today = partition_name(session.created_at.date_naive());
    for sql in [
        format!("TRUNCATE {today}"),
        "TRUNCATE arbiter.session_events_default".to_owned(),
        format!("DELETE FROM {today}"),
        format!("UPDATE {today} SET calls_made = 0"),
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&pool)
            .await
            .expect_err(&sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(events_of(&pool, session.session_id).await, 1);
}

/// Writes an event as the library does for the session `id`, into its creation day's
/// partition: the chain trigger computes its links.
async fn write_event(
    conn: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    sqlx::query!(
        "INSERT INTO arbiter.session_events (
             event_key, session_id, agent_id, kind, tools, calls_made, rate_window_calls,
             status, session_version, occurred_at, instance_id, session_day)
         SELECT gen_random_uuid(), s.session_id, s.agent_id, 'call_allowed', '{search}', 1, 1,
                'active', s.version, now(), gen_random_uuid(),
                (s.created_at AT TIME ZONE 'UTC')::date
           FROM arbiter.sessions s WHERE s.session_id = $1",
        id
    )
    .execute(conn)
    .await
}

/// Migration 20261201000007: the chain trigger's predecessor lookup names the event's own
/// partition. Through the parent, its cached plan locked every partition on each event,
/// which made an insert's cost grow with the days kept.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn writing_an_event_locks_its_own_partition_and_no_other(pool: PgPool) {
    let today = db_now(&pool).await.date_naive();
    create_partitions(
        &pool,
        [20, 21, 22].map(|ago| today - chrono::Days::new(ago)),
    )
    .await;
    let clock = ManualClock::starting_now();
    let session = common::store(&pool, &clock)
        .create(common::request(Uuid::new_v4(), &["search"], 2))
        .await
        .expect("create");
    let own = partition_name(session.created_at.date_naive());

    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    // Twice: PL/pgSQL plans the lookup at the first call and reuses the plan after.
    for _ in 0..2 {
        write_event(&mut *tx, session.session_id)
            .await
            .expect("write an event");
    }
    let locked = sqlx::query_scalar!(
        r#"SELECT DISTINCT c.oid::regclass::text AS "name!" FROM pg_locks l
             JOIN pg_class c ON c.oid = l.relation
            WHERE l.pid = pg_backend_pid() AND c.relkind IN ('r', 'p')
              AND c.relname LIKE 'session\_events%'
            ORDER BY 1"#
    )
    .fetch_all(&mut *tx)
    .await
    .expect("read locks");
    assert_eq!(locked, ["arbiter.session_events".to_owned(), own]);
    tx.commit().await.expect("commit");
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact() && summary.events == 3, "{summary:?}");
}

/// Whether the chain trigger function of `partition` (`arbiter.session_events_…`) exists.
async fn chain_function_exists(pool: &PgPool, partition: &str) -> bool {
    sqlx::query_scalar!(
        r#"SELECT to_regprocedure($1) IS NOT NULL AS "exists!""#,
        format!("{partition}_chain()")
    )
    .fetch_one(pool)
    .await
    .expect("to_regprocedure")
}

/// A partition attached without `create_event_partition` has no chain trigger: its events
/// are refused (never stored unchained) until `ensure` installs it. A partition dropped
/// without its trigger function leaves the function to `ensure`, which drops it.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn ensure_keeps_the_chain_triggers_in_step_with_the_partitions(pool: PgPool) {
    let clock = ManualClock::starting_now();
    let session = common::store(&pool, &clock)
        .create(common::request(Uuid::new_v4(), &["search"], 2))
        .await
        .expect("create");
    let own = partition_name(session.created_at.date_naive());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER session_events_chain ON {own}"
    )))
    .execute(&pool)
    .await
    .expect("drop the trigger");
    let refused = write_event(&pool, session.session_id)
        .await
        .expect_err("an unchained event");
    assert!(
        refused.to_string().contains("session_events_chained"),
        "{refused}"
    );

    let gone = db_now(&pool).await.date_naive() - chrono::Days::new(30);
    create_partitions(&pool, [gone]).await;
    let gone = partition_name(gone);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {gone}")))
        .execute(&pool)
        .await
        .expect("drop a partition");
    assert!(chain_function_exists(&pool, &gone).await);

    assert_eq!(partitions::ensure(&pool, 7).await.unwrap(), 0);
    assert!(
        !chain_function_exists(&pool, &gone).await,
        "the dropped partition's function"
    );
    assert!(chain_function_exists(&pool, &own).await);
    write_event(&pool, session.session_id)
        .await
        .expect("chained again");
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact() && summary.events == 2, "{summary:?}");
}

/// Three past days. Day 10's sessions all ended before the cutoff: its partition is
/// dropped whole. Day 9 still holds a session (closed after the cutoff): kept, untouched.
/// Day 8's session ended before the cutoff but a denial on it was recorded after: its
/// partition is kept, and so is that session's whole trail (retention never cuts a chain).
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn purge_drops_the_partitions_of_ended_days_whole(pool: PgPool) {
    let today = db_now(&pool).await.date_naive();
    let day = |ago: u64| today - chrono::Days::new(ago);
    create_partitions(&pool, [8, 9, 10].map(day)).await;
    let at = |ago: u64| day(ago).and_hms_opt(12, 0, 0).unwrap().and_utc();
    let clocks = [10, 9, 8].map(|ago| ManualClock::new(at(ago)));
    let stores = clocks.each_ref().map(|clock| common::store(&pool, clock));
    let mut ids = Vec::new();
    for store in &stores {
        let id = common::new_session(store, &["search"], 5).await;
        store.use_session(id, "search", None).await.expect("call");
        ids.push(id);
    }
    let [ten, nine, eight] = [ids[0], ids[1], ids[2]];
    let second_ten = common::new_session(&stores[0], &["search"], 5).await;
    stores[0].close(ten).await.expect("close");
    stores[0].close(second_ten).await.expect("close");
    stores[2].close(eight).await.expect("close");

    let cutoff = db_now(&pool).await;
    stores[1]
        .close(nine)
        .await
        .expect("closed after the cutoff");
    stores[2]
        .use_session(eight, "search", None)
        .await
        .expect_err("closed: a denial, recorded after the cutoff");
    for store in &stores {
        assert!(store.shutdown(Duration::from_secs(10)).await.is_clean());
    }
    let before = [
        events_of(&pool, ten).await + events_of(&pool, second_ten).await,
        events_of(&pool, nine).await,
        events_of(&pool, eight).await,
    ];
    assert_eq!(before, [5, 3, 4]);

    // Keeping events drops nothing.
    let kept = retention::purge_before(&pool, cutoff, EventRetention::Keep)
        .await
        .unwrap();
    assert_eq!((kept.sessions, kept.events), (3, 0));
    assert!(exists(&pool, &partition_name(day(10))).await);

    let purged = retention::purge_before(&pool, cutoff, EventRetention::Delete)
        .await
        .unwrap();
    assert_eq!((purged.sessions, purged.events), (0, 5));
    assert!(
        !exists(&pool, &partition_name(day(10))).await,
        "day 10 was dropped whole"
    );
    assert!(exists(&pool, &partition_name(day(9))).await);
    assert_eq!(
        events_of(&pool, nine).await,
        3,
        "a session that exists keeps its trail"
    );
    assert!(exists(&pool, &partition_name(day(8))).await);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM arbiter.session_events WHERE session_id = $1 ORDER BY event_id",
    )
    .bind(eight)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        ["created", "call_allowed", "closed", "denied"],
        "a trail with an event recorded after the cutoff stays whole"
    );
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact(), "{summary:?}");
    // Today's partition and the days ahead are untouched.
    assert!(exists(&pool, &partition_name(today)).await);
}

/// The chain's first encoding, as migration `20261124000004` computes it, over a trail
/// written before partitioning: three sessions (one of them purged, its events kept), with
/// calls, a denial and a close.
const UNPARTITIONED_TRAIL: &str = "
INSERT INTO arbiter.sessions (session_id, agent_id, delegation_chain, declared_intent,
    authorized_tools, authorized_credentials, call_budget, rate_window_secs,
    data_sensitivity_ceiling, created_at, expires_at)
VALUES ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-00000000000a',
        '{}', '', '{search}', '{}', 5, 60, 'internal',
        '2026-03-02 23:50:00+00', '2026-03-03 00:20:00+00'),
       ('00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-00000000000a',
        '{}', '', '{search}', '{}', 5, 60, 'internal',
        '2026-03-03 08:00:00+00', '2026-03-03 09:00:00+00');
INSERT INTO arbiter.session_events (event_key, session_id, agent_id, kind, tools, calls_made,
    rate_window_calls, status, session_version, occurred_at, instance_id, reason)
SELECT gen_random_uuid(), s::uuid, '00000000-0000-0000-0000-00000000000a', kind, tools,
       calls, 0, status, version, at::timestamptz, '00000000-0000-0000-0000-000000000001', reason
  FROM (VALUES
    ('00000000-0000-0000-0000-0000000000a0', 'created', '{}'::text[], 0, 'active', 1, '2026-03-01 10:00:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a0', 'call_allowed', '{search}', 1, 'active', 2, '2026-03-01 10:01:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a1', 'created', '{}', 0, 'active', 1, '2026-03-02 23:50:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a1', 'call_allowed', '{search}', 1, 'active', 2, '2026-03-03 00:05:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a1', 'denied', '{rm}', 1, 'active', NULL, '2026-03-03 00:06:00+00', 'tool'),
    ('00000000-0000-0000-0000-0000000000a1', 'closed', '{}', 1, 'closed', 3, '2026-03-03 00:07:00+00', NULL),
    ('00000000-0000-0000-0000-0000000000a2', 'created', '{}', 0, 'active', 1, '2026-03-03 08:00:00+00', NULL)
  ) AS t(s, kind, tools, calls, status, version, at, reason);
";

/// The last migration before partitioning.
const BEFORE_PARTITIONS: i64 = 20261124000007;

#[sqlx::test(migrations = false)]
async fn an_unpartitioned_trail_migrates_with_ids_hashes_and_chains_intact(pool: PgPool) {
    arbiter_session::MIGRATOR
        .run_to(BEFORE_PARTITIONS, &pool)
        .await
        .expect("migrate to the unpartitioned schema");
    sqlx::raw_sql(UNPARTITIONED_TRAIL)
        .execute(&pool)
        .await
        .expect("write the old trail");
    let rows = "SELECT event_id, session_id, kind, prev_hash, hash
                  FROM arbiter.session_events ORDER BY event_id";
    type Event = (i64, Uuid, String, Option<Vec<u8>>, Option<Vec<u8>>);
    let before: Vec<Event> = sqlx::query_as(rows).fetch_all(&pool).await.unwrap();
    assert_eq!(before.len(), 7);

    arbiter_session::migrate(&pool).await.expect("migrate");

    let after: Vec<Event> = sqlx::query_as(rows).fetch_all(&pool).await.unwrap();
    let state_links = |events: &[Event]| -> Vec<Event> {
        events.iter().filter(|e| e.2 != "denied").cloned().collect()
    };
    assert_eq!(
        state_links(&after),
        state_links(&before),
        "ids, order and state-chain hashes are unchanged"
    );
    let denial = after.iter().find(|e| e.2 == "denied").expect("the denial");
    assert_eq!(
        (denial.0, denial.3.as_deref()),
        (5, Some(&[0u8; 32][..])),
        "the old denial starts its session's denial chain"
    );
    let a0 = Uuid::from_u128(0xa0);
    let a1 = Uuid::from_u128(0xa1);
    let a2 = Uuid::from_u128(0xa2);
    let day = |d: u32| partition_name(NaiveDate::from_ymd_opt(2026, 3, d).unwrap());
    // The purged session by its first event; the others by their creation, even for the
    // events of a1 that occurred after midnight.
    assert_eq!(partitions_of(&pool, a0).await, [day(1)]);
    assert_eq!(partitions_of(&pool, a1).await, [day(2)]);
    assert_eq!(partitions_of(&pool, a2).await, [day(3)]);
    assert!(!partitions::default_partition_used(&pool).await.unwrap());
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact(), "{summary:?}");
    assert_eq!(
        (summary.sessions, summary.events, summary.denials),
        (3, 6, 1)
    );

    // A store continues the migrated session's chain in its partition, with new ids.
    let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 3, 8, 30, 0).unwrap());
    let store = common::store(&pool, &clock);
    store.use_session(a2, "search", None).await.expect("call");
    assert!(store.shutdown(Duration::from_secs(10)).await.is_clean());
    assert_eq!(partitions_of(&pool, a2).await, [day(3)]);
    let newest: i64 = sqlx::query_scalar("SELECT max(event_id) FROM arbiter.session_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(newest, before.last().unwrap().0 + 1);
    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact(), "{summary:?}");
    assert_eq!(summary.events, 7);
}

#[cfg(feature = "archive")]
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_archiving_purge_drops_only_what_it_wrote_out(pool: PgPool) {
    use std::io::BufRead as _;

    let today = db_now(&pool).await.date_naive();
    let day = |ago: u64| today - chrono::Days::new(ago);
    create_partitions(&pool, [9, 10].map(day)).await;
    let at = |ago: u64| day(ago).and_hms_opt(12, 0, 0).unwrap().and_utc();
    let clocks = [10, 9].map(|ago| ManualClock::new(at(ago)));
    let stores = clocks.each_ref().map(|clock| common::store(&pool, clock));
    // Day 10: one ended session. Day 9: one ended (its events would go row by row) and one
    // that ends after the cutoff, so day 9's partition stays.
    let mut ids = Vec::new();
    for store in [&stores[0], &stores[1], &stores[1]] {
        let id = common::new_session(store, &["search"], 5).await;
        store.use_session(id, "search", None).await.expect("call");
        ids.push(id);
    }
    let [ten, nine, nine_later] = [ids[0], ids[1], ids[2]];
    stores[0].close(ten).await.expect("close");
    stores[1].close(nine).await.expect("close");
    let cutoff = db_now(&pool).await;
    stores[1].close(nine_later).await.expect("close");
    for store in &stores {
        assert!(store.shutdown(Duration::from_secs(10)).await.is_clean());
    }
    assert_eq!(events_of(&pool, ten).await, 3);

    // The database drops an archived partition only with exactly the rows archived.
    let gone = sqlx::query_scalar::<_, i64>("SELECT arbiter.purge_sessions($1)")
        .bind(cutoff)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(gone, 2, "two sessions go");
    let wrong = sqlx::query_as::<_, (String, i64)>(
        "SELECT outcome, events FROM arbiter.purge_partition($1, $2, 2)",
    )
    .bind(day(10))
    .bind(cutoff)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(wrong, ("changed".to_owned(), 0), "no event");
    assert!(exists(&pool, &partition_name(day(10))).await);

    let dir = std::env::temp_dir().join(format!("arbiter-archive-{}", Uuid::new_v4()));
    let report = retention::purge_archiving(&pool, cutoff, &dir)
        .await
        .unwrap();
    assert_eq!((report.purge.sessions, report.purge.events), (0, 3));
    assert_eq!(report.partitions.len(), 1, "{report:?}");
    let archived = &report.partitions[0];
    assert_eq!(
        (archived.day, archived.events, archived.dropped),
        (day(10), 3, true)
    );
    assert!(!exists(&pool, &partition_name(day(10))).await);
    // Nothing goes row by row: the ended session of day 9 keeps its trail.
    assert!(exists(&pool, &partition_name(day(9))).await);
    assert_eq!(events_of(&pool, nine).await, 3);

    // The file holds the dropped partition's events, in order, with their hashes.
    let file = std::fs::File::open(&archived.path).unwrap();
    let lines: Vec<serde_json::Value> = std::io::BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["created", "call_allowed", "closed"]);
    assert!(lines.iter().all(|l| l["session_id"] == ten.to_string()));
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"]);
    std::fs::remove_dir_all(&dir).unwrap();

    let summary = chain::verify_all_audit_chains(&pool).await.unwrap();
    assert!(summary.is_intact(), "{summary:?}");
}
