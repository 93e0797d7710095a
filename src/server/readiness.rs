//! `/readyz`'s answer: whether PostgreSQL answers and the schema is current.
//!
//! # Invariant: anyone may ask, PostgreSQL is asked at most once at a time
//! `/readyz` needs no token, so any client can send as many as it likes. Each answer comes
//! from a check at most [`FRESH_FOR`] old; a request that finds none waits for the one
//! check in flight (or starts it), so a flood of `/readyz` costs at most one pool
//! connection, never the connections that calls need.

use std::sync::Mutex;
use std::time::Duration;

use crate::PgStorage;
use tokio::time::Instant;

/// How long a check's result answers `/readyz`.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// The service's readiness, as last checked.
#[derive(Debug)]
pub(crate) struct Readiness {
    last: Mutex<Option<(Instant, Ready)>>,
    /// Held by the one check in flight.
    checking: tokio::sync::Mutex<()>,
    /// What a check allows PostgreSQL to answer in.
    timeout: Duration,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    Yes,
    SchemaNotCurrent,
    Unavailable,
    TimedOut,
}

impl Ready {
    /// The `status` of `/readyz`'s body.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Ready::Yes => "ok",
            Ready::SchemaNotCurrent => "schema not current: run arbiter-session migrate",
            Ready::Unavailable => "postgresql unavailable",
            Ready::TimedOut => "postgresql did not answer in time",
        }
    }
}

impl Readiness {
    pub(crate) fn new(timeout: Duration) -> Self {
        Readiness {
            last: Mutex::new(None),
            checking: tokio::sync::Mutex::new(()),
            timeout,
        }
    }

    /// The readiness of `storage`, from a check at most [`FRESH_FOR`] old.
    pub(crate) async fn check(&self, storage: &PgStorage) -> Ready {
        if let Some(ready) = self.fresh() {
            return ready;
        }
        // Async cancellation safety: a dropped waiter leaves the lock to the next one; a
        // dropped checker leaves no result, and the next request checks again.
        let _checking = self.checking.lock().await;
        if let Some(ready) = self.fresh() {
            return ready;
        }
        let ready = match tokio::time::timeout(self.timeout, storage.schema_is_current()).await {
            Ok(Ok(true)) => Ready::Yes,
            Ok(Ok(false)) => Ready::SchemaNotCurrent,
            Ok(Err(_)) => Ready::Unavailable,
            Err(_) => Ready::TimedOut,
        };
        *self.last() = Some((Instant::now(), ready));
        ready
    }

    fn fresh(&self) -> Option<Ready> {
        self.last()
            .filter(|(at, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, ready)| ready)
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Ready)>> {
        // Nothing panics under this lock: a poisoned value is still whole.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
