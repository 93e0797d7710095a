//! The scale figures (`--history N`): what a trail of months costs. Two databases beside the
//! bench's own, both freshly migrated: one stays empty, the other gets N historical events
//! (ended sessions of 100 events each, one of them a denial, over the 30 days before today,
//! 20 agents, written through the chain trigger so both hash chains are real), then its
//! first rollup. Then, on the database with history: `use_session` at 64 tasks alternated
//! with the empty database (`ratio_history_64`), every report for one day and for 30 days,
//! the console's page loads, export and verify in events per second, and the purge of the
//! oldest day.

use std::collections::BTreeMap;
use std::error::Error;
use std::str::FromStr as _;
use std::time::Instant;

use arbiter_session::operator::report::{self, ReportFilter};
use arbiter_session::operator::{chain, export, retention, rollup};
use arbiter_session::{PgStorage, migrate};
use chrono::{Days, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::{Bench, compare_in, use_session};

/// Days of history, ending yesterday.
const DAYS: u32 = 30;
/// Events per historical session: created, 97 calls, a denial, closed.
const EVENTS_PER_SESSION: u64 = 100;
const AGENTS: usize = 20;
/// The history's comparison in a full run: pairs of slices, and seconds per slice (30 s a
/// side, six times the other comparisons). Its ratio has the narrowest target (0.95), and
/// one slice's ratio swings far wider: `use_session` at 64 on two databases of 10 million
/// and no events, alternating 5 s slices, measured 0.85 to 1.34 from one pair to the
/// next, 1.01 over eight pairs (2026-12-03). `--quick` compares as the other figures do.
const FULL_PAIRS: u32 = 12;
const FULL_SLICE_S: f64 = 2.5;

/// The figures of the history, beside the throughput ones recorded in [`Bench`].
#[derive(Debug, Serialize)]
pub struct HistoryFigures {
    /// Historical events loaded.
    pub events: u64,
    /// Loading them (through the chain trigger), in seconds.
    pub load_s: f64,
    /// The first rollup of the 30 days, in seconds.
    pub rollup_s: f64,
    /// Each report, since yesterday and over 30 days, in milliseconds (best of three).
    pub reports_ms: BTreeMap<String, f64>,
    /// Each page of the console, its requests' median load in milliseconds
    /// (`console::page_loads`).
    pub console_ms: BTreeMap<String, f64>,
    /// `ratio_history_64` of each pair of slices, in the order measured: its spread is the
    /// noise of one slice.
    pub ratio_64_per_pair: Vec<f64>,
    /// Events of today when the reports were measured.
    pub events_today: i64,
    /// Of those, the events the reports read raw (the rest come from today's rollup).
    pub events_raw: i64,
    /// `export` of one whole historical day, events per second.
    pub export_events_per_s: f64,
    /// `verify` of every chain, links (events and denials) per second.
    pub verify_links_per_s: f64,
    /// `purge --events` that drops the oldest day, in milliseconds, and the events it removed.
    pub purge_day_ms: f64,
    pub purge_day_events: u64,
}

/// A database beside the bench's, named `<bench database>_<suffix>`, made anew.
struct Scratch {
    admin: PgPool,
    name: String,
    options: PgConnectOptions,
    url: String,
}

impl Scratch {
    async fn create(admin: &PgPool, url: &str, suffix: &str) -> Result<Self, Box<dyn Error>> {
        let base: String = sqlx::query_scalar!(r#"SELECT current_database() AS "name!""#)
            .fetch_one(admin)
            .await?;
        let name = format!("{base}_{suffix}");
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(admin)
                .await?;
        }
        let options = PgConnectOptions::from_str(url)?.database(&name);
        // The bench's URL with its database replaced (scripts/lib/postgres.sh does the same).
        let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
        let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
        let url = format!("{server}/{name}{query}");
        Ok(Scratch {
            admin: admin.clone(),
            name,
            options,
            url,
        })
    }

    /// A pool with no statement timeout, for loading and the operator's work.
    async fn pool(&self) -> Result<PgPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(4)
            .connect_with(self.options.clone())
            .await
    }

    /// Drops the database. Removing 10 million events' files takes longer than the bench's
    /// pool allows a statement (`PgStorage::connect` sets 5 s), so this connection lifts
    /// the limit first (and is closed afterwards rather than pooled).
    async fn drop(self) -> Result<(), sqlx::Error> {
        let mut conn = self.admin.acquire().await?;
        sqlx::query!("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        conn.close_on_drop();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Loads about `events` historical events into `pool`: whole sessions, the same number on
/// each of the 30 days, one statement per day.
async fn load(pool: &PgPool, events: u64) -> Result<u64, Box<dyn Error>> {
    let per_day = std::cmp::max((events / EVENTS_PER_SESSION).div_ceil(u64::from(DAYS)), 1);
    let per_day = i32::try_from(per_day)?;
    let agents: Vec<Uuid> = (0..AGENTS).map(|_| Uuid::new_v4()).collect();
    let instance = Uuid::new_v4();
    let today = Utc::now().date_naive();
    let mut loaded = 0;
    for back in (1..=DAYS).rev() {
        let day = today - Days::new(u64::from(back));
        sqlx::query_scalar!("SELECT arbiter.create_event_partition($1)", day)
            .fetch_one(pool)
            .await?;
        // Sessions start through the day and end 99 s later, before midnight, so that a
        // purge at the next midnight finds the day's partition over.
        let written = sqlx::query_file!(
            "examples/bench/load_history_day.sql",
            day,
            per_day,
            &agents,
            instance
        )
        .execute(pool)
        .await?;
        loaded += written.rows_affected();
    }
    Ok(loaded)
}

/// The best of three runs of `op`, in milliseconds.
async fn best_of_three<F, Fut, T>(op: F) -> Result<f64, Box<dyn Error>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, arbiter_session::error::StorageError>>,
{
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        op().await?;
        best = best.min(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(best)
}

async fn reports(pool: &PgPool, today: NaiveDate) -> Result<BTreeMap<String, f64>, Box<dyn Error>> {
    let mut timings = BTreeMap::new();
    for (span, days) in [("1d", 1_u64), ("30d", u64::from(DAYS))] {
        let filter = ReportFilter::default().with_since(Some(today - Days::new(days)));
        let ms = best_of_three(|| report::utilization(pool, filter)).await?;
        timings.insert(format!("utilization_{span}"), ms);
        let ms = best_of_three(|| report::agent_activity(pool, filter)).await?;
        timings.insert(format!("agents_{span}"), ms);
        let ms = best_of_three(|| report::tool_usage(pool, filter)).await?;
        timings.insert(format!("tools_{span}"), ms);
        let ms = best_of_three(|| report::denials(pool, filter)).await?;
        timings.insert(format!("denials_{span}"), ms);
    }
    for (name, ms) in &timings {
        eprintln!("report {name:<17} {ms:>9.1} ms");
    }
    Ok(timings)
}

/// Measures the history figures; records `use_empty_64` and `use_history_64` in `bench`.
pub async fn history(bench: &mut Bench, events: u64) -> Result<HistoryFigures, Box<dyn Error>> {
    let empty_db = Scratch::create(bench.storage.pool(), &bench.url, "empty").await?;
    let history_db = Scratch::create(bench.storage.pool(), &bench.url, "history").await?;
    let history_pool = history_db.pool().await?;
    let empty_pool = empty_db.pool().await?;
    migrate(&history_pool).await?;
    migrate(&empty_pool).await?;

    let started = Instant::now();
    let loaded = load(&history_pool, events).await?;
    let load_s = started.elapsed().as_secs_f64();
    // A trail of months is vacuumed: without this, autovacuum works through the freshly
    // loaded partitions while the figures below are measured (on two cores, the full run
    // of 2026-12-01 lost a sixth of `use_history_64` to it).
    sqlx::raw_sql("VACUUM (ANALYZE)")
        .execute(&history_pool)
        .await?;
    eprintln!("history: {loaded} events loaded in {load_s:.1} s");
    let started = Instant::now();
    let rolled = rollup::roll_up(&history_pool).await?;
    let rollup_s = started.elapsed().as_secs_f64();
    if rolled.stopped_at.is_some() || rolled.rolled.len() < DAYS as usize {
        return Err(format!("the first rollup left days out: {rolled:?}").into());
    }
    eprintln!(
        "history: {} days rolled up in {rollup_s:.1} s",
        rolled.rolled.len()
    );
    // Autovacuum processes a rollup's new rows soon after it (they pass its insert
    // threshold); until then, the planner has no statistics on them, and
    // `session_utilization`'s fallback lookups cannot be index-only. A trail of months has
    // its past rollups vacuumed.
    sqlx::raw_sql(
        "VACUUM (ANALYZE) arbiter.agent_day_rollup, arbiter.tool_day_rollup, \
         arbiter.denial_day_rollup, arbiter.session_day_rollup, arbiter.session_rollup, \
         arbiter.rollup_days",
    )
    .execute(&history_pool)
    .await?;
    // The load wrote gigabytes of WAL; a trail of months has been checkpointed long ago.
    // Without this, the checkpoint the load started writes its pages out, spread over
    // minutes, while both databases are measured.
    sqlx::raw_sql("CHECKPOINT").execute(&history_pool).await?;

    // The stores go through PgStorage's own pools, as a gateway's would.
    let empty_storage = PgStorage::connect(&empty_db.url).await?;
    let history_storage = PgStorage::connect(&history_db.url).await?;
    let (pairs, slice_s) = if bench.options.quick {
        (crate::PAIRS, bench.options.secs / f64::from(crate::PAIRS))
    } else {
        (FULL_PAIRS, FULL_SLICE_S)
    };
    let compared = compare_in(
        64,
        pairs,
        slice_s,
        use_session(&empty_storage, 64).await?,
        use_session(&history_storage, 64).await?,
    )
    .await?;
    let ratio_64_per_pair = compared.pair_ratios;
    let (least, most) = ratio_64_per_pair
        .iter()
        .fold((f64::INFINITY, 0.0_f64), |(least, most), &r| {
            (least.min(r), most.max(r))
        });
    eprintln!(
        "history: use_session at 64, with history / empty, per pair of slices: {least:.2} to {most:.2}"
    );
    bench.record("use_empty_64", compared.a);
    bench.record("use_history_64", compared.b);

    let today = Utc::now().date_naive();
    let events_today = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM arbiter.session_events
            WHERE occurred_at >= $1::date::timestamp AT TIME ZONE 'UTC'"#,
        today
    )
    .fetch_one(&history_pool)
    .await?;
    // The stores' upkeep rolls today up every minute, to a few seconds before it runs
    // (arbiter.rollup_today_lag). The reports are measured after such a rollup, once those
    // seconds have passed since the last write: what they read raw is then what a
    // deployment's report reads beside the rollups, the events since the last upkeep.
    let lag_s = sqlx::query_scalar!(
        r#"SELECT extract(epoch FROM arbiter.rollup_today_lag())::float8 AS "seconds!""#
    )
    .fetch_one(&history_pool)
    .await?;
    tokio::time::sleep(std::time::Duration::from_secs_f64(lag_s + 1.0)).await;
    let rolled = rollup::roll_up(&history_pool).await?;
    if rolled.today_until.is_none() {
        return Err(format!("today was not rolled up: {rolled:?}").into());
    }
    let events_raw = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM arbiter.session_events
            WHERE occurred_at >= arbiter.rollup_raw_from()"#
    )
    .fetch_one(&history_pool)
    .await?;
    eprintln!("reports: {events_today} events of today, {events_raw} of them read raw");
    let reports_ms = reports(&history_pool, today).await?;
    let console_ms = crate::console::page_loads(&history_storage, &history_db.url).await?;

    let day = today - Days::new(2);
    let range = export::ExportRange::new(
        day.and_time(chrono::NaiveTime::MIN).and_utc(),
        (day + Days::new(1))
            .and_time(chrono::NaiveTime::MIN)
            .and_utc(),
    );
    let started = Instant::now();
    let exported = export::export_events(
        &history_pool,
        range,
        export::ExportFormat::JsonLines,
        &mut std::io::sink(),
    )
    .await?;
    let export_events_per_s = exported as f64 / started.elapsed().as_secs_f64();
    eprintln!("export of one day: {exported} events, {export_events_per_s:.0} events/s");

    let started = Instant::now();
    let verdict = chain::verify_all_audit_chains(&history_pool).await?;
    let verify_links_per_s =
        (verdict.events + verdict.denials) as f64 / started.elapsed().as_secs_f64();
    if !verdict.is_intact() {
        return Err(format!("verify found broken chains: {:?}", verdict.broken).into());
    }
    eprintln!(
        "verify: {} events and {} denials, {verify_links_per_s:.0} links/s",
        verdict.events, verdict.denials
    );

    let oldest = today - Days::new(u64::from(DAYS));
    let cutoff = (oldest + Days::new(1))
        .and_time(chrono::NaiveTime::MIN)
        .and_utc();
    let started = Instant::now();
    let purged =
        retention::purge_before(&history_pool, cutoff, retention::EventRetention::Delete).await?;
    let purge_day_ms = started.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "purge of the oldest day: {} events in {purge_day_ms:.0} ms",
        purged.events
    );

    for pool in [
        history_pool,
        empty_pool,
        empty_storage.pool().clone(),
        history_storage.pool().clone(),
    ] {
        pool.close().await;
    }
    empty_db.drop().await?;
    history_db.drop().await?;
    Ok(HistoryFigures {
        events: loaded,
        load_s,
        rollup_s,
        reports_ms,
        console_ms,
        ratio_64_per_pair,
        events_today,
        events_raw,
        export_events_per_s,
        verify_links_per_s,
        purge_day_ms,
        purge_day_events: purged.events,
    })
}
