//! Shared budgets in PostgreSQL: the tree's checks (cycles, depth, fixed periods, also
//! against an operator's SQL and a concurrent change), calendar periods in a time zone, and
//! the escrow functions (migration `20261206000005_shared_budgets.sql`): grants never take
//! any level of a tree past its limit, whoever races; a tree's units all get spent; an
//! expired share comes back exactly and cannot be spent after; a release keeps what is
//! spent or in flight; a lowered limit closes the shares and grants within it.

mod common;

use std::time::Duration;

use arbiter_session::SessionStore;
use arbiter_session::budget::{BudgetId, BudgetTerms, Period};
use chrono::{DateTime, Utc};
use common::put_budget as put;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// A grant's answer.
#[derive(Debug)]
struct Grant {
    share_open: bool,
    added: i64,
    granted: i64,
    room: i64,
}

async fn grant(
    pool: &PgPool,
    share: Uuid,
    holder: Uuid,
    budget: &str,
    (need, want): (i64, i64),
    lease: Duration,
) -> Grant {
    let lease = sqlx::postgres::types::PgInterval::try_from(lease).expect("a lease");
    let row = sqlx::query!(
        r#"SELECT share_open AS "share_open!", added AS "added!", granted AS "granted!",
                  room AS "room!"
             FROM arbiter.budget_grant($1, $2, $3, $4, $5, $6)"#,
        share,
        holder,
        budget,
        need,
        want,
        lease
    )
    .fetch_one(pool)
    .await
    .expect("the grant runs");
    Grant {
        share_open: row.share_open,
        added: row.added,
        granted: row.granted,
        room: row.room,
    }
}

/// Spends `units` of `share`, as a holder's write does.
async fn spend(pool: &PgPool, share: Uuid, units: i64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE arbiter.budget_shares SET used = used + $2 WHERE share_id = $1",
        share,
        units
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// `(used, allocated)` of `budget` in its current period.
async fn usage(pool: &PgPool, budget: &str) -> (i64, i64) {
    let row = sqlx::query!(
        r#"SELECT u.used AS "used!", u.allocated AS "allocated!"
             FROM arbiter.budget_usage u
             JOIN arbiter.budgets b USING (budget_id)
            CROSS JOIN LATERAL arbiter.budget_period_bounds(b.period, b.time_zone, now()) p
            WHERE u.budget_id = $1 AND u.period_start = p.period_start"#,
        budget
    )
    .fetch_one(pool)
    .await
    .expect("the budget has a current period");
    (row.used, row.allocated)
}

/// Every period row's allocation is the sum of its shares' grants (less the releases and
/// plus the overruns of settlements a grant has counted).
async fn assert_allocation_is_the_sum_of_grants(pool: &PgPool) {
    let off = sqlx::query!(
        r#"SELECT p.budget_id AS "budget_id!", p.allocated AS "allocated!",
                  coalesce(sum(s.granted), 0)::bigint AS "granted!"
             FROM arbiter.budget_periods p
             LEFT JOIN (SELECT s.granted - s.credited_counted + s.overrun_counted AS granted,
                               c.budget_id, c.period_start
                          FROM arbiter.budget_shares s,
                               unnest(s.chain, s.period_starts) AS c(budget_id, period_start)) s
                    ON s.budget_id = p.budget_id AND s.period_start = p.period_start
            GROUP BY p.budget_id, p.period_start, p.allocated
           HAVING p.allocated <> coalesce(sum(s.granted), 0)"#
    )
    .fetch_all(pool)
    .await
    .expect("the check runs");
    let off: Vec<_> = off
        .into_iter()
        .map(|r| (r.budget_id, r.allocated, r.granted))
        .collect();
    assert!(off.is_empty(), "allocated, granted: {off:?}");
}

/// 16 holders race for a tree whose root allows 100 units and whose two branches allow 70
/// each, each spending everything it is granted until no grant is possible: no level ever
/// passes its limit, and the root's 100 units are all spent.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn racing_holders_spend_a_tree_exactly(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "root", 100, None).await;
    for branch in ["a", "b"] {
        put(&store, branch, 70, Some("root")).await;
        put(&store, &format!("{branch}/leaf"), 1_000, Some(branch)).await;
    }
    let racing = PgPoolOptions::new()
        .max_connections(16)
        .connect(&common::database_url(&pool).await)
        .await
        .expect("a pool of 16");
    let holders: Vec<_> = (0..16)
        .map(|n| {
            let pool = racing.clone();
            let leaf = if n % 2 == 0 { "a/leaf" } else { "b/leaf" };
            tokio::spawn(async move {
                let (share, holder) = (Uuid::new_v4(), Uuid::new_v4());
                let mut spent = 0;
                loop {
                    let granted =
                        grant(&pool, share, holder, leaf, (1, 3), Duration::from_secs(60)).await;
                    assert!(granted.share_open, "{granted:?}");
                    if granted.added == 0 {
                        return spent;
                    }
                    spend(&pool, share, granted.added)
                        .await
                        .expect("a share's own units are spent");
                    spent += granted.added;
                }
            })
        })
        .collect();
    let mut spent = 0;
    for holder in holders {
        spent += holder.await.expect("the holder ran");
    }
    assert_eq!(spent, 100, "every unit of the root is spent, no more");
    assert_eq!(usage(&pool, "root").await, (100, 100));
    let (a, _) = usage(&pool, "a").await;
    let (b, _) = usage(&pool, "b").await;
    assert!(a <= 70 && b <= 70 && a + b == 100, "a {a}, b {b}");
    assert_eq!(usage(&pool, "a/leaf").await.0, a);
    assert_allocation_is_the_sum_of_grants(&pool).await;
}

