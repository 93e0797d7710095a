//! A soak with real processes: several OS processes, each a gateway with its own store
//! (cache, pool, listener), hammer a shared set of sessions on one PostgreSQL while this
//! parent closes sessions at random and kills every database connection server-side.
//! At the end it checks, and exits non-zero with every violation otherwise:
//!
//! * per session: `ok <= calls_made <= min(budget, ok + write_through)`, where `ok` is the
//!   summed `Ok` calls of every process and `write_through` the calls answered
//!   `StorageWriteThrough` (counted, then reconciled, unless the merge had to drop them),
//!   so with no write-through failure `calls_made` equals the `Ok` count exactly;
//! * the audit trail's allowed calls (`call_allowed` rows plus batch tools) equal
//!   `calls_made`;
//! * no call event follows a session's `closed` event, and no `Ok` call started after
//!   this parent's close of that session was acknowledged;
//! * every process's pending set drained at its shutdown;
//! * per session, the limited tool (`write_file`, [`WRITE_FILE_LIMIT`] calls of its own):
//!   `ok <= counted <= min(limit, ok + write_through)` for its calls alone, and the audit
//!   trail counts exactly what the row does, so the processes together are granted at
//!   most the limit, and exactly it unless a write of one of those calls failed;
//! * the shared budgets: the sessions draw on a three-level tree ([`BUDGETS`]) whose root
//!   runs out during the run, at a cost per tool ([`cost_of`]); no level's use passes its
//!   limit, the units of the `Ok` calls are at most what the root used and that at most
//!   those plus the units of the calls answered `StorageWriteThrough`, and every share's
//!   use is the sum of the costs its events record.
//!
//! `scripts/test` runs it for 20 s: `cargo run --example soak -- --duration 20`.
//! Options: `--duration SECS`, `--processes N`, `--tasks N` (per process), `--sessions N`.

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arbiter_session::budget::{BudgetId, BudgetTerms};
use arbiter_session::{CreateSessionRequest, PgStorage, SessionError, SessionStore, migrate};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use uuid::Uuid;

/// The tool every session limits, and its limit.
const WRITE_FILE: &str = "write_file";
const WRITE_FILE_LIMIT: u64 = 3;

/// The shared budgets, root first, and their limits: the sessions draw, half each, on the
/// two leaves. The root runs out about half way through a 20 s run.
const BUDGETS: [(&str, Option<&str>, u64); 5] = [
    ("soak", None, 9_000),
    ("soak/a", Some("soak"), 6_000),
    ("soak/a/agents", Some("soak/a"), 1_000_000),
    ("soak/b", Some("soak"), 6_000),
    ("soak/b/agents", Some("soak/b"), 1_000_000),
];

/// What a call of `tools` costs in the shared budget: `write` 2, `write_file` 3, any other
/// tool 1 (the sessions' `tool_costs`).
fn cost_of(tools: &[&str]) -> u64 {
    tools
        .iter()
        .map(|tool| match *tool {
            "write" => 2,
            WRITE_FILE => 3,
            _ => 1,
        })
        .sum()
}

#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    processes: usize,
    tasks: usize,
    sessions: usize,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Options {
            duration: Duration::from_secs(20),
            processes: 4,
            tasks: 32,
            sessions: 20,
        };
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let mut value = || -> Result<u64, String> {
                args.next()
                    .ok_or(format!("{flag} needs a value"))?
                    .parse()
                    .map_err(|e| format!("{flag}: {e}"))
            };
            match flag.as_str() {
                "--duration" => options.duration = Duration::from_secs(value()?),
                "--processes" => options.processes = value()? as usize,
                "--tasks" => options.tasks = value()? as usize,
                "--sessions" => options.sessions = value()? as usize,
                other => return Err(format!("unknown option {other}")),
            }
        }
        if options.processes == 0 || options.tasks == 0 || options.sessions == 0 {
            return Err("--processes, --tasks and --sessions must be at least 1".to_owned());
        }
        Ok(options)
    }
}

/// What one worker process reports on its last stdout line.
#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReport {
    /// Per session: calls answered `Ok`, calls answered `StorageWriteThrough`, and the
    /// latest start (ms since the epoch) of a call answered `Ok`.
    sessions: BTreeMap<Uuid, SessionTally>,
    denials: BTreeMap<String, u64>,
    operations: u64,
    unflushed: usize,
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct SessionTally {
    ok: u64,
    write_through: u64,
    last_ok_started_ms: u64,
    /// The same two counts for calls of the limited tool alone.
    write_file_ok: u64,
    write_file_write_through: u64,
    /// The same two in units of the shared budget.
    ok_units: u64,
    write_through_units: u64,
}

