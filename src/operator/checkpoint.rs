//! Checkpoints: the head of every session's hash chain, written to a file the operator keeps
//! outside the database, and the proof, later, that no chain was rewritten since.
//!
//! A chain alone cannot show that someone able to rewrite the table (a superuser, with the
//! append-only trigger disabled) did not recompute every hash after an edit, or drop a
//! session's newest events. A checkpoint can: every chain that existed when it was taken
//! must still pass through its recorded head, at the same position.
//!
//! # Format (JSON Lines; a file may hold several checkpoints, appended)
//! ```text
//! {"arbiter_checkpoint":1,"taken_at":"2026-12-01T05:00:00Z"}
//! {"session_id":"…","events":5,"head":"<64 hex>","denials":1,"denial_head":"<64 hex>"}
//! …one line per session with chained events…
//! {"end":true,"sessions":2,"events":9,"denials":4,"digest":"<64 hex digits>"}
//! ```
//! Each session has two chains (state-changing events and denials, see
//! [`crate::operator::chain`]); `denial_head` is `null` when it has no denials. `digest` is
//! SHA-256 over every head line's session id (16 bytes), event count (8 bytes, big-endian),
//! head (32 bytes), denial count (8 bytes) and denial head (32 bytes, zeros when none), in
//! order: a checkpoint cut short or edited by accident is refused. [`verify_against`] checks the newest complete checkpoint of a file.
//!
//!
//! A purge appends a record of the trails it removes to the same file ([`PurgeRecord`];
//! `purge --record FILE`):
//! ```text
//! {"arbiter_purge":1,"at":"2026-12-02T05:00:00Z","cutoff":"2026-11-01T00:00:00Z"}
//! {"purged":"…"}
//! …one line per session whose trail the purge may remove, written before it does…
//! {"end_purge":true,"sessions":2,"digest":"<64 hex digits>"}
//! ```
//! (`digest` is SHA-256 over the listed ids, 16 bytes each, in order.) A session of the
//! checkpoint whose trail is gone now is *gone* if a purge record that had not ended when
//! the checkpoint began lists it, and *vanished* otherwise: a trail goes only by a
//! recorded purge. A session whose row is stored while its trail is gone has vanished too,
//! checkpoint or not: a purge removes only trails of sessions already deleted.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use thiserror::Error;
use uuid::Uuid;

use super::chain::{BrokenLink, ChainVisitor, Digest, Marks, Walk, walk_all_chains};
use crate::error::StorageError;

/// The format's version, in each checkpoint's first line.
const VERSION: u32 = 1;

