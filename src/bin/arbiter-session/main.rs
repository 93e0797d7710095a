//! `arbiter-session`: the operator's command-line tool over an arbiter-session database.
//!
//! A thin shell over the library (`arbiter_session::migrate` and `arbiter_session::operator`):
//! it parses arguments, connects to `DATABASE_URL`, prints, and turns every failure into
//! one line on stderr and a non-zero exit.

#[cfg(feature = "server")]
mod serve;

use std::process::ExitCode;
use std::str::FromStr as _;
use std::time::Duration;

use arbiter_session::operator::chain::{self, ChainSummary, SessionChain};
use arbiter_session::operator::checkpoint::{self, CheckpointVerdict};
use arbiter_session::operator::export::{self, ExportFormat, ExportRange};
use arbiter_session::operator::partitions;
use arbiter_session::operator::report::{self, Format, ReportFilter};
use arbiter_session::operator::retention::{self, EventRetention};
use arbiter_session::operator::rollup;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{Connection as _, PgPool};
use uuid::Uuid;

/// Exit status when `verify` or `checkpoint` finds a broken or rewritten chain (errors exit
/// with 1, usage errors with 2).
const EXIT_TAMPERED: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "arbiter-session",
    version,
    about = "Operate an arbiter-session database: migrate, inspect, report, export, verify, checkpoint, purge, partitions",
    after_help = "Exit status: 0 on success, 1 on an error (one line on stderr), \
                  2 on a usage error, 3 when `verify` or `checkpoint` finds a broken or rewritten audit chain."
)]
struct Cli {
    /// PostgreSQL URL of the database holding the `arbiter` schema.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the library's migrations (safe to run from several processes at once).
    Migrate,
    /// Show one session and its whole audit trail.
    Inspect {
        /// The session id.
        session_id: Uuid,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Print a report from the reporting views.
    Report {
        /// Which report.
        report: ReportKind,
        /// Only this agent.
        #[arg(long)]
        agent: Option<Uuid>,
        /// Only from this UTC day on (YYYY-MM-DD).
        #[arg(long)]
        since: Option<NaiveDate>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// The audit trail's daily partitions: create the days ahead, or list them.
    Partitions {
        #[command(subcommand)]
        action: PartitionsAction,
    },
    /// Roll up the days that are over, and today so far, for the reports (each store's
    /// upkeep does this every minute; `upkeep` does it with the partitions).
    Rollup,
    /// The upkeep a store runs every minute unless it is told not to (`serve
    /// --no-upkeep`): create the audit trail's partitions a week ahead, then roll up for
    /// the reports. Run it as the schema's owner, from cron or, with --every, as a sidecar.
    Upkeep {
        /// Run again every SECS seconds until stopped, reporting a failed run on stderr
        /// instead of exiting.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        every: Option<u64>,
    },
    /// Stream the audit events that occurred in a time range, in order, with their hashes.
    Export {
        /// From: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp (inclusive).
        #[arg(long, value_parser = parse_cutoff)]
        since: DateTime<Utc>,
        /// Until: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp (exclusive).
        #[arg(long, value_parser = parse_cutoff)]
        until: DateTime<Utc>,
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<Uuid>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ExportFormatArg::Jsonl)]
        format: ExportFormatArg,
    },
    /// Verify the audit hash chain of one session, or of every session.
    Verify {
        /// Only this session (prints its head hash, to keep elsewhere).
        #[arg(long, conflicts_with = "against")]
        session: Option<Uuid>,
        /// Also prove that no chain recorded by the newest checkpoint in FILE (written by
        /// `checkpoint`) was rewritten or cut short since.
        #[arg(long, value_name = "FILE")]
        against: Option<std::path::PathBuf>,
    },
    /// Verify every chain and write their heads (a checkpoint) to stdout or append them to a
    /// file; keep it where the database's administrators cannot write.
    Checkpoint {
        /// Append to this file instead of printing.
        #[arg(long, value_name = "FILE")]
        append: Option<std::path::PathBuf>,
    },
    /// Serve sessions over HTTP (with the `server` feature): the JSON API, Envoy's
    /// ext_authz check, health, Prometheus metrics and the OpenAPI document.
    #[cfg(feature = "server")]
    Serve(serve::ServeArgs),
    /// Delete sessions that ended before a date (never a live one); keeps their audit
    /// events unless --events is given.
    Purge {
        /// The cutoff: YYYY-MM-DD (midnight UTC) or an RFC 3339 timestamp.
        #[arg(long, value_parser = parse_cutoff)]
        before: DateTime<Utc>,
        /// Also delete the events of deleted sessions recorded before the cutoff.
        #[arg(long)]
        events: bool,
        /// With --events: first write each day's partition that can go whole to
        /// DIR/session_events_YYYYMMDD.jsonl.gz, then drop only those; no event is deleted
        /// row by row (the rest waits until its whole day can go).
        #[arg(long, value_name = "DIR", requires = "events")]
        archive: Option<std::path::PathBuf>,
        /// With --events: append to FILE (the checkpoint file) the sessions whose trails
        /// the purge removes, each synced to disk before it goes, so that `verify
        /// --against FILE` tells them from trails that vanished.
        #[arg(long, value_name = "FILE", requires = "events")]
        record: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PartitionsAction {
    /// Create the partitions from yesterday to --days-ahead days from today (UTC) that do
    /// not exist yet. Each store's upkeep (or `upkeep`) does this every minute.
    Ensure {
        /// How many days ahead.
        #[arg(long, default_value_t = 7,
              value_parser = clap::value_parser!(u16).range(0..=i64::from(partitions::MAX_DAYS_AHEAD)))]
        days_ahead: u16,
    },
    /// List the partitions: day, estimated rows, size.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormatArg {
    /// JSON Lines: one object per event.
    Jsonl,
    /// CSV with a header line.
    Csv,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ReportKind {
    /// Per-session budget use, status, duration and denials.
    Utilization,
    /// Per-agent activity per day: sessions opened, calls allowed, denials by reason.
    Agents,
    /// Calls per tool per day.
    Tools,
    /// Denials per reason per day.
    Denials,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Aligned columns.
    Table,
    /// CSV with a header line.
    Csv,
    /// A JSON array.
    Json,
}

impl From<OutputFormat> for Format {
    fn from(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Table => Format::Table,
            OutputFormat::Csv => Format::Csv,
            OutputFormat::Json => Format::Json,
        }
    }
}

