//! `arbiter-session checkpoint`: every chain verified, and their heads written down.

use std::path::PathBuf;
use std::process::ExitCode;

use arbiter_session::operator::checkpoint;
use sqlx::PgPool;

use crate::shell::{EXIT_TAMPERED, Failure};

/// Options of `arbiter-session checkpoint`.
#[derive(Debug, clap::Args)]
pub(crate) struct CheckpointArgs {
    /// Append to this file instead of printing.
    #[arg(long, value_name = "FILE")]
    append: Option<PathBuf>,
}

/// Writes the checkpoint to stdout, or appends it to the file and syncs it; exits with
/// [`EXIT_TAMPERED`] when a chain is broken.
pub(crate) async fn run(pool: &PgPool, args: CheckpointArgs) -> Result<ExitCode, Failure> {
    let summary = match &args.append {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| Failure(format!("cannot open {}: {err}", path.display())))?;
            let mut out = std::io::BufWriter::new(file);
            let summary = checkpoint::write_checkpoint(pool, &mut out).await?;
            out.into_inner()
                .map_err(|err| Failure(err.to_string()))?
                .sync_all()?;
            summary
        }
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            checkpoint::write_checkpoint(pool, &mut out).await?
        }
    };
    for link in &summary.broken {
        eprintln!("BROKEN {link}");
    }
    if let Some(path) = &args.append {
        println!(
            "checkpoint of {} sessions ({} chained events, {} chained denials) appended to {}",
            summary.sessions,
            summary.events,
            summary.denials,
            path.display()
        );
    }
    if summary.broken.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(EXIT_TAMPERED))
    }
}
