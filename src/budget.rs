//! Budgets shared by many sessions: their ids and terms ([`BudgetId`], [`BudgetTerms`]),
//! and a budget with its current period's usage ([`BudgetUsage`]).
//!
//! A budget allows `limit` units (of its `unit`: calls, tokens, micro-dollars, …) per
//! period: `none` (one period that never ends), `day` or `month`, each starting at local
//! midnight in the budget's `time_zone`. A budget may have a parent, and a charge to a
//! budget is a charge to each of its ancestors; the parents form a tree at most
//! [`MAX_DEPTH`] levels deep. Budgets are kept in PostgreSQL with their usage per period, so
//! past periods stay reportable; they are never deleted, and their period and time zone
//! never change (a budget's past periods are the ones its usage was counted in).
//!
//! The store creates, replaces and reads them ([`SessionStore::put_budget`](crate::SessionStore::put_budget),
//! [`SessionStore::budget`](crate::SessionStore::budget),
//! [`SessionStore::budgets`](crate::SessionStore::budgets)). The accounting of the units
//! (escrow: each process holds a share of what is left, and spends it on its own) and its
//! invariants are in the schema, migration `20261206000005_shared_budgets.sql`, and in
//! `docs/architecture.md`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::SessionError;

/// Most levels a budget tree may have (a budget, its parent, …, its root).
pub const MAX_DEPTH: usize = 8;

/// Most characters of a budget id.
pub const MAX_ID_LEN: usize = 128;

/// Most characters of a unit label.
pub const MAX_UNIT_LEN: usize = 32;

/// Most characters of a time zone name.
const MAX_TIME_ZONE_LEN: usize = 64;

/// A budget's id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9._:/-]`, chosen by the
/// operator (`acme`, `acme/payments`, `agent:7f…`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BudgetId(String);

impl BudgetId {
    /// `id` if it is a valid budget id.
    ///
    /// # Errors
    /// [`SessionError::InvalidRequest`] if it is empty, too long, or has a character
    /// outside the alphabet.
    pub fn new(id: impl Into<String>) -> Result<Self, SessionError> {
        let id = id.into();
        let valid = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:/-".contains(&b));
        if valid {
            Ok(BudgetId(id))
        } else {
            Err(invalid(format!(
                "a budget id is 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', ':', '/' and '-'"
            )))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BudgetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BudgetId {
    type Err = SessionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BudgetId::new(s)
    }
}

impl AsRef<str> for BudgetId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How often a budget's units come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// One period that never ends: the limit is for all time.
    #[default]
    None,
    /// Each day, from local midnight in the budget's time zone.
    Day,
    /// Each month, from local midnight of its first day in the budget's time zone.
    Month,
}

impl Period {
    /// `none`, `day` or `month`: its name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::None => "none",
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

impl FromStr for Period {
    type Err = SessionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Period::None),
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            _ => Err(invalid("period must be none, day or month")),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a budget allows. Start from [`BudgetTerms::new`] and set the fields that differ
/// from the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetTerms {
    /// Units allowed per period (at most `i64::MAX`).
    pub limit: u64,
    /// The period (default [`Period::None`]).
    pub period: Period,
    /// The budget charged with this one's charges too, if any.
    pub parent_id: Option<BudgetId>,
    /// What a unit is, for people: 1 to [`MAX_UNIT_LEN`] characters of
    /// `[A-Za-z0-9_.:/-]` (default `calls`).
    pub unit: String,
    /// The IANA time zone whose midnight starts a day or a month (default `UTC`); the
    /// database checks that it knows it.
    pub time_zone: String,
}

impl BudgetTerms {
    /// `limit` units for all time, counted in calls, in UTC, without a parent.
    pub fn new(limit: u64) -> Self {
        BudgetTerms {
            limit,
            period: Period::None,
            parent_id: None,
            unit: "calls".to_owned(),
            time_zone: "UTC".to_owned(),
        }
    }

