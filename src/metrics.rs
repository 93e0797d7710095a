//! The store's metrics, through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): a gateway that installs any recorder (Prometheus, StatsD, …) gets them.
//! Every name and label is stated here once; without the feature the store's calls below
//! compile to nothing.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `arbiter_session_decisions_total` | counter | `result` (`allow`, `deny`), `reason` (the denial reason of the audit trail, `not_found`, `storage_read`; empty when allowed) |
//! | `arbiter_session_use_seconds` | histogram | |
//! | `arbiter_session_pending_sessions` | gauge | |
//! | `arbiter_session_cache_entries` | gauge (set by `stats()`) | |
//! | `arbiter_session_write_through_failures_total` | counter | |
//! | `arbiter_session_conflicts_total` | counter | |
//! | `arbiter_session_reconciled_total` | counter | |
//! | `arbiter_session_denials_recorded_total` | counter | |
//! | `arbiter_session_denials_dropped_total` | counter | |
//! | `arbiter_session_listener_connected` | gauge (0 or 1) | |
//! | `arbiter_session_share_grants_total` | counter | |
//! | `arbiter_session_budget_units_total` | counter | `budget_id` (the budget a session draws on: as many series as the operator made budgets) |

use crate::error::SessionError;

/// Calls decided, by result and reason.
#[cfg(feature = "metrics")]
pub const DECISIONS: &str = "arbiter_session_decisions_total";
/// Time `use_session` and `use_session_batch` took, in seconds.
#[cfg(feature = "metrics")]
pub const USE_SECONDS: &str = "arbiter_session_use_seconds";
/// Sessions whose cached state is ahead of storage.
#[cfg(feature = "metrics")]
pub const PENDING: &str = "arbiter_session_pending_sessions";
/// Sessions in the cache, as of the last `stats()`.
#[cfg(feature = "metrics")]
pub const CACHE_ENTRIES: &str = "arbiter_session_cache_entries";
/// Writes that failed and left the cache ahead.
#[cfg(feature = "metrics")]
pub const WRITE_FAILURES: &str = "arbiter_session_write_through_failures_total";
/// Versioned writes that found the row changed elsewhere.
#[cfg(feature = "metrics")]
pub const CONFLICTS: &str = "arbiter_session_conflicts_total";
/// Pending sessions the reconciler made durable.
#[cfg(feature = "metrics")]
pub const RECONCILED: &str = "arbiter_session_reconciled_total";
/// Denied calls written to the audit trail.
#[cfg(feature = "metrics")]
pub const DENIALS_RECORDED: &str = "arbiter_session_denials_recorded_total";
/// Denied calls not recorded (buffer full, or refused by storage).
#[cfg(feature = "metrics")]
pub const DENIALS_DROPPED: &str = "arbiter_session_denials_dropped_total";
/// Whether the change feed is connected (1) or not (0).
#[cfg(feature = "metrics")]
pub const LISTENER_CONNECTED: &str = "arbiter_session_listener_connected";

/// Grants of shared-budget units this process asked storage for and got.
#[cfg(feature = "metrics")]
pub const SHARE_GRANTS: &str = "arbiter_session_share_grants_total";
/// Units of a shared budget charged by allowed calls whose write landed.
#[cfg(feature = "metrics")]
pub const BUDGET_UNITS: &str = "arbiter_session_budget_units_total";

