//! The `arbiter-session` command-line tool, run as a process against a real database:
//! migrate, inspect, report (table, CSV, JSON), verify (intact and tampered), purge, and
//! one-line errors with a non-zero exit.

mod common;

use std::process::{Command, Output};

use common::{AGENT_A, known_dataset};
use sqlx::PgPool;

/// Runs the tool with `DATABASE_URL = url`.
fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbiter-session"))
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A failure is one line on stderr, nothing on stdout, and exit status 1.
fn assert_one_line_error(output: &Output, expected: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("arbiter-session: error: "), "{err}");
    assert!(err.contains(expected), "{err}");
    assert_eq!(stdout(output), "");
}

#[sqlx::test(migrations = false)]
async fn cli_migrates_an_empty_database(pool: PgPool) {
    let url = common::database_url(&pool).await;
    for _ in 0..2 {
        let out = cli(&url, &["migrate"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            stdout(&out),
            format!(
                "schema arbiter is up to date ({} migrations)\n",
                arbiter_session::MIGRATOR.iter().count()
            )
        );
    }
    let views = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM pg_views WHERE schemaname = 'arbiter'"#
    )
    .fetch_one(&pool)
    .await
    .expect("views readable");
    // The four reporting views and budget_usage.
    assert_eq!(views, 5);
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_reports_in_every_format(pool: PgPool) {
    known_dataset(&pool).await;
    let url = common::database_url(&pool).await;

    let out = cli(&url, &["report", "tools"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "day         tool    allowed  denied  agents  sessions\n\
         2026-03-01  fetch         1       0       1         1\n\
         2026-03-01  search        2       1       1         1\n\
         2026-03-02  fetch         1       1       1         1\n\
         2026-03-02  rm            0       1       1         1\n\
         2026-03-02  search        1       1       1         1\n"
    );
    // One day: `--until` includes its day.
    let out = cli(
        &url,
        &[
            "report",
            "tools",
            "--since",
            "2026-03-01",
            "--until",
            "2026-03-01",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "day         tool    allowed  denied  agents  sessions\n\
         2026-03-01  fetch         1       0       1         1\n\
         2026-03-01  search        2       1       1         1\n"
    );

    let a = AGENT_A.to_string();
    let out = cli(
        &url,
        &[
            "report",
            "agents",
            "--agent",
            &a,
            "--since",
            "2026-03-02",
            "--format",
            "csv",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "day,agent_id,opened,allowed,denied,agent_mismatch,closed,expired,budget,tool,rate,write_through,invalid,tool_budget\r\n\
             2026-03-02,{a},1,1,2,1,0,0,0,1,0,0,0,0\r\n"
        )
    );

    let out = cli(&url, &["report", "denials", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(
        json,
        serde_json::json!([
            {"day": "2026-03-01", "reason": "budget", "denials": 1, "agents": 1, "sessions": 1},
            {"day": "2026-03-02", "reason": "agent_mismatch", "denials": 1, "agents": 1, "sessions": 1},
            {"day": "2026-03-02", "reason": "closed", "denials": 1, "agents": 1, "sessions": 1},
            {"day": "2026-03-02", "reason": "tool", "denials": 1, "agents": 1, "sessions": 1},
        ])
    );

    let out = cli(&url, &["report", "utilization", "--agent", &a]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("session_id "), "{text}");
    assert!(
        lines[1].contains(" closed ") && lines[1].contains(" 100.0 "),
        "{text}"
    );
    assert!(
        lines[2].contains(" expired ") && lines[2].contains(" 10.0 "),
        "{text}"
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_rolls_up_past_days_and_reports_the_same(pool: PgPool) {
    known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let before = cli(&url, &["report", "agents", "--format", "csv"]);
    assert!(before.status.success(), "{}", stderr(&before));

    // Every day from the data set's first to yesterday that the store's upkeep had not
    // sealed is rolled up now. The upkeep may still be rolling up too: a day it holds is
    // busy for the command, which then stops there (and says so); a later run goes on. The
    // command runs off this runtime's only thread, so that the upkeep's task, on this
    // thread, can finish the day it holds meanwhile.
    let today = chrono::Utc::now().date_naive();
    let horizon = format!("reports read rollups before {today} and raw events from it on");
    let mut runs = 0;
    loop {
        runs += 1;
        let out = {
            let url = url.clone();
            tokio::task::spawn_blocking(move || cli(&url, &["rollup"]))
                .await
                .expect("the command ran")
        };
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        let mut lines: Vec<&str> = text.lines().collect();
        let horizon_at = lines.iter().position(|line| *line == horizon);
        let done = horizon_at.is_some();
        if let Some(at) = horizon_at {
            assert_today_rolled_up(&out);
            lines.truncate(at);
        } else {
            assert!(stderr(&out).contains(" is busy "), "{}", stderr(&out));
        }
        assert!(
            lines.iter().all(|line| line.starts_with("rolled up 2026-")),
            "{text}"
        );
        if done {
            break;
        }
        assert!(runs < 20, "a day stayed busy through 20 runs");
    }
    let sealed = sqlx::query!(
        "SELECT day, events FROM arbiter.rollup_days WHERE day < '2026-03-03' ORDER BY day"
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sealed: Vec<_> = sealed
        .iter()
        .map(|r| (r.day.to_string(), r.events))
        .collect();
    assert_eq!(
        sealed,
        vec![("2026-03-01".to_owned(), 5), ("2026-03-02".to_owned(), 8)]
    );
    let after = cli(&url, &["report", "agents", "--format", "csv"]);
    assert_eq!(stdout(&after), stdout(&before));

    let again = cli(&url, &["rollup"]);
    assert_eq!(stdout(&again).lines().next(), Some(horizon.as_str()));
    assert_today_rolled_up(&again);
}

/// `rollup` ended with today's line: rolled up to an instant, or (the upkeep rolling it up
/// at the same time) busy.
fn assert_today_rolled_up(out: &Output) {
    let text = stdout(out);
    match text.lines().last() {
        Some(line) if line.starts_with("today's events are rolled up to 20") => {}
        _ => assert!(
            stderr(out).contains("today is busy"),
            "{text}{}",
            stderr(out)
        ),
    }
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_inspects_and_verifies_and_finds_tampering(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let s1 = data.s1.to_string();

    let out = cli(&url, &["inspect", &s1]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("session_id           {s1}")),
        "{text}"
    );
    let kinds: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with("event_id"))
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(3))
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "call_allowed",
            "batch_allowed",
            "denied",
            "closed"
        ],
        "{text}"
    );

    let out = cli(&url, &["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "ok: 3 sessions, 9 chained events, 4 chained denials, every chain intact\n"
    );
    let out = cli(&url, &["verify", "--session", &s1]);
    assert!(stdout(&out).starts_with(&format!("ok: session {s1} has 4 chained events; head ")));

    common::tamper(
        &pool,
        &format!(
            "UPDATE arbiter.session_events SET tools = '{{fetch}}' \
              WHERE session_id = '{s1}' AND kind = 'call_allowed'"
        ),
    )
    .await;
    let out = cli(&url, &["verify"]);
    assert_eq!(out.status.code(), Some(3));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("BROKEN session {s1} event ")),
        "{text}"
    );
    assert!(
        text.contains("(call_allowed): hash does not match the row"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "1 of 3 sessions have a broken audit chain (7 chained events, 3 chained denials checked)\n"
        ),
        "{text}"
    );
    let out = cli(&url, &["verify", "--session", &data.s2.to_string()]);
    assert_eq!(out.status.code(), Some(0));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_archives_only_what_it_can_drop_whole(pool: PgPool) {
    known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("arbiter-archive-{}", uuid::Uuid::new_v4()));
    let dir_arg = dir.to_string_lossy().into_owned();

    let out = cli(
        &url,
        &["purge", "--before", "2026-03-01", "--archive", &dir_arg],
    );
    assert_eq!(out.status.code(), Some(2), "--archive needs --events");

    let now = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .expect("now");
    let out = cli(
        &url,
        &[
            "purge",
            "--before",
            &now.to_rfc3339(),
            "--events",
            "--archive",
            &dir_arg,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // The data set's days have no partition of their own (their events are in the default
    // partition): no partition can go whole, so no event goes, and nothing is written.
    assert_eq!(
        stdout(&out),
        format!(
            "purged 3 sessions and 0 events that ended before {}\n",
            now.to_rfc3339()
        )
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_purges_and_fails_in_one_line(pool: PgPool) {
    known_dataset(&pool).await;
    let url = common::database_url(&pool).await;

    assert_one_line_error(
        &cli(&url, &["purge", "--before", "2999-01-01"]),
        "purge cutoff 2999-01-01 00:00:00 UTC is in the future",
    );
    // Nothing ended before the data set's first day (ends are judged by the database's
    // clock: `updated_at`, written when the row last changed).
    let out = cli(&url, &["purge", "--before", "2026-03-01"]);
    assert_eq!(
        stdout(&out),
        "purged 0 sessions and 0 events that ended before 2026-03-01T00:00:00+00:00\n"
    );
    let now = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(&pool)
        .await
        .expect("now");
    let out = cli(&url, &["purge", "--before", &now.to_rfc3339(), "--events"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "purged 3 sessions and 13 events that ended before {}\n",
            now.to_rfc3339()
        )
    );
    assert_one_line_error(
        &cli(&url, &["inspect", &uuid::Uuid::nil().to_string()]),
        "session 00000000-0000-0000-0000-000000000000 not found",
    );
    assert_one_line_error(
        &cli("postgres://postgres@127.0.0.1:1/none", &["verify"]),
        "cannot connect to DATABASE_URL",
    );
    assert_one_line_error(
        &cli("not a url", &["verify"]),
        "cannot connect to DATABASE_URL",
    );
    // Usage errors are clap's: exit status 2 and a hint.
    let out = cli(&url, &["report", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_ensures_and_lists_partitions_and_warns_of_the_default_one(pool: PgPool) {
    let url = common::database_url(&pool).await;
    let out = cli(&url, &["partitions", "ensure", "--days-ahead", "9"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "created 2 partitions; every day through 9 days ahead has one\n"
    );
    assert_eq!(stderr(&out), "", "the default partition is empty");
    let out = cli(&url, &["partitions", "list", "--format", "csv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines[0], "partition,day,estimated_rows,bytes");
    assert!(
        lines[1].starts_with("arbiter.session_events_default,,"),
        "{listed}"
    );
    assert_eq!(lines.len(), 1 + 1 + 11, "{listed}");
    let out = cli(&url, &["partitions", "ensure", "--days-ahead", "367"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error: {}",
        stderr(&out)
    );

    // The data set's days (March 2026) have no partition: its events are in the default
    // one, and inspecting says so.
    let data = known_dataset(&pool).await;
    let out = cli(&url, &["inspect", &data.s1.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .starts_with("arbiter-session: warning: arbiter.session_events_default holds events"),
        "{}",
        stderr(&out)
    );
}

/// What a superuser could do that `verify` alone cannot see: rewrite a session's events
/// and let the chain trigger recompute every hash (same ids, same times, valid chain).
async fn rewrite_with_valid_chain(pool: &PgPool, session: uuid::Uuid) {
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut tx = pool.begin().await.expect("begin");
    for statement in [
        "ALTER TABLE arbiter.session_events DISABLE TRIGGER session_events_append_only".to_owned(),
        format!(
            "CREATE TEMPORARY TABLE copied ON COMMIT DROP AS SELECT * FROM arbiter.session_events
              WHERE session_id = '{session}' AND kind <> 'denied'"
        ),
        format!(
            "DELETE FROM arbiter.session_events WHERE session_id = '{session}' AND kind <> 'denied'"
        ),
        "INSERT INTO arbiter.session_events (event_id, event_key, session_id, agent_id, kind,
                tools, calls_made, rate_window_calls, status, session_version, occurred_at,
                recorded_at, instance_id, session_day)
         SELECT event_id, event_key, session_id, agent_id, kind,
                CASE WHEN kind = 'call_allowed' THEN '{fetch}' ELSE tools END, calls_made,
                rate_window_calls, status, session_version, occurred_at, recorded_at,
                instance_id, session_day
           FROM copied ORDER BY event_id"
            .to_owned(),
        "ALTER TABLE arbiter.session_events ENABLE TRIGGER session_events_append_only".to_owned(),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut *tx)
            .await
            .expect(&statement);
    }
    tx.commit().await.expect("commit");
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_checkpoint_proves_no_chain_was_rewritten_since(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("arbiter-checkpoint-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("heads.jsonl");
    let path = file.to_str().expect("utf-8 path");

    let out = cli(&url, &["checkpoint", "--append", path]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "checkpoint of 3 sessions (9 chained events, 4 chained denials) appended to {path}\n"
        )
    );
    let out = cli(&url, &["verify", "--against", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("ok: 3 sessions of the checkpoint of "),
        "{}",
        stdout(&out)
    );

    // A rewrite with a recomputed chain: `verify` sees nothing, the checkpoint does.
    rewrite_with_valid_chain(&pool, data.s1).await;
    let out = cli(&url, &["verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the chain itself is valid again"
    );
    // The newest event of another session removed.
    common::tamper(
        &pool,
        &format!(
            "DELETE FROM arbiter.session_events WHERE session_id = '{}' AND kind = 'closed'",
            data.s3
        ),
    )
    .await;
    let out = cli(&url, &["verify", "--against", path]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "REWRITTEN session {}: its chain no longer passes through the head recorded at link 4 (rewritten)",
            data.s1
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "REWRITTEN session {}: had 3 chained events at the checkpoint, has 2 now (links were removed)",
            data.s3
        )),
        "{text}"
    );
    assert!(
        text.contains("TAMPERED: 2 chains rewritten since the checkpoint of "),
        "{text}"
    );

    // A new checkpoint appended to the same file is the one checked; sessions a purge
    // recorded in it are gone, not rewritten.
    let out = cli(&url, &["checkpoint", "--append", path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(
        &url,
        &[
            "purge",
            "--before",
            &chrono::Utc::now().to_rfc3339(),
            "--events",
            "--record",
            path,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&url, &["verify", "--against", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("0 sessions of the checkpoint of ")
            && stdout(&out).contains("3 purged since"),
        "{}",
        stdout(&out)
    );
    let out = cli(
        &url,
        &["verify", "--against", dir.join("missing").to_str().unwrap()],
    );
    assert_one_line_error(&out, "cannot open");
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_exports_events_in_order_with_their_hashes(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let range = ["--since", "2026-03-01", "--until", "2026-03-03"];
    let out = cli(&url, &[&["export"][..], &range[..]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    // 4 + 2 + 3 state-changing events and 4 denials.
    assert_eq!(events.len(), 13);
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["event_id"].as_i64().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in event_id order: {ids:?}"
    );
    for event in &events {
        assert_eq!(event["hash"].as_str().unwrap().len(), 64, "{event}");
        assert_eq!(event["prev_hash"].as_str().unwrap().len(), 64, "{event}");
    }
    // The export carries what verifying a chain needs: each link names its predecessor, in
    // each of a session's two chains (state-changing events, denials).
    for denials in [false, true] {
        let chain: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| {
                e["session_id"] == data.s2.to_string() && (e["kind"] == "denied") == denials
            })
            .collect();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0]["prev_hash"], "0".repeat(64));
        assert_eq!(chain[1]["prev_hash"], chain[0]["hash"]);
    }

    let out = cli(
        &url,
        &[
            &[
                "export",
                "--format",
                "csv",
                "--agent",
                &data.agent_b.to_string(),
            ][..],
            &range[..],
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = stdout(&out);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("event_id,event_key,session_id,agent_id,kind,"),
        "{csv}"
    );
    assert!(
        lines[0].ends_with(
            ",session_day,limited_tools,tool_calls,prev_hash,hash,presented_agent_id,tool_count,cost,share_id,budget_id"
        ),
        "{csv}"
    );
    // Agent B's session s3: created, a call, closed, and a denial after the close.
    assert_eq!(lines.len(), 1 + 4, "{csv}");
    let out = cli(
        &url,
        &["export", "--since", "2026-03-02", "--until", "2026-03-01"],
    );
    assert_one_line_error(&out, "export range is empty");
}

/// The audit trail under concurrency, defect 5. A checkpoint's session whose trail is gone
/// must have been purged, and the purge must say so where the checkpoints live: `verify
/// --against` fails for a trail that vanished without a purge's record, and for a session
/// whose row is stored while its trail is gone (which no purge can leave); a purge run
/// with `--record` appends the trails it removes to the checkpoint file, and those are gone,
/// not tampered with.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_verify_against_tells_a_purged_trail_from_a_vanished_one(pool: PgPool) {
    let data = known_dataset(&pool).await;
    let url = common::database_url(&pool).await;
    let dir = std::env::temp_dir().join(format!("arbiter-purge-record-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let path = dir.join("checkpoints.jsonl");
    let path = path.to_str().expect("a UTF-8 path");
    assert!(
        cli(&url, &["checkpoint", "--append", path])
            .status
            .success()
    );

    // S1's trail goes behind the purge's back while its row stays; S3's row and trail go.
    common::tamper(
        &pool,
        &format!(
            "DELETE FROM arbiter.session_events WHERE session_id IN ('{}', '{}')",
            data.s1, data.s3
        ),
    )
    .await;
    common::tamper_sessions(
        &pool,
        &format!(
            "DELETE FROM arbiter.sessions WHERE session_id = '{}'",
            data.s3
        ),
    )
    .await;
    let vanished = |text: &str, session: uuid::Uuid, why: &str| {
        text.contains(&format!("VANISHED session {session}: {why}"))
    };
    let out = cli(&url, &["verify", "--against", path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        vanished(&text, data.s1, "its row is stored but its trail is gone"),
        "{text}"
    );
    assert!(
        vanished(&text, data.s3, "its trail is gone and no purge recorded it"),
        "{text}"
    );

    // A recorded purge: S2's trail goes, and the file says so; S1 and S3 stay vanished.
    let out = cli(
        &url,
        &[
            "purge",
            "--before",
            &chrono::Utc::now().to_rfc3339(),
            "--events",
            "--record",
            path,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cli(&url, &["verify", "--against", path]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(!text.contains(&data.s2.to_string()), "{text}");
    assert!(
        vanished(&text, data.s1, "its trail is gone and no purge recorded it"),
        "{text}"
    );
    assert!(text.contains("1 purged since"), "{text}");
    // A checkpoint taken since holds none of them: nothing vanished after it.
    assert!(
        cli(&url, &["checkpoint", "--append", path])
            .status
            .success()
    );
    let out = cli(&url, &["verify", "--against", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    std::fs::remove_dir_all(&dir).expect("clean up");
}

/// `budgets set|list|show` and `report budgets`: what the store's budget calls and the
/// view `arbiter.budget_usage` say, printed; a bad time zone or an unknown budget is one
/// line on stderr.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn cli_sets_lists_and_reports_budgets(pool: PgPool) {
    let url = common::database_url(&pool).await;
    let out = cli(
        &url,
        &["budgets", "set", "team", "--limit", "10", "--period", "day"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "budget team created\n");
    let out = cli(
        &url,
        &[
            "budgets", "set", "team/a", "--limit", "4", "--parent", "team", "--unit", "tokens",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let day_start: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar!(r#"SELECT date_trunc('day', now(), 'UTC') AS "start!""#)
            .fetch_one(&pool)
            .await
            .expect("today");
    // Three units of team/a spent through a share, as a process would.
    let share = uuid::Uuid::new_v4();
    sqlx::query!(
        "SELECT * FROM arbiter.budget_grant($1, $2, 'team/a', 3, 3, '1 minute')",
        share,
        uuid::Uuid::new_v4()
    )
    .fetch_one(&pool)
    .await
    .expect("a grant");
    sqlx::query!(
        "UPDATE arbiter.budget_shares SET used = 3 WHERE share_id = $1",
        share
    )
    .execute(&pool)
    .await
    .expect("spent");

    let start = day_start.format("%Y-%m-%d %H:%M:%S").to_string();
    let out = cli(&url, &["budgets", "list", "--format", "csv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "budget_id,parent_id,limit,period,unit,time_zone,period_start,used,reserved,remaining\r\n\
             team,,10,day,calls,UTC,{start},3,0,7\r\n\
             team/a,team,4,none,tokens,UTC,1970-01-01 00:00:00,3,0,1\r\n"
        )
    );
    let out = cli(&url, &["budgets", "show", "team/a", "--format", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(json[0]["remaining"], 1, "{json}");
    assert_eq!(json[0]["parent_id"], "team", "{json}");

    let end = (day_start + chrono::Duration::days(1))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let out = cli(&url, &["report", "budgets", "--format", "csv"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "budget_id,period_start,period_end,limit,unit,used,used_pct,allocated,reserved,overrun\r\n\
             team,{start},{end},10,calls,3,30.0,3,0,0\r\n\
             team/a,1970-01-01 00:00:00,,4,tokens,3,75.0,3,0,0\r\n"
        )
    );

    assert_one_line_error(
        &cli(
            &url,
            &[
                "budgets",
                "set",
                "x",
                "--limit",
                "1",
                "--time-zone",
                "Mars/Olympus",
            ],
        ),
        "time_zone is not a time zone the database knows",
    );
    assert_one_line_error(
        &cli(&url, &["budgets", "set", "a b", "--limit", "1"]),
        "a budget id is 1 to 128 characters",
    );
    assert_one_line_error(
        &cli(&url, &["budgets", "show", "nobody"]),
        "budget nobody not found",
    );

    // The share's used was written by hand, without the events that would explain it.
    let out = cli(&url, &["verify"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "MISMATCH share {share}: used 3, its events cost 0"
        )),
        "{text}"
    );
    assert!(
        text.ends_with("1 shares of shared budgets do not match the costs of their events\n"),
        "{text}"
    );
}
