//! The benchmark behind `scripts/bench` (run it through the script: release build, a
//! freshly migrated scratch database). Prints a table for people and, as its last line, one
//! JSON object with every figure and the ratios the README reports.
//!
//! `limit` is the single statement one un-batched `use_session` sends (the row update and
//! its audit row, one commit), issued straight through `Storage::update` on a pool of the
//! same size; every other figure goes through a `SessionStore`.
//!
//! The harness (`sample`, `measure`, `compare`, `Bench`) comes first; then one function
//! per figure or group of figures, called in order by `main`. The shared budgets' figures
//! are in `budgets.rs`, the history's in `history.rs`.

mod budgets;
mod console;
mod history;
mod mcp;

use std::collections::BTreeMap;
use std::error::Error;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter_session::audit::{AuditEvent, EventKind};
use arbiter_session::clock::SystemClock;
use arbiter_session::{CreateSessionRequest, PgStorage, SessionStore, Storage, migrate};
use chrono::Utc;
use serde::Serialize;
use uuid::Uuid;

struct Options {
    quick: bool,
    /// Historical events for the scale figures (0: none).
    history: u64,
    /// Seconds per throughput measurement.
    secs: f64,
    /// Sessions stored for the startup figure.
    stored_sessions: i64,
    /// Distinct `get`s for the memory figure, and the cache capacity then.
    distinct_gets: usize,
    rss_cache_capacity: u64,
}

impl Options {
    fn parse() -> Result<Self, String> {
        let mut quick = false;
        let mut history = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--history" => {
                    let n = args.next().ok_or("--history needs a number of events")?;
                    history = Some(
                        n.parse()
                            .map_err(|_| format!("--history {n:?}: not a number"))?,
                    );
                }
                other => {
                    return Err(format!(
                        "unknown argument {other:?} (expected --quick, --history N)"
                    ));
                }
            }
        }
        Ok(if quick {
            Options {
                quick,
                history: history.unwrap_or(500_000),
                secs: 1.0,
                stored_sessions: 100_000,
                distinct_gets: 100_000,
                rss_cache_capacity: 10_000,
            }
        } else {
            Options {
                quick,
                history: history.unwrap_or(10_000_000),
                secs: 5.0,
                stored_sessions: 1_000_000,
                distinct_gets: 1_000_000,
                rss_cache_capacity: 100_000,
            }
        })
    }
}

/// One figure: throughput and latency percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
struct Figure {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Every call's latency in one or more measurements, and the time they took.
#[derive(Default)]
struct Sample {
    latencies_ns: Vec<u32>,
    elapsed_s: f64,
}

impl Sample {
    fn add(&mut self, other: Sample) {
        self.latencies_ns.extend(other.latencies_ns);
        self.elapsed_s += other.elapsed_s;
    }

    fn ops_per_s(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.elapsed_s
    }

