//! Model-based property test: random sequences of create / use / batch / close / expire
//! across two stores sharing one PostgreSQL database, with write faults injected and
//! healed at random. After a final heal and shutdown, these invariants (stated in
//! `docs/architecture.md`) are checked against a reference model of what every answer
//! promised:
//!
//! 1. Budget: `ok <= calls_made <= budget`, and `calls_made <= ok + uncertain` (a call is
//!    counted only if it was attempted and not denied by policy).
//! 2. Durability: every `Ok` is in the row (`calls_made >= ok`; an acknowledged close is
//!    closed).
//! 3. Monotonic status: once a store answered closed or expired, the row is not active.
//! 4. Convergence: both pending sets drain; no cache is ahead of storage afterwards; the
//!    audit trail counts exactly `calls_made`.
//!
//! Beyond those four, the operations that found two defects of the store are here too: the
//! stores share one clock that advances, and every session has a rate window, whose limit
//! the audit trail must never pass within one window (replayed from the trail with the
//! policy's fixed windows); and a change feed reset (the whole cache dropped) in the middle
//! of a hung write, followed by a second mutation of the same session, after which a close
//! answered `StorageWriteThrough` must still reach storage, and a `get` after a close
//! answered `Ok` must never show the session active.
//!
//! Every session also limits one of its two tools (`w`, [`WRITE_LIMIT`] calls): the row
//! never counts more, every `Ok` call of it is counted, none is counted that was not
//! attempted, and the audit trail counts exactly what the row does.
//!
//! And every session draws on one shared budget two levels deep whose root allows
//! [`SHARED_LIMIT`] units (a call of `w` costs [`WRITE_COST`], of `t` 1): the root never
//! uses more, every `Ok` call's units are used, none that was not attempted, and every
//! share's use is what its events cost. Calls reserve units and reservations are settled,
//! by either store, at less or more than their estimates: each is settled at most once,
//! the root charges what the answers promised (an `Ok` settlement's actual cost, else the
//! estimate or an uncertain settlement's), and never past its limit but for overruns.
//!
//! The default run is short (`ARBITER_PROPTEST_CASES`, default 12, raises it); each case
//! uses fresh sessions in one database made for the test and dropped afterwards.

mod common;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use arbiter_session::budget::{BudgetId, BudgetTerms};
use arbiter_session::testing::{FaultyStorage, ManualClock};
use arbiter_session::{
    PgStorage, SessionError, SessionStatus, SessionStore, Settlement, TaskSession,
};
use chrono::{DateTime, Duration, Utc};
use common::{audited_calls, request, row};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const SESSIONS: usize = 3;
const BUDGET: u64 = 6;
/// Every session allows `RATE_LIMIT` calls per fixed window of `RATE_WINDOW_SECS`.
const RATE_LIMIT: u64 = 3;
const RATE_WINDOW_SECS: i64 = 30;
/// The limited tool, and its limit inside the budget.
const WRITE: &str = "w";
const WRITE_LIMIT: u64 = 2;
/// The shared budget's root limit, in units, and what a call of the limited tool costs.
const SHARED_LIMIT: u64 = 10;
const WRITE_COST: u64 = 2;

