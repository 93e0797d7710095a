//! `arbiter-session verify`: the audit hash chains, of one session or of all, and against a
//! checkpoint; with all of them, the shared budgets' charges against the trail
//! (`operator::budgets`).

use std::path::PathBuf;
use std::process::ExitCode;

use arbiter_session::operator::budgets::{self, ChargeSummary};
use arbiter_session::operator::chain::{self, ChainSummary, SessionChain};
use arbiter_session::operator::checkpoint::{self, CheckpointVerdict};
use sqlx::PgPool;
use uuid::Uuid;

use crate::shell::{EXIT_TAMPERED, Failure};

/// Options of `arbiter-session verify`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// Only this session (prints its head hash, to keep elsewhere).
    #[arg(long, conflicts_with = "against")]
    session: Option<Uuid>,
    /// Also prove that no chain recorded by the newest checkpoint in FILE (written by
    /// `checkpoint`) was rewritten or cut short since.
    #[arg(long, value_name = "FILE")]
    against: Option<PathBuf>,
}

/// Verifies, prints the verdict, and exits with [`EXIT_TAMPERED`] on a broken, rewritten or
/// vanished chain.
pub(crate) async fn run(pool: &PgPool, args: VerifyArgs) -> Result<ExitCode, Failure> {
    match args {
        VerifyArgs {
            session: Some(id), ..
        } => Ok(print_session_verdict(
            &chain::verify_audit_chain(pool, id).await?,
        )),
        VerifyArgs {
            session: None,
            against: Some(path),
        } => {
            let file = std::fs::File::open(&path)
                .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
            let verdict = checkpoint::verify_against(pool, std::io::BufReader::new(file)).await?;
            Ok(print_checkpoint_verdict(&verdict))
        }
        VerifyArgs {
            session: None,
            against: None,
        } => {
            let chains = print_summary(&chain::verify_all_audit_chains(pool).await?);
            let charges = print_charges(&budgets::verify_charges(pool).await?);
            Ok(if chains == ExitCode::SUCCESS {
                charges
            } else {
                chains
            })
        }
    }
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

/// The shared budgets' line, printed only where budgets were used.
fn print_charges(summary: &ChargeSummary) -> ExitCode {
    for mismatch in &summary.mismatched {
        println!("MISMATCH {mismatch}");
    }
    if summary.is_exact() {
        if summary.shares > 0 {
            println!(
                "ok: {} shares of shared budgets, {} units used, each the sum of its events' costs",
                summary.shares, summary.units
            );
        }
        ExitCode::SUCCESS
    } else {
        println!(
            "{} shares of shared budgets do not match the costs of their events",
            summary.mismatched.len()
        );
        ExitCode::from(EXIT_TAMPERED)
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