    fn figure(mut self) -> Figure {
        self.latencies_ns.sort_unstable();
        let latencies = &self.latencies_ns;
        let pick = |q: f64| {
            if latencies.is_empty() {
                return 0.0;
            }
            let index = ((latencies.len() - 1) as f64 * q).round() as usize;
            f64::from(latencies[index]) / 1000.0
        };
        Figure {
            ops_per_s: self.ops_per_s(),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
        }
    }
}

/// Runs `tasks` concurrent loops of `op(task)` for `secs` and records every call.
async fn sample<F, Fut>(tasks: usize, secs: f64, op: F) -> Result<Sample, Box<dyn Error>>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let op = op.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                let t = Instant::now();
                op(task).await?;
                latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
            }
            Ok::<_, String>(latencies)
        }));
    }
    let mut latencies_ns = Vec::new();
    for handle in handles {
        latencies_ns.extend(handle.await??);
    }
    Ok(Sample {
        latencies_ns,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// [`sample`] as a figure.
async fn measure<F, Fut>(tasks: usize, secs: f64, op: F) -> Result<Figure, Box<dyn Error>>
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    Ok(sample(tasks, secs, op).await?.figure())
}

/// How many alternating pairs of slices a comparison is measured in: even, so that each
/// side runs first in half of the pairs.
const PAIRS: u32 = 6;

/// Measures `a` and `b` at `tasks` for `secs` each, in [`PAIRS`] alternating slices, so
/// that drift in the database (autovacuum, checkpoints, a growing event table) weighs on
/// both alike instead of on whichever ran second.
async fn compare<A, FA, B, FB>(
    tasks: usize,
    secs: f64,
    a: A,
    b: B,
) -> Result<(Figure, Figure), Box<dyn Error>>
where
    A: Fn(usize) -> FA + Clone + Send + Sync + 'static,
    FA: Future<Output = Result<(), String>> + Send,
    B: Fn(usize) -> FB + Clone + Send + Sync + 'static,
    FB: Future<Output = Result<(), String>> + Send,
{
    let compared = compare_in(tasks, PAIRS, secs / f64::from(PAIRS), a, b).await?;
    Ok((compared.a, compared.b))
}

/// Both sides of a comparison and, for each pair of slices, `b`'s throughput over `a`'s:
/// their spread is how far one slice's ratio can be trusted.
struct Comparison {
    a: Figure,
    b: Figure,
    pair_ratios: Vec<f64>,
}

/// [`compare`] in `pairs` pairs of slices of `slice_secs` each (`pairs` even: A B, then
/// B A, so that a drift over the run (a checkpoint ending, caches warming) that favours
/// whichever side runs first in a pair weighs on both alike).
async fn compare_in<A, FA, B, FB>(
    tasks: usize,
    pairs: u32,
    slice_secs: f64,
    a: A,
    b: B,
) -> Result<Comparison, Box<dyn Error>>
where
    A: Fn(usize) -> FA + Clone + Send + Sync + 'static,
    FA: Future<Output = Result<(), String>> + Send,
    B: Fn(usize) -> FB + Clone + Send + Sync + 'static,
    FB: Future<Output = Result<(), String>> + Send,
{
    let (mut sample_a, mut sample_b) = (Sample::default(), Sample::default());
    let mut pair_ratios = Vec::with_capacity(pairs as usize);
    for pair in 0..pairs {
        let (slice_a, slice_b) = if pair % 2 == 0 {
            let slice_a = sample(tasks, slice_secs, a.clone()).await?;
            (slice_a, sample(tasks, slice_secs, b.clone()).await?)
        } else {
            let slice_b = sample(tasks, slice_secs, b.clone()).await?;
            (sample(tasks, slice_secs, a.clone()).await?, slice_b)
        };
        pair_ratios.push(slice_b.ops_per_s() / slice_a.ops_per_s());
        sample_a.add(slice_a);
        sample_b.add(slice_b);
    }
    Ok(Comparison {
        a: sample_a.figure(),
        b: sample_b.figure(),
        pair_ratios,
    })
}

/// One call of a measured operation.
type Call = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

fn request(budget: u64) -> CreateSessionRequest {
    CreateSessionRequest::new(
        Uuid::new_v4(),
        ["search", "fetch"],
        budget,
        chrono::Duration::hours(4),
    )
}

const BIG_BUDGET: u64 = 1_000_000_000;

async fn sessions(store: &SessionStore, n: usize) -> Result<Vec<Uuid>, Box<dyn Error>> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(store.create(request(BIG_BUDGET)).await?.session_id);
    }
    Ok(ids)
}

fn store(storage: &PgStorage) -> SessionStore {
    SessionStore::builder(storage.clone())
        .clock(Arc::new(SystemClock))
        .build()
}