/// A holder that stops renewing loses its unused units to the next grant of its tree:
/// exactly granted - used comes back, its share is closed, and what it writes afterwards is
/// refused by the database.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_expired_share_comes_back_exactly_and_cannot_be_spent(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 10, None).await;
    let (first, first_holder) = (Uuid::new_v4(), Uuid::new_v4());
    let short = Duration::from_millis(200);
    let granted = grant(&pool, first, first_holder, "team", (1, 100), short).await;
    assert_eq!(
        (granted.added, granted.room),
        (5, 10),
        "half of what is left"
    );
    spend(&pool, first, 3).await.expect("within the share");
    tokio::time::sleep(short * 2).await;

    let (second, second_holder) = (Uuid::new_v4(), Uuid::new_v4());
    let long = Duration::from_secs(60);
    let granted = grant(&pool, second, second_holder, "team", (1, 100), long).await;
    assert_eq!(granted.room, 7, "the expired share kept only what it used");
    assert_eq!(granted.added, 4);
    let closed = sqlx::query!(
        r#"SELECT granted, used, closed_at IS NOT NULL AS "closed!"
             FROM arbiter.budget_shares WHERE share_id = $1"#,
        first
    )
    .fetch_one(&pool)
    .await
    .expect("the first share");
    assert_eq!((closed.granted, closed.used, closed.closed), (3, 3, true));
    let again = grant(&pool, first, first_holder, "team", (1, 1), long).await;
    assert!(!again.share_open, "a closed share takes no more units");
    assert_eq!(again.added, 0);
    let late = spend(&pool, first, 1)
        .await
        .expect_err("the share is spent out");
    let constraint = late.as_database_error().and_then(|db| db.constraint());
    assert_eq!(constraint, Some("budget_shares_used_within_granted"));
    assert_eq!(usage(&pool, "team").await, (3, 7));
    assert_allocation_is_the_sum_of_grants(&pool).await;
}