/// Why a checkpoint could not be written or checked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The database could not be read.
    #[error("reading the audit trail failed")]
    Storage(#[from] StorageError),
    /// The checkpoint file could not be written or read.
    #[error("checkpoint file: {0}")]
    Io(#[from] std::io::Error),
    /// The file holds no complete, intact checkpoint.
    #[error("checkpoint file: {0}")]
    Invalid(String),
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointSummary {
    /// Sessions whose head was recorded.
    pub sessions: u64,
    /// Chained state-changing events up to those heads.
    pub events: u64,
    /// Chained denials up to those heads.
    pub denials: u64,
    /// The digest over every recorded head.
    pub digest: Option<Digest>,
    /// Chains already broken (their heads are not recorded): `verify` reports them too.
    pub broken: Vec<BrokenLink>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    arbiter_checkpoint: u32,
    taken_at: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct HeadLine {
    session_id: Uuid,
    events: u64,
    head: String,
    denials: u64,
    denial_head: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct EndLine {
    end: bool,
    sessions: u64,
    events: u64,
    denials: u64,
    digest: String,
}

#[derive(Serialize, Deserialize)]
struct PurgeHeader {
    arbiter_purge: u32,
    at: DateTime<Utc>,
    cutoff: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct PurgedLine {
    purged: Uuid,
}

#[derive(Serialize, Deserialize)]
struct PurgeEnd {
    end_purge: bool,
    sessions: u64,
    digest: String,
}

/// A purge's record of the trails it removes, appended to a checkpoint file (see the
/// module's format): give [`PurgeRecord::trails`] to
/// [`purge_before_recorded`](crate::operator::retention::purge_before_recorded), then
/// [`PurgeRecord::finish`]. Each call of `trails` writes its lines and flushes `out`;
/// make `out` durable there too (sync a file) so that no trail goes before its line is on
/// disk.
#[derive(Debug)]
pub struct PurgeRecord<W: Write> {
    out: W,
    fold: Sha256,
    sessions: u64,
}

impl<W: Write> PurgeRecord<W> {
    /// Starts a record of a purge with `cutoff` on `out`.
    ///
    /// # Errors
    /// `out` could not be written.
    pub fn begin(mut out: W, cutoff: DateTime<Utc>) -> std::io::Result<Self> {
        let header = PurgeHeader {
            arbiter_purge: VERSION,
            at: Utc::now(),
            cutoff,
        };
        writeln!(out, "{}", json(&header)?)?;
        out.flush()?;
        Ok(PurgeRecord {
            out,
            fold: Sha256::new(),
            sessions: 0,
        })
    }

    /// Records sessions whose trails the purge may remove, and flushes.
    ///
    /// # Errors
    /// `out` could not be written.
    pub fn trails(&mut self, sessions: &[Uuid]) -> std::io::Result<()> {
        for session in sessions {
            writeln!(self.out, "{}", json(&PurgedLine { purged: *session })?)?;
            self.fold.update(session.as_bytes());
            self.sessions += 1;
        }
        self.out.flush()
    }

    /// The output, to make it durable after [`Self::trails`].
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Ends the record; returns the output.
    ///
    /// # Errors
    /// `out` could not be written.
    pub fn finish(mut self) -> std::io::Result<W> {
        let end = PurgeEnd {
            end_purge: true,
            sessions: self.sessions,
            digest: hex(Digest(self.fold.finalize().into())),
        };
        writeln!(self.out, "{}", json(&end)?)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The digest over head lines, in order.
#[derive(Default)]
struct Fold(Sha256);

/// One session's recorded heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    events: u64,
    head: Digest,
    denials: u64,
    denial_head: Option<Digest>,
}

impl Fold {
    fn add(&mut self, session_id: Uuid, recorded: &Recorded) {
        self.0.update(session_id.as_bytes());
        self.0.update(recorded.events.to_be_bytes());
        self.0.update(recorded.head.0);
        self.0.update(recorded.denials.to_be_bytes());
        self.0
            .update(recorded.denial_head.unwrap_or(Digest::GENESIS).0);
    }

    fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

fn hex(digest: Digest) -> String {
    digest.to_string()
}

fn parse_hex(text: &str) -> Option<Digest> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Digest(bytes))
}

/// Verifies every chain and writes a checkpoint of their heads to `out`, reading the trail
/// in pages (flat memory). Broken chains are verified but not recorded; they are in the
/// summary.
///
/// # Errors
/// The database could not be read or `out` could not be written.
pub async fn write_checkpoint<W: Write>(
    pool: &PgPool,
    out: &mut W,
) -> Result<CheckpointSummary, CheckpointError> {
    let taken_at: DateTime<Utc> = sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(pool)
        .await
        .map_err(StorageError::from)?;
    let header = Header {
        arbiter_checkpoint: VERSION,
        taken_at,
    };
    writeln!(out, "{}", json(&header)?)?;
    let mut writer = HeadWriter {
        out,
        summary: CheckpointSummary::default(),
        fold: Fold::default(),
        failed: None,
    };
    walk_all_chains(pool, &mut writer).await?;
    let HeadWriter {
        out,
        mut summary,
        fold,
        failed,
    } = writer;
    if let Some(err) = failed {
        return Err(err.into());
    }
    let digest = fold.finish();
    let end = EndLine {
        end: true,
        sessions: summary.sessions,
        events: summary.events,
        denials: summary.denials,
        digest: hex(digest),
    };
    writeln!(out, "{}", json(&end)?)?;
    out.flush()?;
    summary.digest = Some(digest);
    Ok(summary)
}

/// Writes each intact chain's head line as the walk finishes it.
struct HeadWriter<'w, W> {
    out: &'w mut W,
    summary: CheckpointSummary,
    fold: Fold,
    /// The first write that failed; nothing is written after it.
    failed: Option<std::io::Error>,
}

impl<W: Write> ChainVisitor for HeadWriter<'_, W> {
    fn done(&mut self, walk: Walk) {
        let chain = walk.finish();
        if let Some(link) = chain.broken {
            self.summary.broken.push(link);
            return;
        }
        let Some(head) = chain.head else { return };
        if self.failed.is_some() {
            return;
        }
        let recorded = Recorded {
            events: chain.events,
            head,
            denials: chain.denials,
            denial_head: chain.denial_head,
        };
        let line = HeadLine {
            session_id: chain.session_id,
            events: recorded.events,
            head: hex(head),
            denials: recorded.denials,
            denial_head: recorded.denial_head.map(hex),
        };
        match json(&line).and_then(|line| writeln!(self.out, "{line}")) {
            Ok(()) => {
                self.fold.add(chain.session_id, &recorded);
                self.summary.sessions += 1;
                self.summary.events += chain.events;
                self.summary.denials += chain.denials;
            }
            Err(err) => self.failed = Some(err),
        }
    }
}

fn json<T: Serialize>(value: &T) -> std::io::Result<String> {
    serde_json::to_string(value).map_err(std::io::Error::other)
}

/// Which of a session's two chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    /// Its state-changing events.
    Events,
    /// Its denials.
    Denials,
}

/// A chain that no longer passes through its recorded head.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rewritten {
    /// The session.
    pub session_id: Uuid,
    /// Which of its chains.
    pub chain: ChainKind,
    /// The position of the recorded head (the chain's links then).
    pub links: u64,
    /// The chain's links now.
    pub links_now: u64,
}

impl std::fmt::Display for Rewritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (chain, links) = match self.chain {
            ChainKind::Events => ("chain", "chained events"),
            ChainKind::Denials => ("denial chain", "chained denials"),
        };
        if self.links_now < self.links {
            write!(
                f,
                "session {}: had {} {links} at the checkpoint, has {} now (links were removed)",
                self.session_id, self.links, self.links_now
            )
        } else {
            write!(
                f,
                "session {}: its {chain} no longer passes through the head recorded at link {} (rewritten)",
                self.session_id, self.links
            )
        }
    }
}

