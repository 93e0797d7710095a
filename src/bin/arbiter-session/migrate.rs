//! `arbiter-session migrate`: the library's migrations.

use sqlx::PgPool;

use crate::shell::Failure;

/// Applies the migrations (safe from several processes at once) and says how many there are.
pub(crate) async fn run(pool: &PgPool) -> Result<(), Failure> {
    arbiter_session::migrate(pool).await?;
    let applied = arbiter_session::MIGRATOR.iter().count();
    println!("schema arbiter is up to date ({applied} migrations)");
    Ok(())
}