/// `limit` at `tasks`: each task owns a session and sends the write-through statement
/// itself, one commit per call.
async fn limit(
    storage: &PgStorage,
    tasks: usize,
) -> Result<impl Fn(usize) -> Call + Clone + Send + Sync + 'static, Box<dyn Error>> {
    let creator = store(storage);
    let ids = sessions(&creator, tasks).await?;
    let mut states = Vec::new();
    for id in &ids {
        let stored = storage.load(*id).await?.ok_or("session just created")?;
        states.push(tokio::sync::Mutex::new(stored));
    }
    let states = Arc::new(states);
    let storage = storage.clone();
    let instance = Uuid::new_v4();
    Ok(move |task: usize| -> Call {
        let states = Arc::clone(&states);
        let storage = storage.clone();
        Box::pin(async move {
            let mut stored = states[task].lock().await;
            let mut next = stored.session.clone();
            next.calls_made += 1;
            let event = AuditEvent::new(
                EventKind::CallAllowed,
                vec!["search".to_owned()],
                &next,
                Utc::now(),
                instance,
            );
            match storage.update(&next, stored.version, &[event]).await {
                Ok(arbiter_session::storage::UpdateOutcome::Applied(version)) => {
                    stored.session = next;
                    stored.version = version;
                    Ok(())
                }
                other => Err(format!("limit write: {other:?}")),
            }
        })
    })
}

/// `use_session` through a new store, task `t` on session `t % sessions_n`.
async fn use_session(
    storage: &PgStorage,
    sessions_n: usize,
) -> Result<impl Fn(usize) -> Call + Clone + Send + Sync + 'static, Box<dyn Error>> {
    let store = store(storage);
    let ids = Arc::new(sessions(&store, sessions_n).await?);
    Ok(move |task: usize| -> Call {
        let store = store.clone();
        let id = ids[task % ids.len()];
        Box::pin(async move {
            store
                .use_session(id, "search", None)
                .await
                .map(drop)
                .map_err(|e| format!("use_session: {e:?}"))
        })
    })
}

/// Stores `n` sessions with plain SQL (no audit rows: only loading them is measured).
async fn fill(storage: &PgStorage, n: i64) -> Result<(), Box<dyn Error>> {
    sqlx::query!(
        r#"
        INSERT INTO arbiter.sessions (
            session_id, agent_id, delegation_chain, declared_intent, authorized_tools,
            authorized_credentials, call_budget, rate_window_secs, data_sensitivity_ceiling,
            created_at, expires_at)
        SELECT gen_random_uuid(), gen_random_uuid(), '{}', 'bench', '{search}', '{}', 10, 60,
               'internal', now(), now() + interval '4 hours'
          FROM generate_series(1, $1::bigint)
        "#,
        n
    )
    .execute(storage.pool())
    .await?;
    Ok(())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// What every figure function gets: the options, the storage, and where figures go.
struct Bench {
    options: Options,
    url: String,
    storage: PgStorage,
    figures: BTreeMap<String, Figure>,
}

impl Bench {
    /// Records a figure and prints its line of the table.
    fn record(&mut self, name: &str, figure: Figure) {
        eprintln!(
            "{name:<24} {:>12.0} ops/s  p50 {:>9.1} µs  p99 {:>9.1} µs",
            figure.ops_per_s, figure.p50_us, figure.p99_us
        );
        self.figures.insert(name.to_owned(), figure);
    }

    /// Measures `op` at `tasks` for the options' duration and records it as `name`.
    async fn run<F, Fut>(&mut self, name: &str, tasks: usize, op: F) -> Result<(), Box<dyn Error>>
    where
        F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let figure = measure(tasks, self.options.secs, op).await?;
        self.record(name, figure);
        Ok(())
    }

    /// `a` over `b` at their best.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        self.figures
            .get(a)
            .zip(self.figures.get(b))
            .map_or(0.0, |(a, b)| a.ops_per_s / b.ops_per_s)
    }
}

/// An operation every task runs on `store` (each call gets its own handle).
fn on_store<F, Fut>(
    store: &SessionStore,
    op: F,
) -> impl Fn(usize) -> Call + Clone + Send + Sync + use<F, Fut>
where
    F: Fn(SessionStore) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let store = store.clone();
    move |_| -> Call { Box::pin(op(store.clone())) }
}