/// The verdict of [`verify_against`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointVerdict {
    /// When the checkpoint was taken.
    pub taken_at: Option<DateTime<Utc>>,
    /// Sessions of the checkpoint whose chain still passes through its recorded head.
    pub kept: u64,
    /// Sessions of the checkpoint whose trail a recorded purge removed since.
    pub gone: u64,
    /// Trails that went without a recorded purge: sessions of the checkpoint with no event
    /// now that no purge record lists, and stored sessions without a trail.
    pub vanished: Vec<Vanished>,
    /// Chains of the checkpoint's sessions that were rewritten or cut short.
    pub rewritten: Vec<Rewritten>,
    /// Chains that do not verify on their own (every session, not only the checkpoint's).
    pub broken: Vec<BrokenLink>,
}

impl CheckpointVerdict {
    /// Whether no chain was rewritten or cut, none vanished, and every chain verifies.
    pub fn is_intact(&self) -> bool {
        self.rewritten.is_empty() && self.broken.is_empty() && self.vanished.is_empty()
    }
}

/// A trail that went without a recorded purge.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Vanished {
    /// The session.
    pub session_id: Uuid,
    /// Whether its row is still stored (no purge removes the trail of a stored session).
    pub row_stored: bool,
}

impl std::fmt::Display for Vanished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.row_stored {
            write!(
                f,
                "session {}: its row is stored but its trail is gone",
                self.session_id
            )
        } else {
            write!(
                f,
                "session {}: its trail is gone and no purge recorded it",
                self.session_id
            )
        }
    }
}

/// Each recorded session's heads.
type Heads = HashMap<Uuid, Recorded>;

/// What a checkpoint file says: its newest complete checkpoint, and the sessions whose
/// trails the purges recorded since it began may have removed.
struct CheckpointFile {
    taken_at: DateTime<Utc>,
    heads: Heads,
    purged: HashSet<Uuid>,
}

