//! The reporting views on a known data set (exact rows), the indexes that keep one
//! session and one agent's day off a sequential scan, and the reports as the CLI renders
//! them.

use crate::common;
use crate::common::reports::{day, roll_up_all, store_without_upkeep, views_against_raw};
use crate::common::{AGENT_A, AGENT_B, known_dataset};
use arbiter_session::SessionError;
use arbiter_session::clock::Clock as _;
use arbiter_session::operator::report::{self, Format, ReportFilter};
use arbiter_session::operator::rollup;
use chrono::Utc;
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn session_utilization_view_has_exact_rows(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let rows = sqlx::query!(
        r#"SELECT session_id AS "session_id!", agent_id AS "agent_id!", status AS "status!",
                  call_budget AS "call_budget!", calls_made AS "calls_made!",
                  budget_used_pct::text AS "pct!", budget_exhausted AS "exhausted!",
                  to_char(created_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI') AS "created!",
                  to_char(ended_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI') AS "ended!",
                  duration::text AS "duration!", denials AS "denials!"
             FROM arbiter.session_utilization ORDER BY created_at"#
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let got: Vec<_> = rows
        .into_iter()
        .map(|r| {
            (
                r.session_id,
                r.agent_id,
                r.status,
                r.call_budget,
                r.calls_made,
                r.pct,
                r.exhausted,
                r.created,
                r.ended,
                r.duration,
                r.denials,
            )
        })
        .collect();
    let row = |id,
               agent,
               status: &str,
               budget,
               used,
               pct: &str,
               exhausted,
               created: &str,
               ended: &str,
               duration: &str,
               denials| {
        (
            id,
            agent,
            status.to_owned(),
            budget,
            used,
            pct.to_owned(),
            exhausted,
            created.to_owned(),
            ended.to_owned(),
            duration.to_owned(),
            denials,
        )
    };
    assert_eq!(
        got,
        vec![
            row(
                data.s1,
                AGENT_A,
                "closed",
                3,
                3,
                "100.0",
                true,
                "03-01 10:00",
                "03-01 10:05",
                "00:05:00",
                1
            ),
            row(
                data.s2,
                AGENT_A,
                "expired",
                10,
                1,
                "10.0",
                false,
                "03-02 09:00",
                "03-02 09:10",
                "00:10:00",
                2
            ),
            row(
                data.s3,
                AGENT_B,
                "closed",
                2,
                1,
                "50.0",
                false,
                "03-02 12:00",
                "03-02 12:00",
                "00:00:00",
                1
            ),
        ]
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn agent_daily_activity_view_has_exact_rows(pool: PgPool) {
    known_dataset(&pool).await;
    let rows = report::agent_activity(&pool, ReportFilter::default())
        .await
        .unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.agent_id,
                r.day,
                r.sessions_opened,
                r.calls_allowed,
                r.calls_denied,
                [
                    r.denied_agent_mismatch,
                    r.denied_closed,
                    r.denied_expired,
                    r.denied_budget,
                    r.denied_tool,
                    r.denied_rate,
                    r.denied_write_through,
                    r.denied_invalid,
                ],
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (AGENT_A, day(1), 1, 3, 1, [0, 0, 0, 1, 0, 0, 0, 0]),
            (AGENT_A, day(2), 1, 1, 2, [1, 0, 0, 0, 1, 0, 0, 0]),
            (AGENT_B, day(2), 1, 1, 1, [0, 1, 0, 0, 0, 0, 0, 0]),
        ]
    );
    let b_only = report::agent_activity(&pool, ReportFilter::default().with_agent(Some(AGENT_B)))
        .await
        .unwrap();
    assert_eq!(b_only.len(), 1);
    assert_eq!(b_only[0].agent_id, AGENT_B);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn tool_and_denial_views_have_exact_rows(pool: PgPool) {
    known_dataset(&pool).await;
    let tools = sqlx::query!(
        r#"SELECT day AS "day!", agent_id AS "agent_id!", tool AS "tool!",
                  calls_allowed AS "allowed!", calls_denied AS "denied!", sessions AS "sessions!"
             FROM arbiter.tool_daily_usage ORDER BY day, agent_id, tool"#
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let tools: Vec<_> = tools
        .into_iter()
        .map(|r| (r.day, r.agent_id, r.tool, r.allowed, r.denied, r.sessions))
        .collect();
    let t = |d, agent, tool: &str, allowed, denied| {
        (day(d), agent, tool.to_owned(), allowed, denied, 1)
    };
    assert_eq!(
        tools,
        vec![
            t(1, AGENT_A, "fetch", 1, 0),
            t(1, AGENT_A, "search", 2, 1),
            t(2, AGENT_A, "rm", 0, 1),
            t(2, AGENT_A, "search", 1, 1),
            t(2, AGENT_B, "fetch", 1, 1),
        ]
    );

    let denials = sqlx::query!(
        r#"SELECT day AS "day!", agent_id AS "agent_id!", reason AS "reason!",
                  denials AS "denials!", sessions AS "sessions!"
             FROM arbiter.denials_by_reason ORDER BY day, agent_id, reason"#
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let denials: Vec<_> = denials
        .into_iter()
        .map(|r| (r.day, r.agent_id, r.reason, r.denials, r.sessions))
        .collect();
    let d = |n, agent, reason: &str| (day(n), agent, reason.to_owned(), 1, 1);
    assert_eq!(
        denials,
        vec![
            d(1, AGENT_A, "budget"),
            d(2, AGENT_A, "agent_mismatch"),
            d(2, AGENT_A, "tool"),
            d(2, AGENT_B, "closed"),
        ]
    );
}

/// Today's part of `tool_daily_usage` (raw events) counts a session once per tool, however
/// many of its calls, batches and denials named the tool: migration 20261201000008 counts
/// per session first, then per tool.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn todays_tool_usage_counts_each_session_once_per_tool(pool: PgPool) {
    let clock = arbiter_session::testing::ManualClock::starting_now();
    let store = store_without_upkeep(&pool, &clock);
    let agent = Uuid::new_v4();
    let one = store
        .create(common::request(agent, &["search", "fetch"], 10))
        .await
        .expect("create");
    let two = store
        .create(common::request(agent, &["search"], 10))
        .await
        .expect("create");
    let (one, two) = (one.session_id, two.session_id);
    store
        .use_session(one, "search", Some(agent))
        .await
        .expect("call");
    store
        .use_session_batch(one, &["search", "fetch"], Some(agent))
        .await
        .expect("batch");
    store
        .use_session(two, "search", Some(agent))
        .await
        .expect("call");
    for session in [one, two, two] {
        store
            .use_session(session, "rm", Some(agent))
            .await
            .expect_err("rm is not authorized");
    }
    assert_eq!(
        store
            .shutdown(Duration::from_secs(5))
            .await
            .unrecorded_denials,
        0
    );

    let rows = sqlx::query!(
        r#"SELECT day AS "day!", tool AS "tool!", calls_allowed AS "allowed!",
                  calls_denied AS "denied!", sessions AS "sessions!"
             FROM arbiter.tool_daily_usage WHERE agent_id = $1 ORDER BY tool"#,
        agent
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let today = clock.now().date_naive();
    let rows: Vec<_> = rows
        .into_iter()
        .map(|r| (r.day, r.tool, r.allowed, r.denied, r.sessions))
        .collect();
    let row =
        |tool: &str, allowed, denied, sessions| (today, tool.to_owned(), allowed, denied, sessions);
    assert_eq!(
        rows,
        [
            row("fetch", 1, 0, 1),
            row("rm", 0, 3, 2),
            row("search", 3, 0, 2)
        ]
    );
    let [_, (tools_off, tools), ..] = views_against_raw(&pool).await;
    assert_eq!((tools_off, tools), (0, 3));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn reports_render_exactly(pool: PgPool) {
    known_dataset(&pool).await;
    let all = ReportFilter::default();
    let tools = report::tool_usage(&pool, all).await.unwrap();
    assert_eq!(
        report::render(&tools, Format::Table).unwrap(),
        "day         tool    allowed  denied  agents  sessions\n\
         2026-03-01  fetch         1       0       1         1\n\
         2026-03-01  search        2       1       1         1\n\
         2026-03-02  fetch         1       1       1         1\n\
         2026-03-02  rm            0       1       1         1\n\
         2026-03-02  search        1       1       1         1\n"
    );
    let since_2nd = ReportFilter::default().with_since(Some(day(2)));
    let denials = report::denials(&pool, since_2nd).await.unwrap();
    assert_eq!(
        report::render(&denials, Format::Csv).unwrap(),
        "day,reason,denials,agents,sessions\r\n\
         2026-03-02,agent_mismatch,1,1,1\r\n\
         2026-03-02,closed,1,1,1\r\n\
         2026-03-02,tool,1,1,1\r\n"
    );
    let utilization = report::utilization(&pool, all).await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&report::render(&utilization, Format::Json).unwrap()).unwrap();
    assert_eq!(json[0]["budget_used_pct"], 100.0);
    assert_eq!(json[1]["status"], "expired");
    assert_eq!(json[2]["duration_secs"], 0);
    assert_eq!(json.as_array().map(Vec::len), Some(3));
}

/// A tool's own limit shows in `report utilization` (its calls and limit, in every format),
/// and a call past it is recorded with the reason `tool_budget`, while the agent gets the
/// budget's opaque error.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_limited_tools_use_and_denials_are_reported(pool: PgPool) {
    // A day that is over, so that it can be rolled up.
    let clock =
        arbiter_session::testing::ManualClock::new(day(5).and_hms_opt(12, 0, 0).unwrap().and_utc());
    let store = store_without_upkeep(&pool, &clock);
    let agent = Uuid::new_v4();
    let req =
        common::request(agent, &["search", "write_file"], 10).with_tool_limit("write_file", 2);
    let id = store.create(req).await.unwrap().session_id;
    store
        .use_session(id, "write_file", Some(agent))
        .await
        .unwrap();
    store
        .use_session_batch(id, &["search", "write_file"], Some(agent))
        .await
        .unwrap();
    let denied = store
        .use_session(id, "write_file", Some(agent))
        .await
        .unwrap_err();
    assert!(matches!(
        denied,
        SessionError::BudgetExceeded {
            limit: 2,
            used: 2,
            ..
        }
    ));
    assert_eq!(denied.to_string(), "session budget exceeded");
    // Later than the denial, which is recorded after the fact: the trail's order is fixed.
    clock.advance(chrono::Duration::seconds(1));
    let session = store.use_session(id, "search", Some(agent)).await.unwrap();
    assert_eq!(session.tool_limit("write_file").map(|l| l.calls), Some(2));
    assert_eq!(
        store
            .shutdown(Duration::from_secs(5))
            .await
            .unrecorded_denials,
        0
    );

    let reasons = sqlx::query_scalar!(
        "SELECT reason FROM arbiter.session_events WHERE session_id = $1 AND kind = 'denied'",
        id
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(reasons, [Some("tool_budget".to_owned())]);
    let filter = ReportFilter::default().with_agent(Some(agent));
    let rows = report::utilization(&pool, filter).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].calls_made, rows[0].denials), (4, 1));
    let write_file = &rows[0].tool_use["write_file"];
    assert_eq!((write_file.limit, write_file.calls), (2, 2));
    let csv = report::render(&rows, Format::Csv).unwrap();
    assert!(
        csv.lines().next().unwrap().ends_with(",denials,tool_use"),
        "{csv}"
    );
    assert!(csv.trim_end().ends_with(",1,write_file 2/2"), "{csv}");
    let json: serde_json::Value =
        serde_json::from_str(&report::render(&rows, Format::Json).unwrap()).unwrap();
    assert_eq!(json[0]["tool_use"]["write_file"]["calls"], 2);

    // The session's record shows the limit and the use; each allowed call of write_file
    // records its calls after it.
    let record = report::session(&pool, id).await.unwrap().expect("stored");
    assert_eq!(
        (
            record.limited_tools.clone(),
            record.tool_limits.clone(),
            record.tool_calls.clone()
        ),
        (vec!["write_file".to_owned()], vec![2], vec![2])
    );
    assert!(
        record
            .render_fields()
            .lines()
            .any(|line| line.starts_with("tool_limits") && line.ends_with("write_file 2/2")),
        "{}",
        record.render_fields()
    );
    let counted: Vec<_> = report::session_events(&pool, id)
        .await
        .unwrap()
        .into_iter()
        .map(|event| (event.kind, event.tool_calls))
        .collect();
    assert_eq!(
        counted,
        [
            ("created".to_owned(), None),
            ("call_allowed".to_owned(), Some(vec![1])),
            ("batch_allowed".to_owned(), Some(vec![2])),
            ("denied".to_owned(), None),
            ("call_allowed".to_owned(), None),
        ]
    );

    // The agent's day counts the denial in a column of its own, read from the raw events
    // and, once the day is rolled up, from the rollup.
    let tool_budget_denials = || async {
        report::agent_activity(&pool, filter)
            .await
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row.day,
                    row.calls_denied,
                    row.denied_budget,
                    row.denied_tool_budget,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(tool_budget_denials().await, [(day(5), 1, 0, 1)]);
    roll_up_all(&pool).await;
    assert_eq!(
        rollup::horizon(&pool).await.unwrap(),
        Some(Utc::now().date_naive())
    );
    assert_eq!(tool_budget_denials().await, [(day(5), 1, 0, 1)]);
    assert_eq!(
        views_against_raw(&pool).await.map(|(off, _)| off),
        [0, 0, 0, 0]
    );
}

/// With sequential scans priced out, a plan that still scans `session_events`
/// sequentially has no index to use.
async fn plan(pool: &PgPool, query: &str) -> String {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query!("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .expect("set enable_seqscan");
    // EXPLAIN of a query built at run time cannot be a checked macro.
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {query}")))
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    lines.join("\n")
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn one_session_and_one_agent_day_are_found_by_index(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let a = AGENT_A;
    let s = data.s2;
    for query in [
        format!("SELECT * FROM arbiter.session_events WHERE session_id = '{s}' ORDER BY event_id"),
        format!("SELECT * FROM arbiter.session_utilization WHERE session_id = '{s}'"),
        format!(
            "SELECT * FROM arbiter.agent_daily_activity WHERE agent_id = '{a}' AND day = '2026-03-02'"
        ),
        format!(
            "SELECT * FROM arbiter.tool_daily_usage WHERE agent_id = '{a}' AND day = '2026-03-02'"
        ),
        format!(
            "SELECT * FROM arbiter.denials_by_reason WHERE agent_id = '{a}' AND day = '2026-03-02'"
        ),
        format!("SELECT * FROM arbiter.session_utilization WHERE agent_id = '{a}'"),
    ] {
        let plan = plan(&pool, &query).await;
        assert!(!plan.contains("Seq Scan"), "{query}\n{plan}");
        assert!(plan.contains("Index"), "{query}\n{plan}");
    }
}

/// A report of the sessions since a day reads the totals of that day's sessions on, by their
/// index (migration `20261205000011`): the range reaches `session_rollup` through the
/// function's parameter, which a condition on the view's `created_at` could not. Its rows
/// are the view's of that range.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_report_since_a_day_reads_the_totals_of_that_range_only(pool: PgPool) {
    known_dataset(&pool).await;
    roll_up_all(&pool).await;
    let plan = plan(
        &pool,
        "SELECT * FROM arbiter.session_utilization_since('2026-03-02')",
    )
    .await;
    assert!(plan.contains("session_rollup_by_day"), "{plan}");
    assert!(
        !plan.contains("Function Scan on session_utilization_since"),
        "inlined: {plan}"
    );
    let (off, rows) = sqlx::query!(
        r#"WITH since AS (
               SELECT * FROM arbiter.session_utilization_since('2026-03-02')
           ), viewed AS (
               SELECT * FROM arbiter.session_utilization WHERE created_at >= '2026-03-02'
           )
           SELECT (SELECT count(*) FROM ((SELECT * FROM since EXCEPT ALL SELECT * FROM viewed)
                   UNION ALL (SELECT * FROM viewed EXCEPT ALL SELECT * FROM since)) d) AS "off!",
                  (SELECT count(*) FROM since) AS "rows!""#
    )
    .fetch_one(&pool)
    .await
    .map(|r| (r.off, r.rows))
    .expect("the report against the view");
    // S2 and S3, of day 2.
    assert_eq!((off, rows), (0, 2));
}
