//! Tamper evidence: verifying the SHA-256 hash chains of the audit trail.
//!
//! # Invariant: every event is a link of one of its session's two chains
//! Within one session, the state-changing events (every kind but `denied`) form one chain
//! and the denials another, each in `event_id` order: each event stores `prev_hash` (its
//! predecessor's `hash` in its chain, 32 zero bytes for the first) and
//! `hash = SHA-256(prev_hash || canonical encoding)`. PostgreSQL computes the links as the
//! rows are inserted (`arbiter.audit_link_hash`, migrations `20261124000004_audit_chain.sql`
//! and `20261201000002_denial_chain.sql` define the encoding); this module recomputes them
//! with an independent implementation, so an edit made with the append-only trigger
//! disabled shows up as the first link that does not verify. Retention removes a session's
//! events whole, so every chain starts at the genesis hash.
//!
//! What a chain cannot prove on its own: someone who can rewrite the table can also rewrite
//! every later hash, or drop the newest events. A checkpoint
//! ([`crate::operator::checkpoint`]) keeps every head outside the database, and a chain
//! that still passes through its recorded head was not edited up to it.

use std::fmt;

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::StorageError;

/// A SHA-256 digest: one link of the chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The `prev_hash` of a session's first event.
    pub const GENESIS: Digest = Digest([0; 32]);

    fn from_stored(bytes: Option<&[u8]>) -> Option<Digest> {
        bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()).map(Digest)
    }
}

impl fmt::Display for Digest {
    /// Lower-case hex, as PostgreSQL's `encode(hash, 'hex')` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// What is wrong with the first link that does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkProblem {
    /// `prev_hash` is not the previous event's hash: an event before this one was removed,
    /// inserted or reordered.
    PredecessorMismatch,
    /// `hash` does not match the row's content: this row was edited.
    ContentMismatch,
    /// A state-changing event without a 32-byte `prev_hash` and `hash`.
    MissingHash,
}

impl LinkProblem {
    /// A short description for operators.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkProblem::PredecessorMismatch => {
                "prev_hash does not match the previous event (an earlier event was removed, added or reordered)"
            }
            LinkProblem::ContentMismatch => "hash does not match the row (this event was edited)",
            LinkProblem::MissingHash => "the event has no valid hash",
        }
    }
}

impl fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first link of a session's chain that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokenLink {
    /// The session.
    pub session_id: Uuid,
    /// The event (`session_events.event_id`).
    pub event_id: i64,
    /// Its kind, as stored.
    pub kind: String,
    /// What is wrong.
    pub problem: LinkProblem,
}

impl fmt::Display for BrokenLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "session {} event {} ({}): {}",
            self.session_id, self.event_id, self.kind, self.problem
        )
    }
}

/// The verdict on one session's chains.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionChain {
    /// The session.
    pub session_id: Uuid,
    /// State-changing events checked (up to and including a broken one).
    pub events: u64,
    /// The hash of the newest state-changing event, when both chains verify; `None` when
    /// it has no such events or a chain is broken.
    pub head: Option<Digest>,
    /// Denials checked (up to and including a broken one).
    pub denials: u64,
    /// The hash of the newest denial, when both chains verify; `None` when it has no
    /// denials or a chain is broken.
    pub denial_head: Option<Digest>,
    /// The first link that does not verify.
    pub broken: Option<BrokenLink>,
}

impl SessionChain {
    /// Whether every link verified.
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// The verdict on every chain in the database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainSummary {
    /// Sessions with at least one state-changing event.
    pub sessions: u64,
    /// State-changing events checked.
    pub events: u64,
    /// Denials checked.
    pub denials: u64,
    /// The first broken link of each broken session, in session id order.
    pub broken: Vec<BrokenLink>,
}

impl ChainSummary {
    /// Whether every chain verified.
    pub fn is_intact(&self) -> bool {
        self.broken.is_empty()
    }
}