/// A purge record as read: its ids, their digest so far, and the line that ended it.
#[derive(Default)]
struct PurgeRead {
    ids: Vec<Uuid>,
    fold: Sha256,
    ended_at: Option<usize>,
}

/// Reads `file` (see the module's format). Memory grows with the sessions of one
/// checkpoint (about 60 bytes each) and those purged since it began, not with the events.
fn read_checkpoint<R: BufRead>(file: R) -> Result<CheckpointFile, CheckpointError> {
    let invalid =
        |line: usize, what: &str| CheckpointError::Invalid(format!("line {line}: {what}"));
    // The newest complete checkpoint: its time, heads and header's line.
    let mut newest: Option<(DateTime<Utc>, Heads, usize)> = None;
    let mut open: Option<(DateTime<Utc>, Heads, Fold, usize)> = None;
    // The purge records that may explain the newest checkpoint's trails; the last is the
    // one lines belong to (one purge at a time per file).
    let mut purges: Vec<PurgeRead> = Vec::new();
    for (index, line) in file.lines().enumerate() {
        let number = index + 1;
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let open_purge = purges.last_mut().filter(|purge| purge.ended_at.is_none());
        if let Ok(purged) = serde_json::from_str::<PurgedLine>(&line) {
            let purge = open_purge
                .ok_or_else(|| invalid(number, "a purged session outside a purge record"))?;
            purge.fold.update(purged.purged.as_bytes());
            purge.ids.push(purged.purged);
        } else if let Ok(header) = serde_json::from_str::<PurgeHeader>(&line) {
            if header.arbiter_purge != VERSION {
                return Err(invalid(number, "unknown purge record version"));
            }
            purges.push(PurgeRead::default());
        } else if let Ok(end) = serde_json::from_str::<PurgeEnd>(&line) {
            let purge =
                open_purge.ok_or_else(|| invalid(number, "a purge's end without its record"))?;
            let recorded = parse_hex(&end.digest)
                .ok_or_else(|| invalid(number, "a digest that is not 64 hex digits"))?;
            let folded = Digest(std::mem::take(&mut purge.fold).finalize().into());
            if folded != recorded || u64::try_from(purge.ids.len()).ok() != Some(end.sessions) {
                return Err(invalid(
                    number,
                    "the purge record does not match its digest (edited or cut)",
                ));
            }
            purge.ended_at = Some(number);
        } else if let Ok(header) = serde_json::from_str::<Header>(&line) {
            if header.arbiter_checkpoint != VERSION {
                return Err(invalid(number, "unknown checkpoint version"));
            }
            open = Some((header.taken_at, HashMap::new(), Fold::default(), number));
        } else if let Ok(head) = serde_json::from_str::<HeadLine>(&line) {
            let (_, heads, fold, _) = open
                .as_mut()
                .ok_or_else(|| invalid(number, "a head before any checkpoint header"))?;
            let not_hex = || invalid(number, "a head that is not 64 hex digits");
            let recorded = Recorded {
                events: head.events,
                head: parse_hex(&head.head).ok_or_else(not_hex)?,
                denials: head.denials,
                denial_head: match &head.denial_head {
                    Some(text) => Some(parse_hex(text).ok_or_else(not_hex)?),
                    None => None,
                },
            };
            fold.add(head.session_id, &recorded);
            heads.insert(head.session_id, recorded);
        } else if let Ok(end) = serde_json::from_str::<EndLine>(&line) {
            let (taken_at, heads, fold, began) = open
                .take()
                .ok_or_else(|| invalid(number, "an end line without its header"))?;
            let recorded = parse_hex(&end.digest)
                .ok_or_else(|| invalid(number, "a digest that is not 64 hex digits"))?;
            if fold.finish() != recorded || u64::try_from(heads.len()).ok() != Some(end.sessions) {
                return Err(invalid(
                    number,
                    "the checkpoint does not match its digest (edited or cut)",
                ));
            }
            // A purge that ended before this checkpoint began removed none of its trails.
            purges.retain(|purge| purge.ended_at.is_none_or(|ended| ended > began));
            newest = Some((taken_at, heads, began));
        } else {
            return Err(invalid(number, "not a checkpoint line"));
        }
    }
    let (taken_at, heads, began) =
        newest.ok_or_else(|| CheckpointError::Invalid("no complete checkpoint".to_owned()))?;
    let purged = purges
        .into_iter()
        .filter(|purge| purge.ended_at.is_none_or(|ended| ended > began))
        .flat_map(|purge| purge.ids)
        .collect();
    Ok(CheckpointFile {
        taken_at,
        heads,
        purged,
    })
}

