//! The status signals an allowed call answers with: what is left of the session (calls and
//! seconds) and of its shared budget, and a warning when either runs low. They are what
//! the system this project was specified from sent its agents, and what gateways pass on
//! to them: as headers (`x-arbiter-calls-remaining`, `x-arbiter-seconds-remaining`,
//! `x-arbiter-budget-remaining`, `x-arbiter-warning`) and as the same fields of a JSON body.
//!
//! # Invariant: the signals are the service's, never the client's
//! Every header a client sends whose name starts with [`HEADER_PREFIX`] is dropped before
//! an allowed request goes on to the upstream ([`is_arbiter_header`]), and the service sets
//! its own; so an upstream that reads `x-arbiter-*` reads what this service decided.

use chrono::{DateTime, Utc};

use crate::model::TaskSession;

/// The prefix of every header this service reads or sets.
pub const HEADER_PREFIX: &str = "x-arbiter-";
/// Calls left in the session's budget.
pub const CALLS_REMAINING_HEADER: &str = "x-arbiter-calls-remaining";
/// Whole seconds left before the session expires.
pub const SECONDS_REMAINING_HEADER: &str = "x-arbiter-seconds-remaining";
/// Units left in the session's shared budget (the level of its chain with least left).
pub const BUDGET_REMAINING_HEADER: &str = "x-arbiter-budget-remaining";
/// `budget_low` and/or `time_low`, comma-separated; absent when neither runs low.
pub const WARNING_HEADER: &str = "x-arbiter-warning";

/// Whether a header name (any case) is one of this service's, which a client may not pass
/// on to an upstream.
pub fn is_arbiter_header(name: &str) -> bool {
    name.len() >= HEADER_PREFIX.len()
        && name.as_bytes()[..HEADER_PREFIX.len()].eq_ignore_ascii_case(HEADER_PREFIX.as_bytes())
}

/// What runs low.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Warning {
    /// Under a tenth of the session's calls are left, or of its shared budget's units.
    BudgetLow,
    /// Under a tenth of the session's time is left.
    TimeLow,
}

impl Warning {
    /// `budget_low` or `time_low`: the value of [`WARNING_HEADER`].
    pub fn as_str(self) -> &'static str {
        match self {
            Warning::BudgetLow => "budget_low",
            Warning::TimeLow => "time_low",
        }
    }
}

/// What is left of a shared budget, as far as a call's answer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLeft {
    /// Units left at the level of the budget's chain with the least left.
    pub remaining: u64,
    /// That level's limit for its period.
    pub limit: u64,
}

/// The signals of one allowed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Calls left in the session's budget.
    pub calls_remaining: u64,
    /// Whole seconds before the session expires (0 once it has).
    pub seconds_remaining: u64,
    /// What is left of the session's shared budget; `None` without one, or when it could
    /// not be read.
    pub budget: Option<BudgetLeft>,
    /// [`Warning::BudgetLow`] when the calls left (or the shared budget's units left) are
    /// under a tenth of their total, [`Warning::TimeLow`] when the seconds left are; in
    /// that order.
    pub warnings: Vec<Warning>,
}

impl Status {
    /// The signals of `session` as of `now`, with what is left of its shared budget.
    pub fn of(session: &TaskSession, now: DateTime<Utc>, budget: Option<BudgetLeft>) -> Self {
        let seconds_remaining =
            u64::try_from((session.expires_at - now).num_seconds()).unwrap_or(0);
        let time_limit = u64::try_from(session.time_limit.num_seconds()).unwrap_or(0);
        let calls_remaining = session.calls_remaining();
        let mut warnings = Vec::new();
        if is_low(calls_remaining, session.call_budget)
            || budget.is_some_and(|b| is_low(b.remaining, b.limit))
        {
            warnings.push(Warning::BudgetLow);
        }
        if is_low(seconds_remaining, time_limit) {
            warnings.push(Warning::TimeLow);
        }
        Status {
            calls_remaining,
            seconds_remaining,
            budget,
            warnings,
        }
    }

    /// The headers that carry these signals, as (name, value) pairs.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (CALLS_REMAINING_HEADER, self.calls_remaining.to_string()),
            (SECONDS_REMAINING_HEADER, self.seconds_remaining.to_string()),
        ];
        if let Some(budget) = self.budget {
            headers.push((BUDGET_REMAINING_HEADER, budget.remaining.to_string()));
        }
        if !self.warnings.is_empty() {
            let names: Vec<&str> = self.warnings.iter().map(|w| w.as_str()).collect();
            headers.push((WARNING_HEADER, names.join(",")));
        }
        headers
    }
}

/// Whether `left` is under a tenth of `total` (never, for a total of 0: nothing to run
/// low on).
fn is_low(left: u64, total: u64) -> bool {
    total > 0 && u128::from(left) * 10 < u128::from(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateSessionRequest;
    use chrono::SubsecRound as _;
    use uuid::Uuid;

    fn session(budget: u64, made: u64, secs: i64) -> TaskSession {
        let req = CreateSessionRequest::new(
            Uuid::new_v4(),
            vec!["search".to_owned()],
            budget,
            chrono::Duration::seconds(secs),
        );
        let now = Utc::now().trunc_subsecs(0);
        let mut session = TaskSession::from_request(Uuid::new_v4(), &req, now);
        session.calls_made = made;
        session
    }

    #[test]
    fn a_tenth_left_is_not_low_and_less_is() {
        let s = session(100, 90, 1000);
        let start = s.created_at;
        let status = Status::of(&s, start, None);
        assert_eq!(
            (status.calls_remaining, status.seconds_remaining),
            (10, 1000)
        );
        assert!(status.warnings.is_empty());
        let low = Status::of(&session(100, 91, 1000), start, None);
        assert_eq!(low.warnings, vec![Warning::BudgetLow]);
        let late = Status::of(&s, start + chrono::Duration::milliseconds(900_500), None);
        assert_eq!(late.seconds_remaining, 99);
        assert_eq!(late.warnings, vec![Warning::TimeLow]);
        let both = Status::of(
            &session(100, 95, 1000),
            start + chrono::Duration::hours(1),
            None,
        );
        assert_eq!(both.seconds_remaining, 0);
        assert_eq!(both.warnings, vec![Warning::BudgetLow, Warning::TimeLow]);
        assert_eq!(
            both.headers().last(),
            Some(&(WARNING_HEADER, "budget_low,time_low".to_owned()))
        );
    }

    #[test]
    fn a_low_shared_budget_warns_and_is_a_header() {
        let s = session(100, 0, 1000);
        let left = BudgetLeft {
            remaining: 49,
            limit: 500,
        };
        let status = Status::of(&s, s.created_at, Some(left));
        assert_eq!(status.warnings, vec![Warning::BudgetLow]);
        assert_eq!(
            status.headers(),
            vec![
                (CALLS_REMAINING_HEADER, "100".to_owned()),
                (SECONDS_REMAINING_HEADER, "1000".to_owned()),
                (BUDGET_REMAINING_HEADER, "49".to_owned()),
                (WARNING_HEADER, "budget_low".to_owned()),
            ]
        );
    }

    #[test]
    fn arbiter_headers_are_known_in_any_case() {
        assert!(is_arbiter_header("X-Arbiter-Calls-Remaining"));
        assert!(is_arbiter_header("x-arbiter-"));
        assert!(!is_arbiter_header("x-arbiter"));
        assert!(!is_arbiter_header("authorization"));
    }
}