#[derive(Debug, Clone)]
enum Op {
    /// A batch of `calls` calls, the first `writes` of them of the limited tool.
    Use {
        store: usize,
        session: usize,
        calls: usize,
        writes: usize,
    },
    Close {
        store: usize,
        session: usize,
    },
    Expire {
        store: usize,
    },
    FailNextWrites {
        store: usize,
        n: u64,
    },
    CommitThenFail {
        store: usize,
        n: u64,
    },
    FailAllWrites {
        store: usize,
    },
    Heal {
        store: usize,
    },
    Advance {
        secs: i64,
    },
    /// A call of `t` reserving `estimate` units.
    Reserve {
        store: usize,
        session: usize,
        estimate: u64,
    },
    /// Settles the reservation `pick` (modulo those made) at `actual` units.
    Settle {
        store: usize,
        pick: usize,
        actual: u64,
    },
    /// A call's write hangs; the change feed resets; a second mutation of the session
    /// follows (a close or a call); then the writes fail or go through.
    ResetMidWrite {
        store: usize,
        session: usize,
        close: bool,
        fail: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let store = 0..2usize;
    let session = 0..SESSIONS;
    prop_oneof![
        6 => (store.clone(), session.clone(), 1..=3usize, 0..=2usize)
            .prop_map(|(store, session, calls, writes)| Op::Use {
                store,
                session,
                calls,
                writes: std::cmp::min(writes, calls),
            }),
        1 => (store.clone(), session.clone())
            .prop_map(|(store, session)| Op::Close { store, session }),
        1 => store.clone().prop_map(|store| Op::Expire { store }),
        1 => (store.clone(), 1..=3u64).prop_map(|(store, n)| Op::FailNextWrites { store, n }),
        1 => (store.clone(), 1..=2u64).prop_map(|(store, n)| Op::CommitThenFail { store, n }),
        1 => store.clone().prop_map(|store| Op::FailAllWrites { store }),
        2 => store.clone().prop_map(|store| Op::Heal { store }),
        1 => (0..40i64).prop_map(|secs| Op::Advance { secs }),
        2 => (store.clone(), session.clone(), 1..=3u64)
            .prop_map(|(store, session, estimate)| Op::Reserve { store, session, estimate }),
        2 => (store.clone(), 0..8usize, 0..=5u64)
            .prop_map(|(store, pick, actual)| Op::Settle { store, pick, actual }),
        1 => (store, session, any::<bool>(), any::<bool>()).prop_map(
            |(store, session, close, fail)| Op::ResetMidWrite { store, session, close, fail }
        ),
    ]
}

/// What the answers promised about one session.
#[derive(Debug, Default, Clone)]
struct Promised {
    ok: u64,
    uncertain: u64,
    /// The same two counts for the limited tool's calls alone.
    ok_writes: u64,
    uncertain_writes: u64,
    /// The same two counts in units of the shared budget.
    ok_units: u64,
    uncertain_units: u64,
    closed_acked: bool,
    saw_terminal: bool,
    /// A close was answered `StorageWriteThrough`: it stays pending until storage has it.
    close_pending: bool,
}

impl Promised {
    fn used(
        &mut self,
        calls: u64,
        writes: u64,
        result: &Result<TaskSession, SessionError>,
    ) -> Result<(), TestCaseError> {
        let units = calls + writes * (WRITE_COST - 1);
        match result {
            Ok(_) => {
                self.ok += calls;
                self.ok_writes += writes;
                self.ok_units += units;
            }
            Err(SessionError::StorageWriteThrough { .. }) => {
                self.uncertain += calls;
                self.uncertain_writes += writes;
                self.uncertain_units += units;
            }
            // Closed is a status; `Expired` may only mean the time limit passed.
            Err(SessionError::AlreadyClosed(_)) => self.saw_terminal = true,
            Err(
                SessionError::Expired(_)
                | SessionError::BudgetExceeded { .. }
                | SessionError::SharedBudgetExceeded { .. }
                | SessionError::RateLimited { .. }
                | SessionError::StorageRead { .. },
            ) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    }

    fn closed(&mut self, result: &Result<TaskSession, SessionError>) -> Result<(), TestCaseError> {
        match result {
            Ok(_) => {
                self.closed_acked = true;
                self.saw_terminal = true;
            }
            Err(SessionError::AlreadyClosed(_) | SessionError::Expired(_)) => {
                self.saw_terminal = true;
            }
            Err(SessionError::StorageWriteThrough { .. }) => self.close_pending = true,
            Err(SessionError::StorageRead { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    }
}

/// What the answers promised about one reservation that was made (answered `Ok`).
#[derive(Debug, Clone)]
struct Reserved {
    id: Uuid,
    estimate: u64,
    /// What it may end up charged: its estimate until a settlement is answered `Ok`, or
    /// any of the settlements answered `StorageWriteThrough`.
    possible: Vec<u64>,
    /// A settlement was answered `Ok`.
    settled: bool,
}

impl Reserved {
    fn settle(
        &mut self,
        actual: u64,
        result: &Result<Settlement, SessionError>,
    ) -> Result<(), TestCaseError> {
        match result {
            Ok(settlement) => {
                prop_assert!(!self.settled, "settled twice: {self:?}");
                prop_assert_eq!(
                    (settlement.charged, settlement.released, settlement.overrun),
                    (
                        actual,
                        self.estimate.saturating_sub(actual),
                        actual.saturating_sub(self.estimate)
                    )
                );
                self.settled = true;
                self.possible = vec![actual];
            }
            Err(SessionError::StorageWriteThrough { .. }) => {
                prop_assert!(!self.settled, "settled twice: {self:?}");
                self.possible.push(actual);
            }
            // Settled before (maybe by an uncertain settlement), or lapsed at its estimate.
            Err(SessionError::ReservationSettled(_) | SessionError::StorageRead { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        Ok(())
    }
}

type Store = SessionStore<FaultyStorage<PgStorage>>;

async fn run_case(pool: &PgPool, ops: &[Op]) -> Result<(), TestCaseError> {
    let clock = ManualClock::starting_now();
    let faults = [
        FaultyStorage::new(PgStorage::new(pool.clone())),
        FaultyStorage::new(PgStorage::new(pool.clone())),
    ];
    let stores: Vec<Store> = faults
        .iter()
        .map(|f| {
            SessionStore::builder(f.clone())
                .clock(Arc::new(clock.clone()))
                .reconcile_interval(StdDuration::from_secs(3600))
                // Longer than any hang below: no call gives up while queued.
                .storage_timeout(StdDuration::from_secs(60))
                .build()
        })
        .collect();
    // A budget tree of this case's own: the database is shared by the cases.
    let admin = SessionStore::postgres(pool.clone());
    let root = BudgetId::new(format!("model-{}", Uuid::new_v4().simple())).expect("an id");
    let leaf = BudgetId::new(format!("{root}/sessions")).expect("an id");
    admin
        .put_budget(&root, &BudgetTerms::new(SHARED_LIMIT))
        .await
        .expect("the root budget");
    let mut terms = BudgetTerms::new(1_000);
    terms.parent_id = Some(root.clone());
    admin
        .put_budget(&leaf, &terms)
        .await
        .expect("the leaf budget");
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        let mut req = request(Uuid::new_v4(), &["t", WRITE], BUDGET)
            .with_tool_limit(WRITE, WRITE_LIMIT)
            .with_budget(leaf.clone())
            .with_tool_cost(WRITE, WRITE_COST);
        req.time_limit = Duration::seconds(60);
        req.rate_limit_per_minute = Some(RATE_LIMIT);
        req.rate_limit_window_secs = RATE_WINDOW_SECS.unsigned_abs();
        ids.push(stores[0].create(req).await.expect("create").session_id);
    }
    for store in &stores {
        store.get(ids[0]).await.expect("get");
        common::wait_listening(store).await;
    }
    let mut promised = vec![Promised::default(); SESSIONS];
    let mut reserved: Vec<Reserved> = Vec::new();

    for op in ops {
        match *op {
            Op::Use {
                store,
                session,
                calls,
                writes,
            } => {
                let mut tools = vec![WRITE; writes];
                tools.resize(calls, "t");
                let result = stores[store]
                    .use_session_batch(ids[session], &tools, None)
                    .await;
                promised[session].used(calls as u64, writes as u64, &result)?;
            }
            Op::Reserve {
                store,
                session,
                estimate,
            } => {
                let result = stores[store]
                    .reserve(ids[session], "t", None, estimate)
                    .await;
                let p = &mut promised[session];
                match result {
                    Ok(reservation) => {
                        p.ok += 1;
                        reserved.push(Reserved {
                            id: reservation.reservation_id,
                            estimate,
                            possible: vec![estimate],
                            settled: false,
                        });
                    }
                    Err(SessionError::StorageWriteThrough { .. }) => {
                        p.uncertain += 1;
                        p.uncertain_units += estimate;
                    }
                    Err(SessionError::AlreadyClosed(_)) => p.saw_terminal = true,
                    Err(
                        SessionError::Expired(_)
                        | SessionError::BudgetExceeded { .. }
                        | SessionError::SharedBudgetExceeded { .. }
                        | SessionError::RateLimited { .. }
                        | SessionError::StorageRead { .. }
                        | SessionError::InvalidRequest { .. },
                    ) => {}
                    Err(other) => prop_assert!(false, "unexpected {other:?}"),
                }
            }
            Op::Settle {
                store,
                pick,
                actual,
            } => {
                if reserved.is_empty() {
                    continue;
                }
                let index = pick % reserved.len();
                let result = stores[store].settle(reserved[index].id, actual).await;
                reserved[index].settle(actual, &result)?;
            }
            Op::Close { store, session } => {
                let result = stores[store].close(ids[session]).await;
                promised[session].closed(&result)?;
                if result.is_ok() {
                    let seen = stores[store].get(ids[session]).await;
                    prop_assert!(
                        !matches!(seen, Ok(ref s) if s.status == SessionStatus::Active),
                        "active right after an acknowledged close: {seen:?}"
                    );
                }
            }
            Op::ResetMidWrite {
                store,
                session,
                close,
                fail,
            } => {
                let (faulty, store, id) = (&faults[store], &stores[store], ids[session]);
                faulty.hang_writes();
                let first = tokio::spawn({
                    let store = store.clone();
                    async move { store.use_session(id, "t", None).await }
                });
                // A call denied by policy writes nothing: then there is no write to hang.
                common::until("a write hangs or the first call ends", || {
                    faulty.hung_writes() > 0 || first.is_finished()
                })
                .await;
                let resets = store.stats().listener_reconnects;
                faulty.reset_change_feed();
                common::until("the listener reconnected", || {
                    store.stats().listener_reconnects > resets
                })
                .await;
                let second = tokio::spawn({
                    let store = store.clone();
                    async move {
                        if close {
                            store.close(id).await
                        } else {
                            store.use_session(id, "t", None).await
                        }
                    }
                });
                // Let the second reach its write, or the session's queue.
                tokio::time::sleep(StdDuration::from_millis(5)).await;
                if fail {
                    faulty.fail_writes();
                }
                faulty.release_writes();
                let p = &mut promised[session];
                p.used(1, 0, &first.await.expect("first task"))?;
                let second = second.await.expect("second task");
                if close {
                    p.closed(&second)?;
                } else {
                    p.used(1, 0, &second)?;
                }
            }
            Op::Expire { store } => match stores[store].expire_due().await {
                Ok(_) | Err(SessionError::StorageWriteThrough { .. }) => {}
                Err(other) => prop_assert!(false, "unexpected {other:?}"),
            },
            Op::FailNextWrites { store, n } => faults[store].fail_next_writes(n),
            Op::CommitThenFail { store, n } => faults[store].commit_then_fail_next_writes(n),
            Op::FailAllWrites { store } => faults[store].fail_writes(),
            Op::Heal { store } => faults[store].heal(),
            Op::Advance { secs } => clock.advance(Duration::seconds(secs)),
        }
    }

    for (store, fault) in stores.iter().zip(&faults) {
        fault.heal();
        let report = store.shutdown(StdDuration::from_secs(10)).await;
        prop_assert!(report.is_clean(), "not flushed: {report:?}");
        prop_assert_eq!(store.stats().pending, 0);
    }
    let usage = admin
        .budget(&root)
        .await
        .expect("read the root")
        .expect("the root exists");
    // Open reservations are charged too, at their estimates.
    let charged = usage.used + usage.reserved;
    let low: u64 = promised.iter().map(|p| p.ok_units).sum::<u64>()
        + reserved
            .iter()
            .filter_map(|r| r.possible.iter().min())
            .sum::<u64>();
    let high: u64 = promised
        .iter()
        .map(|p| p.ok_units + p.uncertain_units)
        .sum::<u64>()
        + reserved
            .iter()
            .filter_map(|r| r.possible.iter().max())
            .sum::<u64>();
    prop_assert!(
        charged - usage.overrun <= SHARED_LIMIT,
        "the root charged {charged}, {} of it overruns",
        usage.overrun
    );
    prop_assert!(
        low <= charged && charged <= high,
        "the root charged {charged}; the answers promised {low}..={high}: {reserved:?}"
    );
    let charges = arbiter_session::operator::budgets::verify_charges(pool)
        .await
        .expect("verify the charges");
    prop_assert!(charges.is_exact(), "{charges:?}");
    for (session, p) in promised.iter().enumerate() {
        let id = ids[session];
        let stored = row(pool, id).await;
        let calls = u64::try_from(stored.calls_made).expect("non-negative");
        prop_assert!(calls <= BUDGET, "{id}: {calls} calls over budget");
        prop_assert!(
            p.ok <= calls,
            "{id}: an Ok call is missing: {p:?}, row {stored:?}"
        );
        prop_assert!(
            calls <= p.ok + p.uncertain,
            "{id}: counted a call never made: {p:?}, row {stored:?}"
        );
        if p.closed_acked {
            prop_assert_eq!(stored.status.as_str(), "closed");
        }
        if p.saw_terminal {
            prop_assert!(
                stored.status != "active",
                "{id}: terminal status lost: {stored:?}"
            );
        }
        if p.close_pending {
            prop_assert!(
                stored.status != "active",
                "{id}: a close answered StorageWriteThrough was lost: {stored:?}"
            );
        }
        prop_assert_eq!(audited_calls(pool, id).await, stored.calls_made);
        let (writes, audited_writes) = write_calls(pool, id).await;
        prop_assert!(
            writes <= WRITE_LIMIT,
            "{id}: {writes} calls of the limited tool"
        );
        prop_assert!(
            p.ok_writes <= writes && writes <= p.ok_writes + p.uncertain_writes,
            "{id}: limited tool counted {writes}, promised {p:?}"
        );
        prop_assert_eq!(audited_writes, writes);
        for (window, calls) in rate_windows(pool, id).await {
            prop_assert!(
                calls <= RATE_LIMIT,
                "{id}: {calls} calls in the window from {window}"
            );
        }
        for store in &stores {
            let cached = store.get(id).await.expect("get");
            prop_assert!(
                cached.calls_made <= calls,
                "{id}: a cache is ahead after convergence"
            );
            if cached.status != SessionStatus::Active {
                prop_assert!(
                    stored.status != "active",
                    "{id}: cache terminal, row active"
                );
            }
        }
    }
    Ok(())
}

/// The limited tool's calls in the row of `id`, and in its audit trail.
async fn write_calls(pool: &PgPool, id: Uuid) -> (u64, u64) {
    let row = sqlx::query!(
        r#"
        SELECT s.tool_calls[1] AS "stored!",
               (SELECT count(*) FROM arbiter.session_events e, unnest(e.tools) AS t(tool)
                 WHERE e.session_id = s.session_id AND t.tool = $2
                   AND e.kind IN ('call_allowed', 'batch_allowed')) AS "audited!"
          FROM arbiter.sessions s
         WHERE s.session_id = $1 AND s.limited_tools = ARRAY[$2]
        "#,
        id,
        WRITE
    )
    .fetch_one(pool)
    .await
    .expect("the session limits its tool");
    let count = |n: i64| u64::try_from(n).expect("non-negative");
    (count(row.stored), count(row.audited))
}

/// The rate windows of `id` replayed from its audit trail with the policy's rule (a fixed
/// window starts at the first call at or after the previous one's end), and the calls
/// counted in each.
async fn rate_windows(pool: &PgPool, id: Uuid) -> Vec<(DateTime<Utc>, u64)> {
    let calls = sqlx::query!(
        r#"
        SELECT occurred_at, cardinality(tools) AS "calls!"
          FROM arbiter.session_events
         WHERE session_id = $1 AND kind IN ('call_allowed', 'batch_allowed')
         ORDER BY event_id
        "#,
        id
    )
    .fetch_all(pool)
    .await
    .expect("events readable");
    let mut windows: Vec<(DateTime<Utc>, u64)> = Vec::new();
    for call in calls {
        let n = u64::try_from(call.calls).expect("non-negative");
        match windows.last_mut() {
            Some((start, counted))
                if call.occurred_at < *start + Duration::seconds(RATE_WINDOW_SECS) =>
            {
                *counted += n;
            }
            _ => windows.push((call.occurred_at, n)),
        }
    }
    windows
}

/// A database for this test alone, dropped afterwards (even when a case fails).
struct ScratchDatabase {
    admin: PgPool,
    name: String,
    pool: PgPool,
}

impl ScratchDatabase {
    async fn create() -> Self {
        let url = std::env::var("DATABASE_URL").expect(
            "DATABASE_URL must point at PostgreSQL (scripts/test sets it); this test never skips",
        );
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect");
        let name = format!("arbiter_model_{}", Uuid::new_v4().simple());
        // DDL takes no bind parameters; the name is ours, not input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create scratch database");
        let options = admin.connect_options().as_ref().clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .expect("connect scratch database");
        arbiter_session::migrate(&pool).await.expect("migrate");
        ScratchDatabase { admin, name, pool }
    }

    async fn drop_database(self) {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await
        .expect("drop scratch database");
    }
}

#[test]
fn model_based_two_stores_with_faults_keep_invariants() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let db = runtime.block_on(ScratchDatabase::create());
    let cases = std::env::var("ARBITER_PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(12);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        runtime.block_on(run_case(&db.pool, &ops))
    });
    runtime.block_on(db.drop_database());
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
