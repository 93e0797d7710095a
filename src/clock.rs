//! Time, injected: every decision reads the store's [`Clock`], so tests move time without
//! sleeping and the cache never keeps a second notion of time (moka's TTL only reclaims
//! memory; it never decides whether a session is expired). Tests use the `testing`
//! feature's `ManualClock`.

use std::fmt::Debug;

use chrono::{DateTime, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}