/// Proves against the newest complete checkpoint in `file` that no chain it recorded was
/// rewritten or cut short since, and verifies every chain on the way (flat memory in the
/// trail's size).
///
/// # Errors
/// The file holds no complete, intact checkpoint, or the database could not be read.
pub async fn verify_against<R: BufRead>(
    pool: &PgPool,
    file: R,
) -> Result<CheckpointVerdict, CheckpointError> {
    let CheckpointFile {
        taken_at,
        heads,
        purged,
    } = read_checkpoint(file)?;
    let mut check = HeadCheck {
        heads,
        verdict: CheckpointVerdict {
            taken_at: Some(taken_at),
            ..CheckpointVerdict::default()
        },
    };
    walk_all_chains(pool, &mut check).await?;
    let HeadCheck { heads, mut verdict } = check;
    // What is left was never walked: those sessions have no chained event now. Gone by a
    // recorded purge, or vanished; and a stored session without a trail vanished too.
    let unwalked: Vec<Uuid> = heads.into_keys().collect();
    let stored: HashSet<Uuid> = sqlx::query_scalar!(
        r#"SELECT session_id AS "session_id!" FROM arbiter.sessions WHERE session_id = ANY($1)"#,
        &unwalked
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?
    .into_iter()
    .collect();
    for session_id in unwalked {
        let row_stored = stored.contains(&session_id);
        if !row_stored && purged.contains(&session_id) {
            verdict.gone += 1;
        } else {
            verdict.vanished.push(Vanished {
                session_id,
                row_stored,
            });
        }
    }
    let trailless = sqlx::query_scalar!(
        r#"SELECT s.session_id AS "session_id!" FROM arbiter.sessions s
            WHERE NOT EXISTS (SELECT 1 FROM arbiter.session_events e
                               WHERE e.session_id = s.session_id
                                 AND e.session_day = (s.created_at AT TIME ZONE 'UTC')::date)
            ORDER BY 1"#
    )
    .fetch_all(pool)
    .await
    .map_err(StorageError::from)?;
    let listed: HashSet<Uuid> = verdict.vanished.iter().map(|v| v.session_id).collect();
    for session_id in trailless {
        if !listed.contains(&session_id) {
            verdict.vanished.push(Vanished {
                session_id,
                row_stored: true,
            });
        }
    }
    verdict.vanished.sort_by_key(|v| v.session_id);
    Ok(verdict)
}

/// Compares each walked chain with its recorded head.
struct HeadCheck {
    heads: Heads,
    verdict: CheckpointVerdict,
}

impl ChainVisitor for HeadCheck {
    fn marks(&mut self, session_id: Uuid) -> Marks {
        self.heads
            .get(&session_id)
            .map(|recorded| Marks {
                events: Some(recorded.events),
                denials: (recorded.denials > 0).then_some(recorded.denials),
            })
            .unwrap_or_default()
    }

    fn done(&mut self, walk: Walk) {
        let (events_at_mark, denials_at_mark) = walk.at_marks();
        let chain = walk.finish();
        if let Some(recorded) = self.heads.remove(&chain.session_id) {
            let events_kept = events_at_mark == Some(recorded.head);
            let denials_kept = denials_at_mark == recorded.denial_head;
            if events_kept && denials_kept {
                self.verdict.kept += 1;
            } else if chain.broken.is_none() {
                let mut rewritten = |chain_kind, links, links_now| {
                    self.verdict.rewritten.push(Rewritten {
                        session_id: chain.session_id,
                        chain: chain_kind,
                        links,
                        links_now,
                    });
                };
                if !events_kept {
                    rewritten(ChainKind::Events, recorded.events, chain.events);
                }
                if !denials_kept {
                    rewritten(ChainKind::Denials, recorded.denials, chain.denials);
                }
            }
        }
        self.verdict.broken.extend(chain.broken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(events: u64, byte: u8) -> Recorded {
        Recorded {
            events,
            head: Digest([byte; 32]),
            denials: 0,
            denial_head: None,
        }
    }

    fn checkpoint_text(heads: &[(Uuid, Recorded)], digest_of: &[(Uuid, Recorded)]) -> String {
        let mut fold = Fold::default();
        let mut text =
            String::from("{\"arbiter_checkpoint\":1,\"taken_at\":\"2026-12-01T05:00:00Z\"}\n");
        for (id, r) in heads {
            let line = HeadLine {
                session_id: *id,
                events: r.events,
                head: hex(r.head),
                denials: r.denials,
                denial_head: r.denial_head.map(hex),
            };
            text += &(json(&line).unwrap() + "\n");
        }
        for (id, r) in digest_of {
            fold.add(*id, r);
        }
        text += &format!(
            "{{\"end\":true,\"sessions\":{},\"events\":0,\"denials\":0,\"digest\":\"{}\"}}\n",
            heads.len(),
            fold.finish()
        );
        text
    }

    #[test]
    fn the_newest_intact_checkpoint_is_read_and_an_edited_one_refused() {
        let one = (Uuid::from_u128(1), recorded(3, 7));
        let two = (
            Uuid::from_u128(2),
            Recorded {
                denials: 2,
                denial_head: Some(Digest([5; 32])),
                ..recorded(1, 9)
            },
        );
        let older = checkpoint_text(&[one], &[one]);
        let newer = checkpoint_text(&[one, two], &[one, two]);
        let read = read_checkpoint((older.clone() + &newer).as_bytes()).unwrap();
        assert_eq!(read.heads.len(), 2);
        assert_eq!(read.heads[&two.0], two.1);

        let edited = checkpoint_text(&[(one.0, recorded(4, 7))], &[one]);
        assert!(matches!(
            read_checkpoint(edited.as_bytes()),
            Err(CheckpointError::Invalid(_))
        ));
        let cut = newer.lines().take(2).collect::<Vec<_>>().join("\n");
        assert!(matches!(
            read_checkpoint(cut.as_bytes()),
            Err(CheckpointError::Invalid(_))
        ));
        assert!(matches!(
            read_checkpoint("garbage\n".as_bytes()),
            Err(CheckpointError::Invalid(_))
        ));
        assert_eq!(
            parse_hex(&Digest([0xab; 32]).to_string()),
            Some(Digest([0xab; 32]))
        );
        assert_eq!(parse_hex("zz"), None);
    }

    fn purge_text(ids: &[Uuid]) -> String {
        let mut record = PurgeRecord::begin(Vec::new(), Utc::now()).unwrap();
        record.trails(ids).unwrap();
        String::from_utf8(record.finish().unwrap()).unwrap()
    }

    #[test]
    fn purges_open_or_ended_after_the_newest_checkpoint_began_explain_its_trails() {
        let one = (Uuid::from_u128(1), recorded(3, 7));
        let checkpoint = checkpoint_text(&[one], &[one]);
        let (a, b, c) = (
            Uuid::from_u128(10),
            Uuid::from_u128(11),
            Uuid::from_u128(12),
        );
        // Ended before the checkpoint began: explains nothing of it.
        let before = purge_text(&[a]);
        // Ended after it: explains its trails.
        let after = purge_text(&[b]);
        // Cut short (a crash): what it listed counts.
        let unfinished = purge_text(&[c])
            .lines()
            .take(2)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let text = before + &checkpoint + &after + &unfinished;
        let read = read_checkpoint(text.as_bytes()).unwrap();
        assert_eq!(read.purged, HashSet::from([b, c]));

        // An edited record is refused.
        let edited = checkpoint + &purge_text(&[a]).replace(&a.to_string(), &b.to_string());
        assert!(matches!(
            read_checkpoint(edited.as_bytes()),
            Err(CheckpointError::Invalid(_))
        ));
    }
}
