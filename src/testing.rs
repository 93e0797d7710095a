//! Test doubles, with the `testing` feature: a [`ManualClock`] that moves only when told
//! to, and a [`FaultyStorage`] that fails reads and writes on cue. The crate's own tests
//! use them; a gateway's tests can too, to exercise its handling of `StorageWriteThrough`
//! and expiry without an outage or a sleep.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Duration, SubsecRound as _, Utc};

use crate::clock::Clock;
pub use crate::storage::faulty::FaultyStorage;

/// A clock that only moves when told to, for tests. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// A clock stopped at the current wall-clock time, rounded to microseconds.
    pub fn starting_now() -> Self {
        Self::new(Utc::now().trunc_subsecs(6))
    }

    /// Moves the clock forward (or back, for a negative `by`).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
