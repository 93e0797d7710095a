//! Opening a transaction that a cancelled caller cannot leave open.
//!
//! # Invariant: no pooled connection is ever inside a transaction nobody owns
//! Every transaction of this crate starts with [`begin`], never with `Pool::begin` (clippy's
//! `disallowed-methods` enforces it). sqlx 0.9.0 counts a transaction only once PostgreSQL
//! has answered `BEGIN`: a future dropped while that answer is in flight queues no
//! `ROLLBACK`, and the connection goes back to the pool inside the transaction
//! (transact-rs/sqlx#4393, fixed upstream after 0.9.0). Every later statement on it runs in
//! that transaction: a write is acknowledged yet invisible to every other process, holds its
//! row locks, and is lost when the connection closes. For this crate that would be a call
//! counted by one gateway and not by the others, and a budget overspent after a restart.
//! Futures here are dropped in flight routinely: a gateway's client goes away, a caller's
//! `storage_timeout` passes, `shutdown` cancels an upkeep run
//! (`tests/regressions.rs`, defect 7).

use sqlx::{PgPool, Postgres, Transaction};

use crate::error::StorageError;

/// Begins a transaction on a connection of `pool`.
///
/// The `BEGIN` runs on a task of its own, which a cancelled caller does not stop: if the
/// caller is gone when the transaction has opened, the task drops it, which queues the
/// `ROLLBACK` that the pool sends before the connection is handed out again. Once `begin`
/// has returned, sqlx's own guard covers a cancellation: the transaction is counted, and
/// dropping it rolls it back. The task adds a spawn to each transaction; it was not
/// measured apart from the round trip it waits for.
///
/// # Errors
/// The pool's or the server's error; an I/O error if the runtime shut down meanwhile.
pub(crate) async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let pool = pool.clone();
    #[expect(
        clippy::disallowed_methods,
        reason = "the one place that may call it: on a task no caller cancels"
    )]
    let opening = tokio::spawn(async move { pool.begin().await });
    match opening.await {
        Ok(begun) => begun,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "the runtime shut down while a transaction was being opened",
        ))),
    }
}

/// A transaction whose statements may take minutes: a day of a busy trail takes seconds to
/// count or purge, more than a gateway's pool allows one statement (`PgStorage::connect`
/// sets 5 s).
pub(crate) async fn unhurried(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, StorageError> {
    let mut tx = begin(pool).await?;
    sqlx::query_scalar!("SELECT set_config('statement_timeout', '10min', true)")
        .fetch_one(&mut *tx)
        .await?;
    Ok(tx)
}