fn failed(what: &str) -> impl Fn(arbiter_session::SessionError) -> String + '_ {
    move |err| format!("{what}: {err:?}")
}

/// The limit and the store over distinct sessions, compared slice by slice, at 1, 16 and
/// 64 tasks.
async fn distinct_sessions(bench: &mut Bench) -> Result<(), Box<dyn Error>> {
    for tasks in [1, 16, 64] {
        let (raw, through_store) = compare(
            tasks,
            bench.options.secs,
            limit(&bench.storage, tasks).await?,
            use_session(&bench.storage, tasks).await?,
        )
        .await?;
        bench.record(&format!("limit_{tasks}"), raw);
        bench.record(&format!("use_distinct_{tasks}"), through_store);
    }
    Ok(())
}

/// 64 tasks on one session: the combining of queued calls.
async fn hot_session(bench: &mut Bench) -> Result<(), Box<dyn Error>> {
    let op = use_session(&bench.storage, 1).await?;
    bench.run("use_hot_64", 64, op).await
}

/// `use_session` at 64 tasks on 64 live (cached) sessions, alone and while 64 other tasks
/// look up random unknown ids through the same store (what any agent can send), in
/// alternating slices: the cold-load lane keeps the lookups from taking the pool.
async fn unknown_ids(bench: &mut Bench) -> Result<(), Box<dyn Error>> {
    let store = store(&bench.storage);
    let ids = Arc::new(sessions(&store, 64).await?);
    let live = {
        let store = store.clone();
        move |task: usize| -> Call {
            let (store, id) = (store.clone(), ids[task % ids.len()]);
            Box::pin(async move {
                store
                    .use_session(id, "search", None)
                    .await
                    .map(drop)
                    .map_err(failed("use_session"))
            })
        }
    };
    let slice = bench.options.secs / f64::from(PAIRS);
    let (mut alone, mut beside) = (Sample::default(), Sample::default());
    let mut lookups = 0;
    for pair in 0..PAIRS {
        for flooded in [pair % 2 == 1, pair % 2 == 0] {
            if flooded {
                let (sample, looked_up) =
                    while_unknown_ids(&store, sample(64, slice, live.clone())).await;
                beside.add(sample?);
                lookups += looked_up;
            } else {
                alone.add(sample(64, slice, live.clone()).await?);
            }
        }
    }
    let flood_secs = beside.elapsed_s;
    bench.record("use_live_64", alone.figure());
    bench.record("use_live_beside_unknown_64", beside.figure());
    eprintln!(
        "(64 tasks looked up {:.0} unknown ids/s beside them)",
        lookups as f64 / flood_secs
    );
    Ok(())
}

/// Runs `during` while 64 tasks look up random unknown ids on `store`; its output and how
/// many lookups were answered.
async fn while_unknown_ids<T>(store: &SessionStore, during: impl Future<Output = T>) -> (T, u64) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let (store, stop) = (store.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut answered = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // NotFound, or StorageRead when the lane stays full past the timeout.
                    let _ = store.get(Uuid::new_v4()).await;
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    let output = during.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for task in flood {
        answered += task.await.unwrap_or(0);
    }
    (output, answered)
}

/// Creates, plain and capped, at 16 tasks.
async fn creates(bench: &mut Bench, creator: &SessionStore) -> Result<(), Box<dyn Error>> {
    let create = on_store(creator, |store| async move {
        store
            .create(request(10))
            .await
            .map(drop)
            .map_err(failed("create"))
    });
    bench.run("create", 16, create).await?;
    let capped = on_store(creator, |store| async move {
        store
            .create_if_under_cap(request(10), 1_000)
            .await
            .map(drop)
            .map_err(failed("create_if_under_cap"))
    });
    bench.run("create_if_under_cap", 16, capped).await
}

