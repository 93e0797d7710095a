//! The shared budgets' figures: what drawing on one budget three levels deep costs
//! `use_session` (`ratio_budget_64`), what the naive design (each call updating the three
//! budget rows in its own transaction) reaches, and how many units are left unspent when a
//! budget's first denial comes and once its idle shares came back.

use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arbiter_session::budget::{BudgetId, BudgetTerms};
use arbiter_session::{PgStorage, SessionError, SessionStore};
use uuid::Uuid;

use super::{Bench, Call, compare, failed, request, store};

/// The chain every budgeted figure draws on, root first.
const CHAIN: [&str; 3] = ["bench", "bench/team", "bench/team/agents"];

/// Makes the three-level chain, each level with `limit` units for all time.
async fn chain(store: &SessionStore, limit: u64) -> Result<BudgetId, Box<dyn Error>> {
    let mut parent: Option<BudgetId> = None;
    for name in CHAIN {
        let id = BudgetId::new(format!("{name}-{}", Uuid::new_v4().simple()))?;
        let mut terms = BudgetTerms::new(limit);
        terms.parent_id = parent.take();
        store.put_budget(&id, &terms).await?;
        parent = Some(id);
    }
    Ok(parent.ok_or("a chain of three")?)
}

/// `use_session` on `n` sessions of a store, drawing on `budget` when given.
async fn using(
    storage: &PgStorage,
    n: usize,
    budget: Option<&BudgetId>,
) -> Result<impl Fn(usize) -> Call + Clone + Send + Sync + 'static, Box<dyn Error>> {
    let store = store(storage);
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut req = request(super::BIG_BUDGET);
        req.budget_id = budget.cloned();
        ids.push(store.create(req).await?.session_id);
    }
    let ids = Arc::new(ids);
    Ok(move |task: usize| -> Call {
        let (store, id) = (store.clone(), ids[task % ids.len()]);
        Box::pin(async move {
            store
                .use_session(id, "search", None)
                .await
                .map(drop)
                .map_err(failed("use_session"))
        })
    })
}

/// The naive design at `tasks`, measured like `limit`: each call, one transaction, updates
/// its session's row and appends its event (the statement `limit` sends), then the three
/// budget rows, root first (unordered, concurrent calls deadlock).
async fn naive(
    storage: &PgStorage,
    tasks: usize,
) -> Result<impl Fn(usize) -> Call + Clone + Send + Sync + 'static, Box<dyn Error>> {
    let creator = store(storage);
    let mut ids = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        ids.push(creator.create(request(super::BIG_BUDGET)).await?.session_id);
    }
    let levels: Vec<String> = CHAIN
        .iter()
        .map(|name| format!("naive-{name}-{}", Uuid::new_v4().simple()))
        .collect();
    for level in &levels {
        sqlx::query!(
            "INSERT INTO arbiter.budgets (budget_id, unit_limit) VALUES ($1, $2)",
            level,
            i64::MAX
        )
        .execute(storage.pool())
        .await?;
        sqlx::query!(
            "INSERT INTO arbiter.budget_periods (budget_id, period_start) VALUES ($1, 'epoch')",
            level
        )
        .execute(storage.pool())
        .await?;
    }
    let (ids, levels) = (Arc::new(ids), Arc::new(levels));
    let pool = storage.pool().clone();
    let instance = Uuid::new_v4();
    Ok(move |task: usize| -> Call {
        let (pool, ids, levels) = (pool.clone(), Arc::clone(&ids), Arc::clone(&levels));
        Box::pin(async move {
            let fail = |err: sqlx::Error| format!("naive write: {err}");
            #[expect(
                clippy::disallowed_methods,
                reason = "the benchmark's own transaction, never cancelled mid-BEGIN"
            )]
            let mut tx = pool.begin().await.map_err(fail)?;
            sqlx::query!(
                "WITH s AS (
                     UPDATE arbiter.sessions SET calls_made = calls_made + 1
                      WHERE session_id = $1
                     RETURNING session_id, agent_id, version, calls_made,
                               (created_at AT TIME ZONE 'UTC')::date AS day)
                 INSERT INTO arbiter.session_events (
                     event_key, session_id, agent_id, kind, tools, calls_made,
                     rate_window_calls, status, session_version, occurred_at, instance_id,
                     session_day)
                 SELECT gen_random_uuid(), session_id, agent_id, 'call_allowed', '{search}',
                        calls_made, 0, 'active', version, clock_timestamp(), $2, day
                   FROM s",
                ids[task % ids.len()],
                instance
            )
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            for level in levels.iter() {
                sqlx::query!(
                    "UPDATE arbiter.budget_periods SET allocated = allocated + 1
                      WHERE budget_id = $1 AND period_start = 'epoch'",
                    level
                )
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            }
            tx.commit().await.map_err(fail)
        })
    })
}

