//! The reports and what they read, one module per subject, in one test binary:
//! * `views`: the reporting views on a known data set (exact rows), the indexes that keep
//!   one session and one agent's day off a sequential scan, the reports as rendered;
//! * `retention`: what a purge deletes, and that nothing else deletes from the trail;
//! * `rollups`: the rollups behind the views, exact against the raw events through late
//!   events, purges and concurrent writers, today's rollup and each session's totals.

#[path = "../common/mod.rs"]
mod common;
mod retention;
mod rollups;
mod views;