/// One chained row, as read for verification.
#[derive(Clone)]
struct ChainRow {
    event_id: i64,
    event_key: Uuid,
    session_id: Uuid,
    agent_id: Uuid,
    kind: String,
    tools: Vec<Option<String>>,
    calls_made: i64,
    rate_window_calls: i64,
    status: String,
    session_version: Option<i64>,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    instance_id: Uuid,
    reason: Option<String>,
    limited_tools: Option<Vec<Option<String>>>,
    tool_calls: Option<Vec<Option<i64>>>,
    presented_agent_id: Option<Uuid>,
    tool_count: Option<i32>,
    cost: Option<i64>,
    share_id: Option<Uuid>,
    budget_id: Option<String>,
    prev_hash: Option<Vec<u8>>,
    hash: Option<Vec<u8>>,
}

impl ChainRow {
    fn is_denial(&self) -> bool {
        self.kind == "denied"
    }
}

/// The canonical encoding, version 1 (see the migration): fixed-width big-endian integers,
/// length-prefixed UTF-8 text, so that no two different rows encode alike.
fn link_hash(prev: Digest, row: &ChainRow) -> Digest {
    fn text(hasher: &mut Sha256, value: Option<&str>) {
        match value {
            // Lengths past i32::MAX cannot come out of PostgreSQL (1 GB field limit).
            Some(value) => {
                let len = i32::try_from(value.len()).unwrap_or(i32::MAX);
                hasher.update(len.to_be_bytes());
                hasher.update(value.as_bytes());
            }
            None => hasher.update((-1_i32).to_be_bytes()),
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(prev.0);
    hasher.update(row.event_key.as_bytes());
    hasher.update(row.session_id.as_bytes());
    hasher.update(row.agent_id.as_bytes());
    text(&mut hasher, Some(&row.kind));
    let count = i32::try_from(row.tools.len()).unwrap_or(i32::MAX);
    hasher.update(count.to_be_bytes());
    for tool in &row.tools {
        text(&mut hasher, tool.as_deref());
    }
    hasher.update(row.calls_made.to_be_bytes());
    hasher.update(row.rate_window_calls.to_be_bytes());
    text(&mut hasher, Some(&row.status));
    // A state-changing event always has a version (a CHECK constraint), a denial never:
    // its link encodes -1, and so does a state event edited to lose it, which then fails.
    hasher.update(row.session_version.unwrap_or(-1).to_be_bytes());
    hasher.update(row.occurred_at.timestamp_micros().to_be_bytes());
    hasher.update(row.recorded_at.timestamp_micros().to_be_bytes());
    hasher.update(row.instance_id.as_bytes());
    // A denial's link ends with its reason (migration 20261201000002).
    if row.is_denial() {
        text(&mut hasher, row.reason.as_deref());
    }
    // Then, if the event counted limited tools, each one's calls after it (migration
    // 20261201000006); an event without them encodes as before.
    if let Some(tools) = &row.limited_tools {
        let count = i32::try_from(tools.len()).unwrap_or(i32::MAX);
        hasher.update(count.to_be_bytes());
        let calls = row.tool_calls.as_deref().unwrap_or_default();
        for (at, tool) in tools.iter().enumerate() {
            text(&mut hasher, tool.as_deref());
            // A CHECK keeps both arrays alike; a row edited past it encodes a missing
            // count as -1, which no stored count is, and so fails.
            let calls = calls.get(at).copied().flatten().unwrap_or(-1);
            hasher.update(calls.to_be_bytes());
        }
    }
    // Then, if a denial recorded them, a tag no count of limited tools starts with, the
    // presenting agent and how many tools the call named (migration 20261206000001).
    if row.presented_agent_id.is_some() || row.tool_count.is_some() {
        hasher.update([0xff]);
        hasher.update(row.presented_agent_id.unwrap_or_default().as_bytes());
        hasher.update(row.tool_count.unwrap_or(-1).to_be_bytes());
    }
    // Then, if the event records a shared budget's charge or denial, another tag, the
    // cost, the share and the budget (migration 20261206000006).
    if row.cost.is_some() || row.share_id.is_some() || row.budget_id.is_some() {
        hasher.update([0xfe]);
        hasher.update(row.cost.unwrap_or(-1).to_be_bytes());
        hasher.update(row.share_id.unwrap_or_default().as_bytes());
        text(
            &mut hasher,
            Some(row.budget_id.as_deref().unwrap_or_default()),
        );
    }
    Digest(hasher.finalize().into())
}

/// Where a walk of one chain stands.
#[derive(Debug)]
struct Link {
    count: u64,
    head: Digest,
    /// A link whose hash to keep (its position, from 1), for checkpoints.
    mark: Option<u64>,
    at_mark: Option<Digest>,
}

impl Link {
    fn new(mark: Option<u64>) -> Self {
        Link {
            count: 0,
            head: Digest::GENESIS,
            mark,
            at_mark: None,
        }
    }

    /// The head, when the chain has links (and, as walks stop at a break, verified).
    fn head(&self) -> Option<Digest> {
        (self.count > 0).then_some(self.head)
    }
}

/// Positions whose hashes a walk keeps: in the state chain and in the denial chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Marks {
    pub(super) events: Option<u64>,
    pub(super) denials: Option<u64>,
}

/// Walks one session's two chains, row by row, in `event_id` order.
#[derive(Debug)]
pub(super) struct Walk {
    session_id: Uuid,
    events: Link,
    denials: Link,
    broken: Option<BrokenLink>,
}

impl Walk {
    fn new(session_id: Uuid, marks: Marks) -> Self {
        Walk {
            session_id,
            events: Link::new(marks.events),
            denials: Link::new(marks.denials),
            broken: None,
        }
    }

    /// The hashes at the marked positions, where each chain verified up to them.
    pub(super) fn at_marks(&self) -> (Option<Digest>, Option<Digest>) {
        (self.events.at_mark, self.denials.at_mark)
    }

    fn step(&mut self, row: &ChainRow) {
        if self.broken.is_some() {
            return;
        }
        let link = if row.is_denial() {
            &mut self.denials
        } else {
            &mut self.events
        };
        link.count += 1;
        let problem = match (
            Digest::from_stored(row.prev_hash.as_deref()),
            Digest::from_stored(row.hash.as_deref()),
        ) {
            (Some(prev), Some(hash)) => {
                if prev != link.head {
                    Some(LinkProblem::PredecessorMismatch)
                } else if hash != link_hash(prev, row) {
                    Some(LinkProblem::ContentMismatch)
                } else {
                    link.head = hash;
                    if link.mark == Some(link.count) {
                        link.at_mark = Some(hash);
                    }
                    None
                }
            }
            _ => Some(LinkProblem::MissingHash),
        };
        self.broken = problem.map(|problem| BrokenLink {
            session_id: row.session_id,
            event_id: row.event_id,
            kind: row.kind.clone(),
            problem,
        });
    }

    pub(super) fn finish(self) -> SessionChain {
        let intact = self.broken.is_none();
        SessionChain {
            session_id: self.session_id,
            events: self.events.count,
            head: self.events.head().filter(|_| intact),
            denials: self.denials.count,
            denial_head: self.denials.head().filter(|_| intact),
            broken: self.broken,
        }
    }
}

/// Verifies the two chains of `session_id` (its state-changing events and its denials) and
/// reports the first link that does not verify. A session without events (never created,
/// or purged with its events) verifies with `events == 0`.
///
/// # Errors
/// The database could not be read.
pub async fn verify_audit_chain(
    pool: &PgPool,
    session_id: Uuid,
) -> Result<SessionChain, StorageError> {
    let rows = sqlx::query_file_as!(
        ChainRow,
        "src/operator/sql/chain_of_session.sql",
        session_id
    )
    .fetch_all(pool)
    .await?;
    let mut walk = Walk::new(session_id, Marks::default());
    rows.iter().for_each(|row| walk.step(row));
    Ok(walk.finish())
}

/// Rows read per round trip by [`verify_all_audit_chains`].
const VERIFY_PAGE: i64 = 10_000;

/// Verifies every session's chain, reading the events in pages in (session, event) order,
/// so memory stays flat however large the table is.
///
/// # Errors
/// The database could not be read.
pub async fn verify_all_audit_chains(pool: &PgPool) -> Result<ChainSummary, StorageError> {
    let mut summary = ChainSummary::default();
    walk_all_chains(pool, &mut summary).await?;
    Ok(summary)
}

/// What [`walk_all_chains`] reports each session's walk to.
pub(super) trait ChainVisitor {
    /// The links of `session_id` whose hashes the walk should keep.
    fn marks(&mut self, _session_id: Uuid) -> Marks {
        Marks::default()
    }
    /// The session's walk, finished.
    fn done(&mut self, walk: Walk);
}

impl ChainVisitor for ChainSummary {
    fn done(&mut self, walk: Walk) {
        self.add(walk.finish());
    }
}

/// Walks every session's chain in session id order, in pages, so memory stays flat however
/// large the table is, and hands each walk to `visitor`.
pub(super) async fn walk_all_chains(
    pool: &PgPool,
    visitor: &mut impl ChainVisitor,
) -> Result<(), StorageError> {
    let mut walk: Option<Walk> = None;
    let mut after = (Uuid::nil(), i64::MIN);
    loop {
        // Keyset pagination on the primary key (session_id, event_id, …); no transaction
        // is held between pages.
        let page = sqlx::query_file_as!(
            ChainRow,
            "src/operator/sql/chain_page.sql",
            after.0,
            after.1,
            VERIFY_PAGE
        )
        .fetch_all(pool)
        .await?;
        let Some(last) = page.last() else { break };
        after = (last.session_id, last.event_id);
        for row in &page {
            if walk.as_ref().is_none_or(|w| w.session_id != row.session_id) {
                if let Some(finished) = walk.take() {
                    visitor.done(finished);
                }
                walk = Some(Walk::new(row.session_id, visitor.marks(row.session_id)));
            }
            if let Some(walk) = walk.as_mut() {
                walk.step(row);
            }
        }
    }
    if let Some(finished) = walk {
        visitor.done(finished);
    }
    Ok(())
}

impl ChainSummary {
    fn add(&mut self, chain: SessionChain) {
        self.sessions += 1;
        self.events += chain.events;
        self.denials += chain.denials;
        self.broken.extend(chain.broken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ChainRow {
        ChainRow {
            event_id: 1,
            event_key: Uuid::from_u128(1),
            session_id: Uuid::from_u128(2),
            agent_id: Uuid::from_u128(3),
            kind: "call_allowed".into(),
            tools: vec![Some("a".into()), Some("b".into())],
            calls_made: 1,
            rate_window_calls: 1,
            status: "active".into(),
            session_version: Some(2),
            occurred_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            recorded_at: DateTime::from_timestamp_micros(1_700_000_000_223_456).unwrap(),
            instance_id: Uuid::from_u128(4),
            reason: None,
            limited_tools: None,
            tool_calls: None,
            presented_agent_id: None,
            tool_count: None,
            cost: None,
            share_id: None,
            budget_id: None,
            prev_hash: None,
            hash: None,
        }
    }

    #[test]
    fn a_calls_cost_share_and_budget_are_hashed_only_when_present() {
        let plain = link_hash(Digest::GENESIS, &row());
        let mut charged = row();
        charged.cost = Some(3);
        charged.share_id = Some(Uuid::from_u128(7));
        charged.budget_id = Some("acme".into());
        let with_charge = link_hash(Digest::GENESIS, &charged);
        assert_ne!(plain, with_charge);
        for edit in [
            |r: &mut ChainRow| r.cost = Some(4),
            |r: &mut ChainRow| r.cost = None,
            |r: &mut ChainRow| r.share_id = Some(Uuid::from_u128(8)),
            |r: &mut ChainRow| r.budget_id = Some("acme/x".into()),
            |r: &mut ChainRow| r.budget_id = None,
        ] {
            let mut edited = charged.clone();
            edit(&mut edited);
            assert_ne!(with_charge, link_hash(Digest::GENESIS, &edited));
        }
    }

    #[test]
    fn a_denials_presenter_and_count_are_hashed_only_when_present() {
        let mut denial = row();
        denial.kind = "denied".into();
        denial.reason = Some("agent_mismatch".into());
        denial.session_version = None;
        let plain = link_hash(Digest::GENESIS, &denial);
        let mut presented = denial.clone();
        presented.presented_agent_id = Some(Uuid::from_u128(5));
        presented.tool_count = Some(2);
        let with_presenter = link_hash(Digest::GENESIS, &presented);
        assert_ne!(plain, with_presenter);
        for edit in [
            |r: &mut ChainRow| r.presented_agent_id = Some(Uuid::from_u128(6)),
            |r: &mut ChainRow| r.presented_agent_id = None,
            |r: &mut ChainRow| r.tool_count = Some(3),
            |r: &mut ChainRow| r.tool_count = None,
        ] {
            let mut edited = presented.clone();
            edit(&mut edited);
            assert_ne!(with_presenter, link_hash(Digest::GENESIS, &edited));
        }
    }

    #[test]
    fn the_counts_of_limited_tools_are_hashed_only_when_present() {
        let plain = link_hash(Digest::GENESIS, &row());
        let mut counted = row();
        counted.limited_tools = Some(vec![Some("a".into())]);
        counted.tool_calls = Some(vec![Some(1)]);
        let with_counts = link_hash(Digest::GENESIS, &counted);
        assert_ne!(plain, with_counts);
        let mut more = counted.clone();
        more.tool_calls = Some(vec![Some(2)]);
        assert_ne!(with_counts, link_hash(Digest::GENESIS, &more));
        let mut lost = counted.clone();
        lost.tool_calls = None;
        assert_ne!(with_counts, link_hash(Digest::GENESIS, &lost));
        let mut empty = row();
        empty.limited_tools = Some(Vec::new());
        empty.tool_calls = Some(Vec::new());
        assert_ne!(plain, link_hash(Digest::GENESIS, &empty));
    }

    #[test]
    fn length_prefixes_keep_tool_boundaries_apart() {
        let mut joined = row();
        joined.tools = vec![Some("ab".into())];
        assert_ne!(
            link_hash(Digest::GENESIS, &row()),
            link_hash(Digest::GENESIS, &joined)
        );
        let mut null = row();
        null.tools = vec![None, Some("b".into())];
        let mut empty = row();
        empty.tools = vec![Some(String::new()), Some("b".into())];
        assert_ne!(
            link_hash(Digest::GENESIS, &null),
            link_hash(Digest::GENESIS, &empty)
        );
    }

    #[test]
    fn walk_reports_the_first_broken_link_only() {
        let mut first = row();
        let h1 = link_hash(Digest::GENESIS, &first);
        first.prev_hash = Some(Digest::GENESIS.0.to_vec());
        first.hash = Some(h1.0.to_vec());
        let mut second = row();
        second.event_id = 2;
        second.calls_made = 2;
        second.prev_hash = Some(h1.0.to_vec());
        second.hash = Some(link_hash(h1, &second).0.to_vec());

        let mut walk = Walk::new(first.session_id, Marks::default());
        walk.step(&first);
        walk.step(&second);
        let intact = walk.finish();
        assert_eq!(intact.head.map(|d| d.0.to_vec()), second.hash.clone());

        second.calls_made = 1; // edited after the fact
        let mut third = row();
        third.event_id = 3;
        third.prev_hash = Some(vec![0; 31]);
        let mut walk = Walk::new(first.session_id, Marks::default());
        for r in [&first, &second, &third] {
            walk.step(r);
        }
        let broken = walk.finish();
        assert_eq!(broken.head, None);
        assert_eq!(broken.events, 2);
        let link = broken.broken.expect("broken");
        assert_eq!(
            (link.event_id, link.problem),
            (2, LinkProblem::ContentMismatch)
        );
    }

    #[test]
    fn digest_prints_as_hex() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x01;
        let hex = Digest(bytes).to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab00") && hex.ends_with("01"));
    }
}