fn parse_cutoff(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|_| "expected YYYY-MM-DD or an RFC 3339 timestamp".to_owned())
}

/// A failure, already phrased for the operator.
struct Failure(String);

impl<E: std::error::Error + 'static> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(arbiter_session::error::error_chain(&err))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "server")]
    if let Command::Serve(args) = cli.command {
        // A service: one worker thread per core.
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => return fail(Failure::from(err)),
        };
        return match runtime.block_on(serve::serve(&cli.database_url, args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => fail(failure),
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(Failure::from(err)),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => fail(failure),
    }
}

fn fail(Failure(text): Failure) -> ExitCode {
    // One line, whatever the error's own formatting.
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("arbiter-session: error: {line}");
    ExitCode::FAILURE
}

async fn connect(url: &str) -> Result<PgPool, Failure> {
    let cannot = |err: sqlx::Error| {
        Failure(format!(
            "cannot connect to DATABASE_URL: {}",
            Failure::from(err).0
        ))
    };
    // JIT off: the operator's statements span every partition of the audit trail, and
    // compiling their plans cost seconds where running them takes milliseconds.
    let options = PgConnectOptions::from_str(url)
        .map_err(cannot)?
        .options([("jit", "off")]);
    // One direct connection first: a pool retries until its timeout and then reports only
    // that it timed out, where the operator needs "connection refused" or "no such role".
    PgConnection::connect_with(&options)
        .await
        .map_err(cannot)?
        .close()
        .await
        .map_err(cannot)?;
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let pool = connect(&cli.database_url).await?;
    match cli.command {
        Command::Migrate => {
            arbiter_session::migrate(&pool).await?;
            let applied = arbiter_session::MIGRATOR.iter().count();
            println!("schema arbiter is up to date ({applied} migrations)");
        }
        Command::Inspect { session_id, format } => inspect(&pool, session_id, format).await?,
        Command::Report {
            report,
            agent,
            since,
            format,
        } => {
            let filter = ReportFilter::default().with_agent(agent).with_since(since);
            let format = Format::from(format);
            let text = match report {
                ReportKind::Utilization => {
                    report::render(&report::utilization(&pool, filter).await?, format)?
                }
                ReportKind::Agents => {
                    report::render(&report::agent_activity(&pool, filter).await?, format)?
                }
                ReportKind::Tools => {
                    report::render(&report::tool_usage(&pool, filter).await?, format)?
                }
                ReportKind::Denials => {
                    report::render(&report::denials(&pool, filter).await?, format)?
                }
            };
            print!("{text}");
        }
        Command::Partitions {
            action: PartitionsAction::Ensure { days_ahead },
        } => {
            let created = partitions::ensure(&pool, days_ahead).await?;
            println!(
                "created {created} partitions; every day through {days_ahead} days ahead has one"
            );
            warn_if_default_partition_used(&pool).await?;
        }
        Command::Partitions {
            action: PartitionsAction::List { format },
        } => {
            let list = partitions::list(&pool).await?;
            print!("{}", report::render(&list, format.into())?);
            warn_if_default_partition_used(&pool).await?;
        }
        Command::Upkeep { every: None } => upkeep(&pool).await?,
        Command::Upkeep { every: Some(secs) } => loop {
            if let Err(Failure(text)) = upkeep(&pool).await {
                eprintln!("arbiter-session: upkeep failed, trying again in {secs} s: {text}");
            }
            tokio::time::sleep(Duration::from_secs(secs)).await;
        },
        Command::Rollup => {
            let outcome = rollup::roll_up(&pool).await?;
            for day in &outcome.rolled {
                println!("rolled up {} ({} events)", day.day, day.events);
            }
            match (outcome.stopped_at, rollup::horizon(&pool).await?) {
                (Some(day), _) => eprintln!(
                    "arbiter-session: {day} is busy (inserts of its events, or another \
                     rollup, in flight); the reports read it and later days from raw events \
                     until the next rollup"
                ),
                (None, Some(horizon)) => {
                    println!("reports read rollups before {horizon} and raw events from it on");
                    match outcome.today_until {
                        Some(until) => println!(
                            "today's events are rolled up to {}",
                            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        ),
                        None => eprintln!(
                            "arbiter-session: today is busy (another rollup of it, or an \
                             insert of its events, in flight); the reports read it from raw \
                             events until the next rollup"
                        ),
                    }
                }
                (None, None) => println!("no day to roll up"),
            }
        }
        Command::Export {
            since,
            until,
            agent,
            format,
        } => {
            let format = match format {
                ExportFormatArg::Jsonl => ExportFormat::JsonLines,
                ExportFormatArg::Csv => ExportFormat::Csv,
            };
            let range = ExportRange::new(since, until).with_agent(agent);
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            export::export_events(&pool, range, format, &mut out).await?;
        }
        Command::Verify {
            session: Some(id), ..
        } => {
            let verdict = chain::verify_audit_chain(&pool, id).await?;
            return Ok(print_session_verdict(&verdict));
        }
        Command::Verify {
            session: None,
            against: Some(path),
        } => {
            let file = std::fs::File::open(&path)
                .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
            let verdict = checkpoint::verify_against(&pool, std::io::BufReader::new(file)).await?;
            return Ok(print_checkpoint_verdict(&verdict));
        }
        Command::Verify {
            session: None,
            against: None,
        } => {
            let summary = chain::verify_all_audit_chains(&pool).await?;
            return Ok(print_summary(&summary));
        }
        Command::Checkpoint { append } => {
            let summary = match &append {
                Some(path) => {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
                    let mut out = std::io::BufWriter::new(file);
                    let summary = checkpoint::write_checkpoint(&pool, &mut out).await?;
                    out.into_inner()
                        .map_err(|err| Failure(err.to_string()))?
                        .sync_all()?;
                    summary
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    checkpoint::write_checkpoint(&pool, &mut out).await?
                }
            };
            for link in &summary.broken {
                eprintln!("BROKEN {link}");
            }
            if let Some(path) = &append {
                println!(
                    "checkpoint of {} sessions ({} chained events, {} chained denials) appended to {}",
                    summary.sessions,
                    summary.events,
                    summary.denials,
                    path.display()
                );
            }
            if !summary.broken.is_empty() {
                return Ok(ExitCode::from(EXIT_TAMPERED));
            }
        }
        #[cfg(feature = "server")]
        // Handled in `main`, on a runtime of its own.
        Command::Serve(_) => return Err(Failure("serve runs from main".to_owned())),
        Command::Purge {
            before,
            events,
            archive,
            record,
        } => purge(&pool, before, events, archive, record).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `purge`: what it deleted, and what it left busy, on stdout.
async fn purge(
    pool: &PgPool,
    before: DateTime<Utc>,
    events: bool,
    archive: Option<std::path::PathBuf>,
    record_to: Option<std::path::PathBuf>,
) -> Result<(), Failure> {
    let mut record = match &record_to {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
            Some(checkpoint::PurgeRecord::begin(
                std::io::BufWriter::new(file),
                before,
            )?)
        }
        None => None,
    };
    let mut trails = |sessions: &[Uuid]| match record.as_mut() {
        Some(record) => {
            record.trails(sessions)?;
            record.get_mut().get_ref().sync_data()
        }
        None => Ok(()),
    };
    let retention = if events {
        EventRetention::Delete
    } else {
        EventRetention::Keep
    };
    let recording = record_to.is_some();
    let purged = match archive {
        Some(dir) => {
            let report = if recording {
                retention::purge_archiving_recorded(pool, before, &dir, &mut trails).await?
            } else {
                retention::purge_archiving(pool, before, &dir).await?
            };
            for partition in &report.partitions {
                let outcome = if partition.dropped {
                    "dropped"
                } else {
                    "kept: it changed after it was written, or a lock stayed held; a later \
                     purge writes it again"
                };
                println!(
                    "archived {} ({} events) to {}; {outcome}",
                    partition.day,
                    partition.events,
                    partition.path.display()
                );
            }
            report.purge
        }
        // Recording reads each partition's sessions before it goes: only when asked.
        None if recording => {
            retention::purge_before_recorded(pool, before, retention, &mut trails).await?
        }
        None => retention::purge_before(pool, before, retention).await?,
    };
    if let Some(record) = record {
        record
            .finish()?
            .into_inner()
            .map_err(|err| Failure(err.to_string()))?
            .sync_all()?;
    }
    println!(
        "purged {} sessions and {} events that ended before {}",
        purged.sessions,
        purged.events,
        before.to_rfc3339()
    );
    if purged.busy > 0 {
        eprintln!(
            "arbiter-session: {} steps found a lock held (a reader, a late event or a rollup in \
             the way) and were left to a later purge",
            purged.busy
        );
    }
    Ok(())
}

/// One upkeep run: the partitions a week ahead, then the rollups; one line of what it did.
async fn upkeep(pool: &PgPool) -> Result<(), Failure> {
    let created = partitions::ensure(pool, 7).await?;
    let outcome = rollup::roll_up(pool).await?;
    let today = match (outcome.stopped_at, outcome.today_until) {
        (Some(day), _) => format!("stopped at {day}, which is busy"),
        (None, Some(until)) => format!(
            "today rolled up to {}",
            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ),
        (None, None) => "today is busy".to_owned(),
    };
    println!(
        "upkeep: created {created} partitions; rolled up {} days; {today}",
        outcome.rolled.len()
    );
    Ok(())
}

/// Warns on stderr when events sit in the default partition (see
/// `partitions::default_partition_used`).
async fn warn_if_default_partition_used(pool: &PgPool) -> Result<(), Failure> {
    if partitions::default_partition_used(pool).await? {
        eprintln!(
            "arbiter-session: warning: arbiter.session_events_default holds events (sessions \
             created on a day without a partition); run `arbiter-session partitions ensure` \
             daily, or leave store maintenance on"
        );
    }
    Ok(())
}

async fn inspect(pool: &PgPool, id: Uuid, format: OutputFormat) -> Result<(), Failure> {
    warn_if_default_partition_used(pool).await?;
    let session = report::session(pool, id).await?;
    let events = report::session_events(pool, id).await?;
    if session.is_none() && events.is_empty() {
        return Err(Failure(format!("session {id} not found")));
    }
    match format {
        OutputFormat::Json => {
            let both = serde_json::json!({ "session": session, "events": events });
            println!("{}", serde_json::to_string_pretty(&both)?);
        }
        OutputFormat::Table | OutputFormat::Csv => {
            match &session {
                Some(session) if matches!(format, OutputFormat::Table) => {
                    print!("{}", session.render_fields());
                    println!();
                }
                Some(_) => {}
                None => eprintln!("session {id}: the row was purged; its events remain"),
            }
            print!("{}", report::render(&events, format.into())?);
        }
    }
    Ok(())
}

fn print_checkpoint_verdict(verdict: &CheckpointVerdict) -> ExitCode {
    for link in &verdict.broken {
        println!("BROKEN {link}");
    }
    for chain in &verdict.rewritten {
        println!("REWRITTEN {chain}");
    }
    for trail in &verdict.vanished {
        println!("VANISHED {trail}");
    }
    let taken = verdict
        .taken_at
        .map(|at| at.to_rfc3339())
        .unwrap_or_default();
    if verdict.is_intact() {
        println!(
            "ok: {} sessions of the checkpoint of {taken} still pass through their recorded heads; \
             {} purged since",
            verdict.kept, verdict.gone
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "TAMPERED: {} chains rewritten since the checkpoint of {taken}, {} broken, {} \
             vanished; {} purged since",
            verdict.rewritten.len(),
            verdict.broken.len(),
            verdict.vanished.len(),
            verdict.gone
        );
        ExitCode::from(EXIT_TAMPERED)
    }
}

fn print_session_verdict(verdict: &SessionChain) -> ExitCode {
    match (&verdict.broken, verdict.head) {
        (Some(link), _) => {
            println!("BROKEN {link}");
            ExitCode::from(EXIT_TAMPERED)
        }
        (None, Some(head)) => {
            let denials = match verdict.denial_head {
                Some(denial_head) => {
                    format!("; {} chained denials, head {denial_head}", verdict.denials)
                }
                None => String::new(),
            };
            println!(
                "ok: session {} has {} chained events; head {head}{denials}",
                verdict.session_id, verdict.events
            );
            ExitCode::SUCCESS
        }
        (None, None) => {
            println!("ok: session {} has no chained events", verdict.session_id);
            ExitCode::SUCCESS
        }
    }
}

fn print_summary(summary: &ChainSummary) -> ExitCode {
    for link in &summary.broken {
        println!("BROKEN {link}");
    }
    if summary.is_intact() {
        println!(
            "ok: {} sessions, {} chained events, {} chained denials, every chain intact",
            summary.sessions, summary.events, summary.denials
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{} of {} sessions have a broken audit chain ({} chained events, {} chained denials checked)",
            summary.broken.len(),
            summary.sessions,
            summary.events,
            summary.denials
        );
        ExitCode::from(EXIT_TAMPERED)
    }
}