/// A release keeps what the holder spent or is spending (`keep`), never less than what it
/// wrote, and a closing release keeps exactly what it wrote.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_release_keeps_what_is_spent_or_in_flight(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "team", 20, None).await;
    let (share, holder) = (Uuid::new_v4(), Uuid::new_v4());
    let long = Duration::from_secs(60);
    assert_eq!(
        grant(&pool, share, holder, "team", (1, 8), long)
            .await
            .granted,
        8
    );
    spend(&pool, share, 2).await.expect("within the share");
    let release = |keep: i64, close: bool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar!(
                r#"SELECT arbiter.budget_share_release($1, $2, $3) AS "returned!""#,
                share,
                keep,
                close
            )
            .fetch_one(&pool)
            .await
            .expect("the release runs")
        }
    };
    assert_eq!(release(5, false).await, 3, "5 kept: 2 spent, 3 in flight");
    assert_eq!(release(1, false).await, 3, "never below what it wrote");
    assert_eq!(usage(&pool, "team").await, (2, 2));
    spend(&pool, share, 1)
        .await
        .expect_err("nothing left to spend");
    assert_eq!(release(0, true).await, 0);
    assert_eq!(release(0, true).await, 0, "a closed share returns nothing");
    assert_allocation_is_the_sum_of_grants(&pool).await;
}

/// Lowering a limit closes the shares holding units of the budget (what they used stays
/// used, the rest comes back) and grants only within the new limit; raising it grants
/// again. Nothing spent is lost.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn a_lowered_limit_closes_shares_and_grants_within_it(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "root", 10, None).await;
    put(&store, "leaf", 10, Some("root")).await;
    let long = Duration::from_secs(60);
    let (share, holder) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        grant(&pool, share, holder, "leaf", (1, 10), long)
            .await
            .added,
        5
    );
    spend(&pool, share, 2).await.expect("within the share");
    put(&store, "root", 3, None).await;
    spend(&pool, share, 1)
        .await
        .expect_err("the share is closed: it holds what it used");
    assert_eq!(usage(&pool, "root").await, (2, 2));
    let (other, other_holder) = (Uuid::new_v4(), Uuid::new_v4());
    let granted = grant(&pool, other, other_holder, "leaf", (1, 10), long).await;
    assert_eq!((granted.added, granted.room), (1, 1));
    let none = grant(&pool, other, other_holder, "leaf", (1, 1), long).await;
    assert_eq!((none.added, none.room), (0, 0));
    put(&store, "root", 8, None).await;
    let more = grant(&pool, other, other_holder, "leaf", (1, 10), long).await;
    assert_eq!((more.added, more.granted, more.room), (3, 4, 5));
    assert_allocation_is_the_sum_of_grants(&pool).await;
}

/// A limit as large as a bigint grants without overflowing.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_largest_limit_grants(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "root", i64::MAX.unsigned_abs(), None).await;
    put(&store, "leaf", i64::MAX.unsigned_abs(), Some("root")).await;
    let granted = grant(
        &pool,
        Uuid::new_v4(),
        Uuid::new_v4(),
        "leaf",
        (1, i64::MAX),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(granted.room, i64::MAX);
    assert_eq!(granted.added, i64::MAX / 2 + 1);
    assert_allocation_is_the_sum_of_grants(&pool).await;
}