/// Spends a budget of `limit` units from two stores at 32 tasks each until every call has
/// been denied for `IDLE_WAIT`: the units not yet spent (held by a share) when the first
/// denial came, and when the spending stopped.
async fn near_exhaustion(
    storage: &PgStorage,
    url: &str,
    limit: u64,
) -> Result<(u64, u64), Box<dyn Error>> {
    const IDLE_WAIT: Duration = Duration::from_millis(2_500);
    let admin = store(storage);
    let budget = chain(&admin, limit).await?;
    let other = store(&PgStorage::connect(url).await?);
    let first_denial = Arc::new(AtomicU64::new(u64::MAX));
    let mut tasks = Vec::new();
    for n in 0..64 {
        let store = if n % 2 == 0 {
            admin.clone()
        } else {
            other.clone()
        };
        let mut req = request(super::BIG_BUDGET);
        req.budget_id = Some(budget.clone());
        let id = store.create(req).await?.session_id;
        let (admin, budget, first_denial) =
            (admin.clone(), budget.clone(), Arc::clone(&first_denial));
        tasks.push(tokio::spawn(async move {
            let mut denied_since: Option<std::time::Instant> = None;
            loop {
                match store.use_session(id, "search", None).await {
                    Ok(_) => denied_since = None,
                    Err(SessionError::SharedBudgetExceeded { .. }) => {
                        if first_denial.load(Ordering::Relaxed) == u64::MAX {
                            let used = admin
                                .budget(&budget)
                                .await
                                .ok()
                                .flatten()
                                .map_or(0, |b| b.used);
                            let _ = first_denial.compare_exchange(
                                u64::MAX,
                                used,
                                Ordering::Relaxed,
                                Ordering::Relaxed,
                            );
                        }
                        let since = *denied_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= IDLE_WAIT {
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(err) => return Err(format!("{err:?}")),
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let used = admin.budget(&budget).await?.ok_or("the budget")?.used;
    let at_first = first_denial.load(Ordering::Relaxed);
    other.shutdown(Duration::from_secs(5)).await;
    Ok((limit.saturating_sub(at_first), limit.saturating_sub(used)))
}

/// Every shared-budget figure; returns the units left at the first denial and after.
pub(super) async fn shared_budgets(bench: &mut Bench) -> Result<(u64, u64), Box<dyn Error>> {
    let admin = store(&bench.storage);
    let budget = chain(&admin, i64::MAX.unsigned_abs()).await?;
    let (plain, budgeted) = compare(
        64,
        bench.options.secs,
        using(&bench.storage, 64, None).await?,
        using(&bench.storage, 64, Some(&budget)).await?,
    )
    .await?;
    bench.record("use_unbudgeted_64", plain);
    bench.record("use_budget_64", budgeted);
    let (raw, naive_design) = compare(
        64,
        bench.options.secs,
        super::limit(&bench.storage, 64).await?,
        naive(&bench.storage, 64).await?,
    )
    .await?;
    bench.record("limit_budget_64", raw);
    bench.record("naive_budget_64", naive_design);
    let left = near_exhaustion(&bench.storage, &bench.url, 5_000).await?;
    eprintln!(
        "shared budget of 5000: {} units unspent at the first denial, {} once idle shares came back",
        left.0, left.1
    );
    Ok(left)
}