/// Registers a description and unit for every metric above with the installed recorder.
/// Call once after installing it; metrics work without it.
#[cfg(feature = "metrics")]
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(DECISIONS, "Calls decided, by result and reason");
    describe_histogram!(
        USE_SECONDS,
        Unit::Seconds,
        "Time to answer a use of a session"
    );
    describe_gauge!(PENDING, "Sessions whose cached state is ahead of storage");
    describe_gauge!(CACHE_ENTRIES, "Sessions in the cache");
    describe_counter!(
        WRITE_FAILURES,
        "Writes that failed and left the cache ahead"
    );
    describe_counter!(
        CONFLICTS,
        "Versioned writes that found the row changed elsewhere"
    );
    describe_counter!(
        RECONCILED,
        "Pending sessions made durable by the reconciler"
    );
    describe_counter!(DENIALS_RECORDED, "Denied calls written to the audit trail");
    describe_counter!(DENIALS_DROPPED, "Denied calls not recorded");
    describe_gauge!(LISTENER_CONNECTED, "Whether the change feed is connected");
    describe_counter!(
        SHARE_GRANTS,
        "Grants of shared-budget units to this process"
    );
    describe_counter!(
        BUDGET_UNITS,
        "Units of shared budgets charged by allowed calls, by the budget drawn on"
    );
}

/// Adds `units` to the units charged to `budget`.
pub(crate) fn charged(budget: &crate::budget::BudgetId, units: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!(BUDGET_UNITS, "budget_id" => budget.to_string()).increment(units);
    #[cfg(not(feature = "metrics"))]
    let _ = (budget, units);
}

/// Times one use of a session, from its start to its answer. Empty without the feature.
#[derive(Debug)]
pub(crate) struct UseTimer {
    #[cfg(feature = "metrics")]
    started: std::time::Instant,
}

impl UseTimer {
    pub(crate) fn start() -> Self {
        UseTimer {
            #[cfg(feature = "metrics")]
            started: std::time::Instant::now(),
        }
    }

    /// The use was answered with `result`: counts the decision and records the time.
    pub(crate) fn answered<T>(self, result: &Result<T, SessionError>) {
        #[cfg(feature = "metrics")]
        {
            let (outcome, reason) = match result {
                Ok(_) => ("allow", ""),
                Err(err) => ("deny", reason(err)),
            };
            metrics::counter!(DECISIONS, "result" => outcome, "reason" => reason).increment(1);
            metrics::histogram!(USE_SECONDS).record(self.started.elapsed().as_secs_f64());
        }
        #[cfg(not(feature = "metrics"))]
        let _ = result;
    }
}

/// The label of a denial: the audit trail's reason where it has one, except that a call
/// past a tool's own limit is labelled `budget` (the timer sees the error, not the session
/// that tells the two apart: see `DenialReason::of_call`).
#[cfg(feature = "metrics")]
fn reason(err: &SessionError) -> &'static str {
    match crate::audit::DenialReason::of(err) {
        Some(reason) => reason.as_str(),
        None => match err {
            SessionError::NotFound(_) => "not_found",
            SessionError::StorageRead { .. } => "storage_read",
            _ => "other",
        },
    }
}

/// Which counter [`count`] adds to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    WriteFailures,
    Conflicts,
    Reconciled,
    DenialsRecorded,
    DenialsDropped,
    ShareGrants,
}

/// Adds `n` to `counter`.
pub(crate) fn count(counter: Counter, n: u64) {
    #[cfg(feature = "metrics")]
    {
        let name = match counter {
            Counter::WriteFailures => WRITE_FAILURES,
            Counter::Conflicts => CONFLICTS,
            Counter::Reconciled => RECONCILED,
            Counter::DenialsRecorded => DENIALS_RECORDED,
            Counter::DenialsDropped => DENIALS_DROPPED,
            Counter::ShareGrants => SHARE_GRANTS,
        };
        metrics::counter!(name).increment(n);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (counter, n);
}

/// Which gauge [`set`] sets.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gauge {
    Pending,
    CacheEntries,
    ListenerConnected,
}

/// Sets `gauge` to `value`.
pub(crate) fn set(gauge: Gauge, value: u64) {
    #[cfg(feature = "metrics")]
    {
        let name = match gauge {
            Gauge::Pending => PENDING,
            Gauge::CacheEntries => CACHE_ENTRIES,
            Gauge::ListenerConnected => LISTENER_CONNECTED,
        };
        // Precision is lost only past 2^53 sessions.
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!(name).set(value as f64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (gauge, value);
}