impl WorkerReport {
    /// Adds `other`'s counts to this report.
    fn absorb(&mut self, other: WorkerReport) {
        self.operations += other.operations;
        self.unflushed += other.unflushed;
        for (id, t) in other.sessions {
            let sum = self.sessions.entry(id).or_default();
            sum.ok += t.ok;
            sum.write_through += t.write_through;
            sum.write_file_ok += t.write_file_ok;
            sum.write_file_write_through += t.write_file_write_through;
            sum.ok_units += t.ok_units;
            sum.write_through_units += t.write_through_units;
            sum.last_ok_started_ms = std::cmp::max(sum.last_ok_started_ms, t.last_ok_started_ms);
        }
        for (reason, n) in other.denials {
            *self.denials.entry(reason).or_default() += n;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A small deterministic generator per task (no dependency needed for a soak's dice).
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

fn denial_reason(err: &SessionError) -> &'static str {
    match err {
        SessionError::BudgetExceeded { .. } => "budget",
        SessionError::SharedBudgetExceeded { .. } => "shared_budget",
        SessionError::RateLimited { .. } => "rate",
        SessionError::ToolNotAuthorized { .. } => "tool",
        SessionError::AlreadyClosed(_) => "closed",
        SessionError::Expired(_) => "expired",
        SessionError::StorageWriteThrough { .. } => "write_through",
        SessionError::StorageRead { .. } => "storage_read",
        SessionError::NotFound(_) => "not_found",
        _ => "other",
    }
}

async fn worker(
    url: &str,
    options: &Options,
    ids: Vec<Uuid>,
) -> Result<WorkerReport, Box<dyn Error>> {
    // 8 connections per process keeps 4 processes well under PostgreSQL's default 100.
    let pool = PgStorage::pool_options()
        .max_connections(8)
        .connect(url)
        .await?;
    let store = SessionStore::builder(PgStorage::new(pool))
        .reconcile_interval(Duration::from_millis(50))
        .build();
    let deadline = Instant::now() + options.duration;
    let mut tasks = Vec::new();
    for task in 0..options.tasks {
        let (store, ids) = (store.clone(), ids.clone());
        let seed = (std::process::id() as u64) << 20 | task as u64 | 1;
        tasks.push(tokio::spawn(async move {
            let mut dice = Dice(seed);
            let mut report = WorkerReport::default();
            while Instant::now() < deadline {
                let id = ids[dice.roll(ids.len())];
                let started = now_ms();
                let tools: &[&str] = match dice.roll(20) {
                    0 => &["delete_everything"],
                    1 | 2 => &["read", "write"],
                    3 => &[WRITE_FILE],
                    4 => &["read", WRITE_FILE],
                    _ => &["read"],
                };
                let outcome = if tools.len() == 1 {
                    store.use_session(id, tools[0], None).await
                } else {
                    store.use_session_batch(id, tools, None).await
                };
                let calls = tools.len() as u64;
                let write_files = tools.iter().filter(|tool| **tool == WRITE_FILE).count() as u64;
                let units = cost_of(tools);
                report.operations += 1;
                let tally = report.sessions.entry(id).or_default();
                match outcome {
                    Ok(_) => {
                        tally.ok += calls;
                        tally.write_file_ok += write_files;
                        tally.ok_units += units;
                        tally.last_ok_started_ms = std::cmp::max(tally.last_ok_started_ms, started);
                    }
                    Err(err) => {
                        if matches!(err, SessionError::StorageWriteThrough { .. }) {
                            tally.write_through += calls;
                            tally.write_file_write_through += write_files;
                            tally.write_through_units += units;
                        }
                        *report
                            .denials
                            .entry(denial_reason(&err).to_owned())
                            .or_default() += 1;
                        // Denials come from the cache in microseconds; give the others room.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            report
        }));
    }
    let mut total = WorkerReport::default();
    for task in tasks {
        total.absorb(task.await?);
    }
    total.unflushed = store
        .shutdown(Duration::from_secs(30))
        .await
        .unflushed
        .len();
    Ok(total)
}

/// The parent's faults: random closes (acknowledged at a known instant) and server-side
/// kills of every connection to the database.
async fn inject_faults(
    store: &SessionStore,
    pool: &sqlx::PgPool,
    ids: &[Uuid],
    until: Instant,
) -> Result<(HashMap<Uuid, u64>, u64), Box<dyn Error>> {
    let mut dice = Dice(now_ms() | 1);
    let mut closed_at = HashMap::new();
    let mut kills = 0;
    // Let the workers warm up before the first fault.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() < until {
        if dice.roll(3) == 0 {
            let id = ids[dice.roll(ids.len())];
            if !closed_at.contains_key(&id) && store.close(id).await.is_ok() {
                closed_at.insert(id, now_ms());
            }
        } else {
            sqlx::query!(
                r#"SELECT count(pg_terminate_backend(pid)) AS "killed!"
                     FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()"#
            )
            .fetch_one(pool)
            .await?;
            kills += 1;
        }
        tokio::time::sleep(Duration::from_millis(400 + dice.roll(800) as u64)).await;
    }
    Ok((closed_at, kills))
}

struct Stored {
    calls_made: i64,
    call_budget: i64,
    audited: i64,
    calls_after_close: i64,
    write_files: i64,
    audited_write_files: i64,
}

async fn stored(pool: &sqlx::PgPool, id: Uuid) -> Result<Stored, sqlx::Error> {
    sqlx::query_as!(
        Stored,
        r#"
        SELECT s.calls_made, s.call_budget,
               (SELECT coalesce(sum(cardinality(e.tools)), 0)
                  FROM arbiter.session_events e
                 WHERE e.session_id = s.session_id
                   AND e.kind IN ('call_allowed', 'batch_allowed')) AS "audited!",
               (SELECT count(*)
                  FROM arbiter.session_events e
                 WHERE e.session_id = s.session_id
                   AND e.kind IN ('call_allowed', 'batch_allowed')
                   AND e.event_id > (SELECT min(c.event_id) FROM arbiter.session_events c
                                      WHERE c.session_id = s.session_id AND c.kind = 'closed')
               ) AS "calls_after_close!",
               s.tool_calls[array_position(s.limited_tools, $2)] AS "write_files!",
               (SELECT count(*)
                  FROM arbiter.session_events e, unnest(e.tools) AS t(tool)
                 WHERE e.session_id = s.session_id AND t.tool = $2
                   AND e.kind IN ('call_allowed', 'batch_allowed')) AS "audited_write_files!"
          FROM arbiter.sessions s
         WHERE s.session_id = $1
        "#,
        id,
        WRITE_FILE
    )
    .fetch_one(pool)
    .await
}

async fn parent(url: &str, options: &Options, args: &[String]) -> Result<bool, Box<dyn Error>> {
    let storage = PgStorage::connect(url).await?;
    migrate(storage.pool()).await?;
    let pool = storage.pool().clone();
    let store = SessionStore::new(storage);
    let started = Instant::now();

    for (id, parent, limit) in BUDGETS {
        let mut terms = BudgetTerms::new(limit);
        terms.parent_id = parent.map(BudgetId::new).transpose()?;
        store.put_budget(&BudgetId::new(id)?, &terms).await?;
    }
    let mut dice = Dice(now_ms() | 1);
    let mut ids = Vec::new();
    for n in 0..options.sessions {
        let budget = 200 + dice.roll(2000) as u64;
        let mut req = CreateSessionRequest::new(
            Uuid::new_v4(),
            ["read", "write", WRITE_FILE],
            budget,
            chrono::Duration::hours(1),
        )
        .with_tool_limit(WRITE_FILE, WRITE_FILE_LIMIT)
        .with_budget(BudgetId::new(if n % 2 == 0 {
            "soak/a/agents"
        } else {
            "soak/b/agents"
        })?)
        .with_tool_cost("write", cost_of(&["write"]))
        .with_tool_cost(WRITE_FILE, cost_of(&[WRITE_FILE]));
        // A third of the sessions are rate limited, so windows are exercised too.
        if n % 3 == 0 {
            req.rate_limit_per_minute = Some(50);
            req.rate_limit_window_secs = 1;
        }
        ids.push(store.create(req).await?.session_id);
    }
    let id_list = ids
        .iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",");

    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..options.processes {
        let mut child = tokio::process::Command::new(&exe)
            .arg("--worker")
            .arg(&id_list)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdout = child.stdout.take().ok_or("child has no stdout")?;
        children.push(tokio::spawn(async move {
            let mut out = String::new();
            stdout.read_to_string(&mut out).await?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out))
        }));
    }

    let (closed_at, kills) = inject_faults(&store, &pool, &ids, started + options.duration).await?;
    // The parent's own closes may have failed their write under the kills: flush them first.
    let parent_unflushed = store
        .shutdown(Duration::from_secs(30))
        .await
        .unflushed
        .len();

    let mut total = WorkerReport::default();
    let mut failures = Vec::new();
    for child in children {
        let (status, out) = child.await??;
        if !status.success() {
            failures.push(format!("a worker exited with {status}"));
            continue;
        }
        let report: WorkerReport = serde_json::from_str(out.lines().last().unwrap_or_default())?;
        total.absorb(report);
    }

    total.unflushed += parent_unflushed;
    if total.unflushed > 0 {
        failures.push(format!(
            "{} sessions were still pending at the workers' shutdown",
            total.unflushed
        ));
    }
    let (mut ok_calls, mut counted, mut write_files) = (0, 0, 0);
    let (mut ok_units, mut write_through_units) = (0, 0);
    for id in &ids {
        let t = total.sessions.get(id).copied().unwrap_or_default();
        ok_units += t.ok_units;
        write_through_units += t.write_through_units;
        let row = stored(&pool, *id).await?;
        let (calls, budget) = (row.calls_made as u64, row.call_budget as u64);
        ok_calls += t.ok;
        counted += t.write_through;
        if t.ok > calls || calls > std::cmp::min(budget, t.ok + t.write_through) {
            failures.push(format!(
                "session {id}: calls_made {calls}, budget {budget}, ok {}, write-through {}",
                t.ok, t.write_through
            ));
        }
        let granted = row.write_files as u64;
        write_files += granted;
        if t.write_file_ok > granted
            || granted
                > std::cmp::min(
                    WRITE_FILE_LIMIT,
                    t.write_file_ok + t.write_file_write_through,
                )
        {
            failures.push(format!(
                "session {id}: {WRITE_FILE} counted {granted} (limit {WRITE_FILE_LIMIT}), ok {}, write-through {}",
                t.write_file_ok, t.write_file_write_through
            ));
        }
        if row.audited_write_files != row.write_files {
            failures.push(format!(
                "session {id}: {} audited {WRITE_FILE} calls, {} counted",
                row.audited_write_files, row.write_files
            ));
        }
        if row.audited != row.calls_made {
            failures.push(format!(
                "session {id}: {} audited calls, calls_made {}",
                row.audited, row.calls_made
            ));
        }
        if row.calls_after_close > 0 {
            failures.push(format!(
                "session {id}: {} call events after its close",
                row.calls_after_close
            ));
        }
        if let Some(&acked) = closed_at.get(id)
            && t.last_ok_started_ms > acked
        {
            failures.push(format!(
                "session {id}: an Ok call started after its close was acknowledged"
            ));
        }
    }

    // The shared budgets: never past a limit, every Ok charged, the trail explains it all.
    let mut used_root = 0;
    for (id, _, limit) in BUDGETS {
        let usage = store
            .budget(&BudgetId::new(id)?)
            .await?
            .ok_or(format!("budget {id} is gone"))?;
        if usage.used > limit {
            failures.push(format!("budget {id}: used {} of its {limit}", usage.used));
        }
        if id == "soak" {
            used_root = usage.used;
        }
    }
    if ok_units > used_root || used_root > ok_units + write_through_units {
        failures.push(format!(
            "the root budget used {used_root} units; Ok calls cost {ok_units}, write-through ones {write_through_units}"
        ));
    }
    let charges = arbiter_session::operator::budgets::verify_charges(&pool).await?;
    for mismatch in &charges.mismatched {
        failures.push(format!("shared budget: {mismatch}"));
    }

    // Four processes writing the same sessions while connections die: every chain intact.
    let chains = arbiter_session::operator::chain::verify_all_audit_chains(&pool).await?;
    for link in &chains.broken {
        failures.push(format!("audit chain broken: {link}"));
    }

    let denials = total
        .denials
        .iter()
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "soak: {} processes x {} tasks, {} sessions, {:.1} s: {} operations, {} calls ok, {} write-through, \
         {} {WRITE_FILE} calls counted (at most {WRITE_FILE_LIMIT} a session); \
         shared budget: {used_root} of {} units used, {ok_units} by Ok calls, {} shares; \
         denials {}; faults: {} closes, {} connection kills; {} chained events verified; {}",
        options.processes,
        options.tasks,
        options.sessions,
        started.elapsed().as_secs_f64(),
        total.operations,
        ok_calls,
        counted,
        write_files,
        BUDGETS[0].2,
        charges.shares,
        if denials.is_empty() {
            "none".to_owned()
        } else {
            denials
        },
        closed_at.len(),
        kills,
        chains.events,
        if failures.is_empty() {
            "all checks passed".to_owned()
        } else {
            format!("{} CHECKS FAILED", failures.len())
        }
    );
    for failure in &failures {
        eprintln!("soak: FAILED: {failure}");
    }
    Ok(failures.is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, or run through scripts/with-postgres")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        let ids = args
            .get(1)
            .ok_or("--worker needs the session ids")?
            .split(',')
            .map(Uuid::parse_str)
            .collect::<Result<Vec<_>, _>>()?;
        let options = Options::parse(&args[2..])?;
        let report = worker(&url, &options, ids).await?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let options = Options::parse(&args)?;
    if parent(&url, &options, &args).await? {
        Ok(())
    } else {
        Err("the soak found violations".into())
    }
}
