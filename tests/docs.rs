//! docs/reporting.md promises that its SQL runs as written: every ```sql block is run here
//! against a database holding the known data set.

mod common;

use sqlx::PgPool;
use sqlx::Row as _;

fn sql_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn every_query_in_the_reporting_guide_runs(pool: PgPool) {
    common::known_dataset(&pool).await;
    // A budget with 3 of its 10 units spent, for the budgets query.
    sqlx::query!("SELECT arbiter.budget_put('team', NULL, 10, 'day', 'UTC', 'calls')")
        .fetch_one(&pool)
        .await
        .expect("a budget");
    let share = uuid::Uuid::new_v4();
    sqlx::query!(
        "SELECT * FROM arbiter.budget_grant($1, $2, 'team', 3, 3, '1 minute')",
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
    let guide = include_str!("../docs/reporting.md");
    let (schema, questions) = guide
        .split_once("## Ten questions")
        .expect("the guide has its ten questions");
    let blocks = sql_blocks(questions);
    assert_eq!(blocks.len(), 10, "the guide answers ten questions");
    let schema_blocks = sql_blocks(schema);
    assert_eq!(
        schema_blocks.len(),
        4,
        "the partitions, recent sessions, budgets and rollups queries"
    );
    let mut rows = Vec::new();
    for sql in schema_blocks.iter().chain(&blocks) {
        // The guide's SQL is text meant to be pasted; it cannot be a checked macro.
        let result = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_all(&pool)
            .await;
        let result = result.unwrap_or_else(|err| panic!("{sql}\nfails: {err}"));
        rows.push(result);
    }
    // The partitions query: the default partition (where the data set's days of 2026-03
    // went) and the nine days the migration created.
    assert_eq!(rows.remove(0).len(), 10);
    // The sessions of the last 24 hours that were denied: the data set's are of 2026-03.
    assert_eq!(rows.remove(0).len(), 0);
    // The budgets query: the one budget, 30 % used.
    let budgets = rows.remove(0);
    assert_eq!(budgets.len(), 1);
    assert_eq!(budgets[0].get::<i64, _>("used"), 3);
    // The rollups query: one row, whatever the data set's store rolled up.
    assert_eq!(rows.remove(0).len(), 1);
    // On the data set: S1 ran out of budget; agent A's 2026-03-02 had one active hour;
    // every one of the three sessions has two chain heads.
    assert_eq!(rows[1].len(), 1);
    assert_eq!(rows[8].len(), 1);
    assert_eq!(rows[8][0].get::<i64, _>("calls"), 1);
    assert_eq!(rows[8][0].get::<i64, _>("denied"), 2);
    // Three sessions, each with a state chain and a denial chain.
    assert_eq!(rows[9].len(), 6);
}

/// The audit trail under concurrency, defect 7: the views' days are UTC days, and
/// `current_date` is the reader's time zone's: a question that compared them answered for
/// another day wherever the session's `TimeZone` is not UTC. No query of the guide does.
#[test]
fn no_query_in_the_reporting_guide_compares_a_utc_day_with_current_date() {
    let guide = include_str!("../docs/reporting.md");
    for sql in sql_blocks(guide) {
        assert!(!sql.contains("current_date"), "{sql}");
    }
}
