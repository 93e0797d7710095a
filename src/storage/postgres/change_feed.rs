//! [`PgChangeFeed`]: LISTEN on the channel that the `sessions_status_notify` trigger
//! notifies, so every store drops sessions whose status another process (or an operator's
//! SQL) changed.
//!
//! NOTIFYs sent while the listening connection is down are lost (PostgreSQL does not queue
//! them for a listener that is gone), so every (re)connection reports [`Change::Reset`]:
//! the store then treats its whole cache as stale.
//!
//! A connection the network dropped without telling either side (half-open) would stay
//! silent forever, looking like a quiet database. So when no notification arrived for a
//! while the feed makes a round trip on the listening connection; one that does not answer
//! in time is treated as lost ([`Change::Disconnected`], then a reconnect and a reset).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::error::error_chain;
use crate::storage::{Change, ChangeFeed};

/// The channel the migrations' trigger notifies, with a session id as payload.
const STATUS_CHANNEL: &str = "arbiter_session_status";

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default of [`PgChangeFeed::check_every`].
pub(crate) const DEFAULT_LISTENER_CHECK: Duration = Duration::from_secs(10);

/// A LISTEN connection taken from (and configured like) a pool, reconnecting with backoff.
#[derive(Debug)]
pub(super) struct PgChangeFeed {
    pool: PgPool,
    listener: Option<PgListener>,
    backoff: Duration,
    check_every: Duration,
}

impl PgChangeFeed {
    /// A feed that will listen with the connection options of `pool`.
    pub fn new(pool: PgPool) -> Self {
        PgChangeFeed {
            pool,
            listener: None,
            backoff: FIRST_BACKOFF,
            check_every: DEFAULT_LISTENER_CHECK,
        }
    }

    /// After this long without a notification, check the connection with a round trip,
    /// which must answer within the same time (default 10 s).
    #[must_use]
    pub fn check_every(mut self, every: Duration) -> Self {
        self.check_every = every;
        self
    }

    async fn next_change(&mut self) -> Change {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match connect(&self.pool).await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        self.backoff = FIRST_BACKOFF;
                        return Change::Reset;
                    }
                    Err(err) => {
                        tracing::warn!(error = %error_chain(&err), retry_in = ?self.backoff, "change feed: cannot listen");
                        tokio::time::sleep(self.backoff).await;
                        self.backoff = std::cmp::min(self.backoff * 2, MAX_BACKOFF);
                        continue;
                    }
                }
            };
            // Cancelling `try_recv` loses at most a notification being read, and this feed's
            // freshness is best effort; a lost connection is reported either way.
            let Ok(received) = tokio::time::timeout(self.check_every, listener.try_recv()).await
            else {
                if is_alive(listener, self.check_every).await {
                    continue;
                }
                tracing::warn!("change feed: listening connection does not answer; reconnecting");
                self.listener = None;
                return Change::Disconnected;
            };
            match received {
                Ok(Some(notification)) => match Uuid::parse_str(notification.payload()) {
                    Ok(id) => return Change::Session(id),
                    Err(_) => tracing::warn!(
                        payload = notification.payload(),
                        "change feed: ignoring a payload that is not a session id"
                    ),
                },
                // The connection dropped; sqlx reconnects at the next call, and whatever was
                // notified in between is gone.
                Ok(None) => {
                    tracing::info!("change feed: connection lost, reconnecting");
                    self.listener = None;
                    return Change::Disconnected;
                }
                Err(err) => {
                    tracing::warn!(error = %error_chain(&err), "change feed: listener failed, reconnecting");
                    self.listener = None;
                    return Change::Disconnected;
                }
            }
        }
    }
}

/// Whether the listening connection answers a round trip within `within`. Notifications
/// that arrive meanwhile are buffered by the listener and returned next.
async fn is_alive(listener: &mut PgListener, within: Duration) -> bool {
    // language=PostgreSQL
    let ping = sqlx::query_scalar!(r#"SELECT 1 AS "alive!""#).fetch_one(&mut *listener);
    matches!(tokio::time::timeout(within, ping).await, Ok(Ok(_)))
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(STATUS_CHANNEL).await?;
    Ok(listener)
}

impl ChangeFeed for PgChangeFeed {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Change> + Send + '_>> {
        Box::pin(self.next_change())
    }
}