/// A day or a month starts at local midnight in the budget's time zone, whatever the
/// offset does: a spring-forward day in New York has 23 hours.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn periods_start_at_local_midnight(pool: PgPool) {
    let bounds = |period: &'static str, zone: &'static str, at: &'static str| {
        let pool = pool.clone();
        async move {
            let at: DateTime<Utc> = at.parse().expect("a timestamp");
            let row = sqlx::query!(
                r#"SELECT period_start AS "start!", period_end FROM arbiter.budget_period_bounds($1, $2, $3)"#,
                period,
                zone,
                at
            )
            .fetch_one(&pool)
            .await
            .expect("the bounds");
            (
                row.start.to_rfc3339(),
                row.period_end.map(|end| end.to_rfc3339()),
            )
        }
    };
    assert_eq!(
        bounds("day", "America/New_York", "2026-03-08T12:00:00Z").await,
        (
            "2026-03-08T05:00:00+00:00".to_owned(),
            Some("2026-03-09T04:00:00+00:00".to_owned())
        )
    );
    assert_eq!(
        bounds("month", "Pacific/Auckland", "2026-12-06T08:00:00Z").await,
        (
            "2026-11-30T11:00:00+00:00".to_owned(),
            Some("2026-12-31T11:00:00+00:00".to_owned())
        )
    );
    assert_eq!(
        bounds("day", "UTC", "2026-12-31T23:59:59Z").await,
        (
            "2026-12-31T00:00:00+00:00".to_owned(),
            Some("2027-01-01T00:00:00+00:00".to_owned())
        )
    );
    assert_eq!(
        bounds("none", "UTC", "2026-12-06T08:00:00Z").await,
        ("1970-01-01T00:00:00+00:00".to_owned(), None)
    );
    let store = SessionStore::postgres(pool.clone());
    let mut terms = BudgetTerms::new(5);
    terms.period = Period::Day;
    terms.time_zone = "Asia/Kolkata".to_owned();
    let id = BudgetId::new("india").expect("an id");
    store.put_budget(&id, &terms).await.expect("written");
    let usage = store.budget(&id).await.expect("read").expect("exists");
    let local = usage
        .period_start
        .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600 + 1800).expect("IST"));
    assert_eq!(local.format("%H:%M").to_string(), "00:00");
    assert_eq!(
        usage.period_end.map(|end| end - usage.period_start),
        Some(chrono::Duration::days(1))
    );
}

/// The tree's checks hold against an operator's SQL too, and two concurrent changes that
/// would make a cycle together do not: the second waits for the first and is refused.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_tree_stays_acyclic_under_concurrent_changes(pool: PgPool) {
    let store = SessionStore::postgres(pool.clone());
    put(&store, "a", 1, None).await;
    put(&store, "b", 1, None).await;
    let constraint = |err: sqlx::Error| {
        err.as_database_error()
            .and_then(|db| db.constraint().map(str::to_owned))
    };
    #[expect(
        clippy::disallowed_methods,
        reason = "a test stepping two transactions"
    )]
    let mut first = pool.begin().await.expect("begin");
    sqlx::query!("UPDATE arbiter.budgets SET parent_id = 'b' WHERE budget_id = 'a'")
        .execute(&mut *first)
        .await
        .expect("a under b");
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query!("UPDATE arbiter.budgets SET parent_id = 'a' WHERE budget_id = 'b'")
                .execute(&pool)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second change waits for the first"
    );
    first.commit().await.expect("commit");
    let refused = second
        .await
        .expect("the task ran")
        .expect_err("a cycle is refused");
    assert_eq!(constraint(refused).as_deref(), Some("budgets_acyclic"));

    for (sql, name) in [
        (
            "UPDATE arbiter.budgets SET period = 'day' WHERE budget_id = 'a'",
            "budgets_period_fixed",
        ),
        (
            "INSERT INTO arbiter.budgets (budget_id, unit_limit, time_zone) VALUES ('c', 1, 'Nowhere/Else')",
            "budgets_time_zone_known",
        ),
        (
            "DELETE FROM arbiter.budgets WHERE budget_id = 'a'",
            "budgets_kept",
        ),
        (
            "UPDATE arbiter.budgets SET parent_id = 'a' WHERE budget_id = 'a'",
            "budgets_acyclic",
        ),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err("refused");
        assert_eq!(constraint(err).as_deref(), Some(name), "{sql}");
    }
    let depth: i32 = sqlx::query_scalar!(r#"SELECT arbiter.budget_max_depth() AS "d!""#)
        .fetch_one(&pool)
        .await
        .expect("the depth");
    assert_eq!(
        usize::try_from(depth).expect("positive"),
        arbiter_session::budget::MAX_DEPTH
    );
}
