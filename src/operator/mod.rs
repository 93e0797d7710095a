//! The operator's side: what people run beside the gateways, against the same database.
//! [`chain`] verifies the audit trail's hash chain, [`budgets`] checks the shared budgets'
//! accounting against it, [`checkpoint`] keeps its heads outside
//! the database and proves later that no chain was rewritten, [`retention`] purges what has
//! ended, [`export`] streams the trail out as JSON Lines or CSV,
//! [`partitions`] keeps the audit trail's daily partitions, [`rollup`] keeps the daily
//! aggregates the reports read, and [`report`] reads the reporting views. The
//! `arbiter-session` command-line tool (the `cli` feature) is a thin shell over this module.

pub(crate) use crate::storage::unhurried;

pub mod budgets;
pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod partitions;
pub mod report;
pub mod retention;
pub mod rollup;