    /// Checks what can be checked without the database (it checks the time zone, the
    /// parent's existence, cycles and depth).
    pub(crate) fn validate(&self, id: &BudgetId) -> Result<(), SessionError> {
        if i64::try_from(self.limit).is_err() {
            return Err(invalid("limit is out of range"));
        }
        if self.parent_id.as_ref() == Some(id) {
            return Err(invalid("a budget cannot be its own parent"));
        }
        let unit_ok = !self.unit.is_empty()
            && self.unit.len() <= MAX_UNIT_LEN
            && self
                .unit
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b));
        if !unit_ok {
            return Err(invalid(format!(
                "unit is 1 to {MAX_UNIT_LEN} characters of A-Z, a-z, 0-9, '_', '.', ':', '/' and '-'"
            )));
        }
        let zone_ok = !self.time_zone.is_empty()
            && self.time_zone.len() <= MAX_TIME_ZONE_LEN
            && self
                .time_zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+-/".contains(&b));
        if !zone_ok {
            return Err(invalid("time_zone is not an IANA time zone name"));
        }
        Ok(())
    }
}

/// What [`SessionStore::put_budget`](crate::SessionStore::put_budget) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetWrite {
    /// The budget did not exist; it does now.
    Created,
    /// The budget existed; its terms are replaced.
    Replaced,
}

/// A budget, its terms and its current period's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetUsage {
    /// The budget.
    pub budget_id: BudgetId,
    /// Its terms.
    pub terms: BudgetTerms,
    /// When the current period started (the epoch for [`Period::None`]).
    pub period_start: DateTime<Utc>,
    /// When it ends; `None` for [`Period::None`].
    pub period_end: Option<DateTime<Utc>>,
    /// Units spent in the current period, by the sessions drawing on this budget and on
    /// every budget below it: allowed calls' costs, and settled or lapsed reservations'
    /// actual costs.
    pub used: u64,
    /// Units held by reservations not yet settled (their estimates).
    pub reserved: u64,
    /// Units of [`Self::used`] that settlements charged above their estimates: they may
    /// take the budget past its limit.
    pub overrun: u64,
}

impl BudgetUsage {
    /// Units still to spend in the current period: `limit - used - reserved`, or 0.
    pub fn remaining(&self) -> u64 {
        self.terms
            .limit
            .saturating_sub(self.used)
            .saturating_sub(self.reserved)
    }
}

/// Why the schema refused a budget's terms, from the name of the check that did.
pub(crate) fn refused_terms(constraint: &str) -> &'static str {
    match constraint {
        "budgets_acyclic" => "parent_id would make a cycle of budgets",
        "budgets_depth" => "a budget tree has at most 8 levels",
        "budgets_time_zone_known" => "time_zone is not a time zone the database knows",
        "budgets_period_fixed" => "the period and time_zone of a budget cannot change",
        "budgets_parent_id_fkey" => "parent_id names no budget",
        _ => "the budget's terms are out of bounds",
    }
}

fn invalid(reason: impl Into<String>) -> SessionError {
    SessionError::InvalidRequest {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_id_is_one_to_128_characters_of_its_alphabet() {
        for good in [
            "acme",
            "acme/payments",
            "agent:7f.x-1",
            &"a".repeat(MAX_ID_LEN),
        ] {
            assert_eq!(BudgetId::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "a b",
            "a_b",
            "é",
            "a\0",
            "a\n",
            &"a".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(BudgetId::new(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn terms_refuse_what_the_database_would() {
        let id = BudgetId::new("acme").unwrap();
        assert!(BudgetTerms::new(5).validate(&id).is_ok());
        let mut terms = BudgetTerms::new(u64::MAX);
        assert!(terms.validate(&id).is_err());
        terms.limit = 1;
        terms.parent_id = Some(id.clone());
        assert!(terms.validate(&id).is_err());
        terms.parent_id = None;
        for unit in ["", "a b", &"u".repeat(MAX_UNIT_LEN + 1)] {
            terms.unit = unit.to_owned();
            assert!(terms.validate(&id).is_err(), "unit {unit:?} was accepted");
        }
        terms.unit = "usd_micros".to_owned();
        for zone in ["", "Europe/Paris; DROP", "a b"] {
            terms.time_zone = zone.to_owned();
            assert!(terms.validate(&id).is_err(), "zone {zone:?} was accepted");
        }
        terms.time_zone = "America/Argentina/Buenos_Aires".to_owned();
        assert!(terms.validate(&id).is_ok());
    }

    #[test]
    fn usage_remaining_never_goes_below_zero() {
        let usage = BudgetUsage {
            budget_id: BudgetId::new("b").unwrap(),
            terms: BudgetTerms::new(10),
            period_start: DateTime::UNIX_EPOCH,
            period_end: None,
            used: 8,
            reserved: 5,
            overrun: 0,
        };
        assert_eq!(usage.remaining(), 0);
    }
}