/// Answered from the cache: a cached get, an unauthorized tool, a closed session. The two
/// denials flood the bounded denial log by design; returns how much of it was kept.
async fn cached_answers(
    bench: &mut Bench,
    creator: &SessionStore,
) -> Result<arbiter_session::StoreStats, Box<dyn Error>> {
    let cached = creator.create(request(10)).await?.session_id;
    let closed = creator.create(request(10)).await?.session_id;
    creator.close(closed).await?;
    creator.get(closed).await?;
    let get = on_store(creator, move |store| async move {
        store.get(cached).await.map(drop).map_err(failed("get"))
    });
    bench.run("get_cached", 2, get).await?;
    let deny_tool = on_store(creator, move |store| async move {
        match store.use_session(cached, "not_allowed", None).await {
            Err(arbiter_session::SessionError::ToolNotAuthorized { .. }) => Ok(()),
            other => Err(format!("expected a tool denial, got {other:?}")),
        }
    });
    bench.run("deny_tool_cached", 2, deny_tool).await?;
    let deny_closed = on_store(creator, move |store| async move {
        match store.use_session(closed, "search", None).await {
            Err(arbiter_session::SessionError::AlreadyClosed(_)) => Ok(()),
            other => Err(format!("expected a closed denial, got {other:?}")),
        }
    });
    bench.run("deny_closed_cached", 2, deny_closed).await?;
    let left = creator.shutdown(Duration::from_secs(30)).await;
    let denials = creator.stats();
    eprintln!(
        "(denial log during the two denial figures: {} recorded, {} dropped and counted; \
         unrecorded at shutdown: {})",
        denials.denials_recorded, denials.denials_dropped, left.unrecorded_denials
    );
    Ok(denials)
}

/// Stores the options' many sessions with plain SQL (no audit rows needed to be loaded),
/// and returns up to `distinct_gets` of their ids.
async fn many_stored_sessions(bench: &Bench) -> Result<Vec<Uuid>, Box<dyn Error>> {
    let filler = Instant::now();
    // In chunks: each statement stays well inside the pool's statement timeout.
    let mut left = bench.options.stored_sessions;
    while left > 0 {
        let chunk = std::cmp::min(left, 100_000);
        left -= chunk;
        fill(&bench.storage, chunk).await?;
    }
    eprintln!(
        "(stored {} sessions in {:.1} s)",
        bench.options.stored_sessions,
        filler.elapsed().as_secs_f64()
    );
    Ok(sqlx::query_scalar!(
        "SELECT session_id FROM arbiter.sessions WHERE declared_intent = 'bench' LIMIT $1",
        i64::try_from(bench.options.distinct_gets)?
    )
    .fetch_all(bench.storage.pool())
    .await?)
}

/// A new pool and store over the full table, to the first successful call, in ms.
async fn startup(bench: &Bench, first: Uuid) -> Result<f64, Box<dyn Error>> {
    let started = Instant::now();
    let fresh = SessionStore::new(PgStorage::connect(&bench.url).await?);
    fresh.use_session(first, "search", None).await?;
    let startup_ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!("{:<24} {startup_ms:>12.1} ms", "startup");
    Ok(startup_ms)
}

