//! What the schema guarantees of itself, read from PostgreSQL's catalog.

use sqlx::PgPool;

/// SQL functions left without a `search_path` of their own: PostgreSQL inlines a SQL
/// function into its caller's plan only when it has no `SET` clause, and these are
/// inlined on hot paths (the chain trigger, a CHECK, the reports' views). Each one names
/// every object of the schema in full and calls only `pg_catalog`'s functions, which
/// PostgreSQL searches first unless a caller's own `search_path` says otherwise.
const INLINED: &[&str] = &[
    "audit_micros",
    "audit_text",
    "purge_setting",
    "rollup_horizon",
    "rollup_horizon_at",
    "rollup_lock_key",
    "rollup_raw_from",
    "rollup_today_day",
    "rollup_today_lag",
    "session_purgeable",
    "session_utilization_since",
    "tool_calls_within_limits",
];

/// Procedures left without a `search_path` of their own: a procedure with a `SET` clause
/// cannot commit, and these commit between their steps. Every name in them is qualified.
const COMMITTING: &[&str] = &["purge_before"];

/// Security review, defect 7: every function of the schema, trigger functions and each
/// partition's chain function included, runs with a `search_path` of its own, so an object
/// on a caller's `search_path` cannot stand in for one of the schema's; but for the
/// inlined SQL functions and the committing procedures above.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn schema_every_function_fixes_its_search_path(pool: PgPool) {
    let unset: Vec<String> = sqlx::query_scalar!(
        r#"SELECT p.proname AS "name!"
             FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'arbiter'
              AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c(setting)
                               WHERE c.setting LIKE 'search\_path=%')
            ORDER BY 1"#
    )
    .fetch_all(&pool)
    .await
    .expect("the catalog");
    let mut expected: Vec<&str> = INLINED.iter().chain(COMMITTING).copied().collect();
    expected.sort_unstable();
    assert_eq!(unset, expected);
    let inlined_languages: Vec<String> = sqlx::query_scalar!(
        r#"SELECT DISTINCT l.lanname AS "language!"
             FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace
             JOIN pg_language l ON l.oid = p.prolang
            WHERE n.nspname = 'arbiter' AND p.proname = ANY($1) AND p.prokind = 'f'"#,
        &INLINED
            .iter()
            .map(|name| (*name).to_owned())
            .collect::<Vec<_>>()
    )
    .fetch_all(&pool)
    .await
    .expect("the catalog");
    assert_eq!(inlined_languages, ["sql"]);
}