/// Cold gets at 16 tasks, then the resident memory after every id was read once through a
/// bounded cache, in MiB.
async fn cold_gets_and_memory(bench: &mut Bench, ids: Vec<Uuid>) -> Result<f64, Box<dyn Error>> {
    let cold_store = SessionStore::builder(bench.storage.clone())
        .cache_capacity(bench.options.rss_cache_capacity)
        .build();
    let ids = Arc::new(ids);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let (s, i, n) = (cold_store.clone(), Arc::clone(&ids), Arc::clone(&next));
    let figure = measure(16, bench.options.secs.min(2.0), move |_| {
        let (s, i, n) = (s.clone(), Arc::clone(&i), Arc::clone(&n));
        async move {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % i.len();
            s.get(i[k]).await.map(drop).map_err(failed("cold get"))
        }
    })
    .await?;
    bench.record("get_cold", figure);
    let read = Instant::now();
    let mut handles = Vec::new();
    for task in 0..16 {
        let (s, i) = (cold_store.clone(), Arc::clone(&ids));
        handles.push(tokio::spawn(async move {
            for k in (task..i.len()).step_by(16) {
                s.get(i[k]).await.map_err(failed("get"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let rss = rss_mib();
    eprintln!(
        "{:<24} {rss:>12.1} MiB after {} distinct gets in {:.1} s (cache capacity {})",
        "rss",
        ids.len(),
        read.elapsed().as_secs_f64(),
        bench.options.rss_cache_capacity
    );
    Ok(rss)
}

/// The HTTP service (`arbiter-session serve`, the binary `scripts/bench` builds and names
/// in `ARBITER_SERVE_BIN`) beside the in-process store, both at 64 tasks on distinct
/// sessions: `use` over HTTP with 64 keep-alive connections, compared slice by slice with
/// `use_session` in process, then Envoy's `check`. Client, service and PostgreSQL share
/// the machine's cores.
async fn http_service(bench: &mut Bench) -> Result<(), Box<dyn Error>> {
    let Ok(binary) = std::env::var("ARBITER_SERVE_BIN") else {
        eprintln!("(no ARBITER_SERVE_BIN: the HTTP figures are skipped)");
        return Ok(());
    };
    let service = HttpService::start(&binary, &bench.url)?;
    let creator = store(&bench.storage);
    let mut sessions = Vec::with_capacity(64);
    for _ in 0..64 {
        let session = creator.create(request(BIG_BUDGET)).await?;
        sessions.push((session.session_id, session.agent_id));
    }
    let sessions = Arc::new(sessions);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let base = service.base.clone();
    let (c, b, s) = (client.clone(), base.clone(), Arc::clone(&sessions));
    let http_use = move |task: usize| -> Call {
        let (id, agent) = s[task % s.len()];
        let request = c
            .post(format!("{b}/v1/sessions/{id}/use"))
            .bearer_auth(GATEWAY_TOKEN)
            .json(&serde_json::json!({ "tool": "search", "agent_id": agent }));
        Box::pin(async move { expect_ok(request.send().await, "use over HTTP") })
    };
    let (over_http, in_process) = compare(
        64,
        bench.options.secs,
        http_use,
        use_session(&bench.storage, 64).await?,
    )
    .await?;
    bench.record("http_use_64", over_http);
    bench.record("inprocess_use_64", in_process);
    let (c, b, s) = (client, base, sessions);
    let check = move |task: usize| -> Call {
        let (id, agent) = s[task % s.len()];
        let request = c
            .post(format!("{b}/v1/check/mcp"))
            .bearer_auth(GATEWAY_TOKEN)
            .header("x-arbiter-session", id.to_string())
            .header("x-arbiter-agent", agent.to_string())
            .header("x-arbiter-tool", "search");
        Box::pin(async move { expect_ok(request.send().await, "check") })
    };
    bench.run("http_check_64", 64, check).await?;
    service.stop()
}

const ADMIN_TOKEN: &str = "bench-admin-token-0001";
const GATEWAY_TOKEN: &str = "bench-gateway-token-0001";

fn expect_ok(answer: reqwest::Result<reqwest::Response>, what: &str) -> Result<(), String> {
    match answer {
        Ok(response) if response.status().is_success() => Ok(()),
        Ok(response) => Err(format!("{what}: {}", response.status())),
        Err(err) => Err(format!("{what}: {err}")),
    }
}

/// `arbiter-session serve` as a child process on a free loopback port.
struct HttpService {
    child: std::process::Child,
    base: String,
}

impl HttpService {
    fn start(binary: &str, url: &str) -> Result<Self, Box<dyn Error>> {
        Self::start_with(binary, url, &[])
    }

    /// [`Self::start`] with more arguments of `serve`.
    fn start_with(binary: &str, url: &str, args: &[&str]) -> Result<Self, Box<dyn Error>> {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(binary)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("DATABASE_URL", url)
            .env("ARBITER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("ARBITER_GATEWAY_TOKEN", GATEWAY_TOKEN)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let address = line
            .trim()
            .strip_prefix("arbiter-session: listening on ")
            .ok_or_else(|| format!("the service did not start: {line:?}"))?;
        Ok(HttpService {
            base: format!("http://{address}"),
            child,
        })
    }

    /// SIGTERM, and the clean exit that must follow.
    fn stop(mut self) -> Result<(), Box<dyn Error>> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let status = self.child.wait()?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the service exited with {status}").into())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let options = Options::parse()?;
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL (scripts/bench does)")?;
    let storage = PgStorage::connect(&url).await?;
    migrate(storage.pool()).await?;
    if std::env::var_os("ARBITER_BENCH_PROFILE_NO_CHAIN").is_some() {
        // Profiling aid only: what the audit hash chain costs per event.
        sqlx::raw_sql(
            "ALTER TABLE arbiter.session_events DROP CONSTRAINT session_events_chained;
             DO $$
             DECLARE partition regclass;
             BEGIN
                 FOR partition IN SELECT p.partition FROM arbiter.event_partitions() p LOOP
                     EXECUTE format('ALTER TABLE %s DISABLE TRIGGER session_events_chain',
                                    partition);
                 END LOOP;
             END
             $$;",
        )
        .execute(storage.pool())
        .await?;
    }
    let mut bench = Bench {
        options,
        url,
        storage,
        figures: BTreeMap::new(),
    };

    distinct_sessions(&mut bench).await?;
    let (left_at_first_denial, left_when_idle) = budgets::shared_budgets(&mut bench).await?;
    hot_session(&mut bench).await?;
    unknown_ids(&mut bench).await?;
    let creator = store(&bench.storage);
    creates(&mut bench, &creator).await?;
    let denials = cached_answers(&mut bench, &creator).await?;
    // Before the million stored sessions: the same table as the figures above.
    http_service(&mut bench).await?;
    let mcp_added = mcp::added_latency(&mut bench).await?;
    let ids = many_stored_sessions(&bench).await?;
    let first = *ids.first().ok_or("no stored session")?;
    let startup_ms = startup(&bench, first).await?;
    let distinct_gets = ids.len();
    let rss = cold_gets_and_memory(&mut bench, ids).await?;
    let history = match bench.options.history {
        0 => None,
        events => Some(history::history(&mut bench, events).await?),
    };

    let summary = serde_json::json!({
        "date": Utc::now().format("%Y-%m-%d").to_string(),
        "quick": bench.options.quick,
        "figures": bench.figures,
        "startup_ms": startup_ms,
        "stored_sessions": bench.options.stored_sessions,
        "rss_mib": rss,
        "distinct_gets": distinct_gets,
        "denials_recorded": denials.denials_recorded,
        "denials_dropped": denials.denials_dropped,
        "ratio_distinct_64": bench.ratio("use_distinct_64", "limit_64"),
        "ratio_distinct_16": bench.ratio("use_distinct_16", "limit_16"),
        "ratio_hot_64": bench.ratio("use_hot_64", "use_distinct_1"),
        "ratio_http_64": bench.ratio("http_use_64", "inprocess_use_64"),
        "ratio_unknown_ids_64": bench.ratio("use_live_beside_unknown_64", "use_live_64"),
        "ratio_history_64": bench.ratio("use_history_64", "use_empty_64"),
        "ratio_budget_64": bench.ratio("use_budget_64", "use_unbudgeted_64"),
        "ratio_naive_budget_64": bench.ratio("naive_budget_64", "limit_budget_64"),
        "budget_left_at_first_denial": left_at_first_denial,
        "budget_left_when_idle": left_when_idle,
        "mcp_proxy_added_p50_us": mcp_added.map(|added| added.0),
        "mcp_proxy_added_p99_us": mcp_added.map(|added| added.1),
        "history": history,
    });
    println!("{summary}");
    Ok(())
}
