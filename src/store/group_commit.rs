//! Group commit: versioned writes of different sessions that wait at the same time share
//! one statement and one commit ([`Storage::update_many`]).
//!
//! # Invariant: no timer, no Ok before the commit
//! Each of the [`LANES`] lanes has one statement in flight at most, and its own list of
//! waiting writes. A write that finds its lane free and nothing waiting on it goes out at
//! once, on its caller's task. Writes that arrive while their lane is taken wait, and form
//! its next batch, which the lane's sender task sends as soon as the lane frees. So an idle
//! store pays no batching delay, and a busy one sends as many calls per commit as arrived
//! during the previous commit. Each write keeps its own version check and outcome; a failed
//! statement fails every write in it (each caller then goes to the pending set). A caller
//! learns its outcome only after the statement returned.
//!
//! A write charging a shared budget goes on the lane of the share it charges: the store
//! holds one share of each budget per lane (see `escrow`), so two statements in flight
//! never update one share's row, and neither waits for the other's commit. Other writes go
//! on a free lane, or the one with the fewest waiting.
//!
//! # Isolation
//! A batch statement never waits for a row lock: PostgreSQL's batch skips rows another
//! transaction holds and reports them as conflicts, which their callers resolve alone (a
//! session stalled elsewhere holds up no other session; see `docs/architecture.md`). Up to
//! [`LANES`] statements are in flight at once, each on its own connection, so a slow
//! statement does not stop the next batch either. A storage that cannot write a batch in
//! one step ([`Storage::batches_writes`] is false) gets every write on its own.
//!
//! Batches are sent on tasks of their own, never on a caller's, so a caller that gives up
//! (a cancelled future) cannot strand the other writes of its batch.
//!
//! # Invariant: a late event waits alone
//! PostgreSQL makes the insert of an event that occurred more than a few seconds before it
//! is written, or on a day that is over, wait for a rollup of that day in flight (see
//! docs/reporting.md, "Rollups"): the rollup must count it or see it. A write carrying such
//! an event (a call whose write failed, carried by its session's next write) never joins a
//! batch and never takes a lane: it goes out on its own statement, so the wait is its
//! alone, and the writes on time keep both lanes.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

use super::time_bounded::TimeBounded;
use super::worker::{Parking, Worker};
use crate::audit::AuditEvent;
use crate::error::StorageError;
use crate::model::TaskSession;
use crate::storage::{BatchUpdate, Storage, UpdateOutcome, Version};

/// Most writes per statement: bounds the statement's size and the time its row locks are
/// held; more waiting writes simply form the next batch.
const MAX_BATCH: usize = 128;

/// Most statements in flight at once (see the module documentation). Few lanes make big
/// batches: on the 2-core machine of the README's table, 2 lanes carried 64 writers at
/// 8,600 calls/s where 8 lanes managed 7,100 (`scripts/bench --quick`); measured again
/// once the audit trigger had become cheap, 3 lanes were slower than 2 at both 16 and 64
/// writers (three alternating runs each).
pub(super) const LANES: usize = 2;

/// An event that occurred this long before its write, or this close before a UTC
/// midnight, is late (see the module documentation): half PostgreSQL's five seconds
/// (`arbiter.rollup_today_lag()`), so that a store's clock a little off the database's
/// still calls late every event the database does.
const LATE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(2_500);

/// Whether any of `events`, written at `now`, is late.
fn carries_late(events: &[AuditEvent], now: DateTime<Utc>) -> bool {
    events.iter().any(|event| {
        let occurred = event.occurred_at;
        occurred < now - LATE || (occurred + LATE).date_naive() != occurred.date_naive()
    })
}

/// A write's outcome, as its caller receives it. A failed statement's error is shared by
/// every write of its batch.
pub(super) type WriteOutcome = Result<UpdateOutcome, Arc<StorageError>>;

struct Write {
    session: TaskSession,
    expected: Version,
    events: Vec<AuditEvent>,
    reply: oneshot::Sender<WriteOutcome>,
}

/// The lanes: each has the writes waiting for its next batch, one statement in flight at
/// most, and the task that sends its batches.
pub(super) struct GroupCommit<S> {
    storage: Arc<TimeBounded<S>>,
    lanes: [Lane; LANES],
}

struct Lane {
    waiting: Mutex<Vec<Write>>,
    /// One permit: the lane's statement in flight.
    free: Arc<Semaphore>,
    sender: Worker,
}

impl<S> std::fmt::Debug for GroupCommit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field(
                "waiting",
                &self
                    .lanes
                    .iter()
                    .map(|lane| lane.waiting().len())
                    .collect::<Vec<_>>(),
            )
            .field(
                "free_lanes",
                &self
                    .lanes
                    .iter()
                    .filter(|lane| lane.free.available_permits() > 0)
                    .count(),
            )
            .finish_non_exhaustive()
    }
}

impl Lane {
    fn new() -> Self {
        Lane {
            waiting: Mutex::default(),
            free: Arc::new(Semaphore::new(1)),
            sender: Worker::default(),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, Vec<Write>> {
        // Nothing panics under this lock, so a poisoned list is still consistent.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next batch, oldest first. Writes whose caller stopped waiting (its deadline
    /// passed, or it was cancelled) are dropped unsent: the caller already treats the write
    /// as failed with an unknown outcome, so not sending it is one of the outcomes it
    /// expects, and the cheapest.
    fn take_batch(&self) -> Vec<Write> {
        let mut waiting = self.waiting();
        waiting.retain(|write| !write.reply.is_closed());
        let n = std::cmp::min(waiting.len(), MAX_BATCH);
        waiting.drain(..n).collect()
    }
}

impl<S> GroupCommit<S> {
    /// The lane for a write that charges no share: a free one with nothing waiting, else
    /// the one with the fewest waiting.
    fn any_lane(&self) -> usize {
        let mut best = (usize::MAX, 0);
        for (index, lane) in self.lanes.iter().enumerate() {
            let waiting = lane.waiting().len();
            if waiting == 0 && lane.free.available_permits() > 0 {
                return index;
            }
            if waiting < best.0 {
                best = (waiting, index);
            }
        }
        best.1
    }
}

impl<S: Storage> GroupCommit<S> {
    pub(super) fn new(storage: Arc<TimeBounded<S>>) -> Arc<Self> {
        Arc::new(GroupCommit {
            storage,
            lanes: std::array::from_fn(|_| Lane::new()),
        })
    }

    /// Writes `session` (naming `expected`) with `events` at `now` in the next group
    /// commit of `lane` (any lane when `None`; see the module documentation), or on its own
    /// if an event is late; gives up at the caller's `deadline` (waiting for the lane
    /// included). Only a write that waits for a batch is copied (it outlives its caller's
    /// borrow there).
    pub(super) async fn write(
        self: &Arc<Self>,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
        now: DateTime<Utc>,
        deadline: Instant,
        lane: Option<usize>,
    ) -> WriteOutcome {
        let storage = &self.storage;
        let on_its_own = !storage.batches_writes() || carries_late(events, now);
        let index = lane.map_or_else(|| self.any_lane(), |lane| lane % LANES);
        let lane = &self.lanes[index];
        // Nothing waiting and the lane free: go out at once, on this task (no hop), as a
        // plain update: a batch is only ever what the sender takes from the waiting list.
        let permit = if on_its_own || !lane.waiting().is_empty() {
            None
        } else {
            lane.free.try_acquire().ok()
        };
        if on_its_own || permit.is_some() {
            let result = storage
                .by(deadline, storage.update(session, expected, events))
                .await
                .map_err(Arc::new);
            drop(permit);
            return result;
        }
        let (reply, outcome) = oneshot::channel();
        let was_empty = {
            let mut waiting = lane.waiting();
            let was_empty = waiting.is_empty();
            waiting.push(Write {
                session: session.clone(),
                expected,
                events: events.to_vec(),
                reply,
            });
            was_empty
        };
        // The sender parks only after it found nothing waiting: only the write that makes
        // the list non-empty needs to wake it.
        if was_empty {
            let me = Arc::downgrade(self);
            lane.sender.wake(|parking| send_batches(me, index, parking));
        }
        // The sender answers every write it takes; it is dropped unanswered only if the
        // runtime shuts down mid-statement, when the outcome is unknown. On a timeout
        // `outcome` is dropped, so a sender that has not taken the write yet drops it.
        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Arc::new(StorageError::Transient(
                "the group commit stopped before answering".into(),
            ))),
            Err(_) => Err(Arc::new(storage.timed_out())),
        }
    }

    /// Sends one batch and answers each of its writes.
    async fn send(&self, batch: Vec<Write>) {
        let updates: Vec<BatchUpdate<'_>> = batch
            .iter()
            .map(|w| BatchUpdate {
                session: &w.session,
                expected: w.expected,
                events: &w.events,
            })
            .collect();
        let result = self.storage.update_many(&updates).await;
        drop(updates);
        let answers = outcomes(result, batch.len());
        for (write, answer) in batch.into_iter().zip(answers) {
            // A caller that gave up no longer listens; nothing to do for it.
            let _ = write.reply.send(answer);
        }
    }
}

/// One outcome per write of a statement of `n` writes: its own, or the statement's error
/// for all of them.
fn outcomes(result: Result<Vec<UpdateOutcome>, StorageError>, n: usize) -> Vec<WriteOutcome> {
    let err = match result {
        Ok(outcomes) if outcomes.len() == n => return outcomes.into_iter().map(Ok).collect(),
        Ok(outcomes) => StorageError::Decode(format!(
            "update_many answered {} outcomes for {n} writes",
            outcomes.len()
        )),
        Err(err) => err,
    };
    let err = Arc::new(err);
    (0..n).map(|_| Err(Arc::clone(&err))).collect()
}

/// The sender task of lane `index`: while woken, waits for the lane to be free, takes a
/// batch, and sends it on a task of its own (which frees the lane when the statement
/// returns); parks once nothing waits. Holds the group commit only while there is work.
async fn send_batches<S: Storage>(commits: Weak<GroupCommit<S>>, index: usize, parking: Parking) {
    while parking.park().await {
        loop {
            let Some(commits) = commits.upgrade() else {
                return;
            };
            let lane = &commits.lanes[index];
            let Ok(permit) = Arc::clone(&lane.free).acquire_owned().await else {
                return; // The semaphore is never closed.
            };
            let batch = lane.take_batch();
            if batch.is_empty() {
                break;
            }
            tokio::spawn(async move {
                commits.send(batch).await;
                drop(permit);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::EventKind;
    use crate::model::CreateSessionRequest;

    fn event_at(at: DateTime<Utc>) -> AuditEvent {
        let req = CreateSessionRequest::new(
            uuid::Uuid::new_v4(),
            ["search"],
            5,
            chrono::Duration::minutes(5),
        );
        let session = TaskSession::from_request(uuid::Uuid::new_v4(), &req, at);
        AuditEvent::new(
            EventKind::CallAllowed,
            Vec::new(),
            &session,
            at,
            uuid::Uuid::nil(),
        )
    }

    #[test]
    fn an_event_long_before_its_write_or_close_before_midnight_is_late() {
        let noon = DateTime::parse_from_rfc3339("2026-12-06T12:00:00Z")
            .expect("a time")
            .with_timezone(&Utc);
        let on_time = [event_at(noon - chrono::Duration::seconds(1))];
        assert!(!carries_late(&on_time, noon));
        let old = [
            event_at(noon),
            event_at(noon - chrono::Duration::seconds(3)),
        ];
        assert!(carries_late(&old, noon));
        let midnight = DateTime::parse_from_rfc3339("2026-12-07T00:00:00Z")
            .expect("a time")
            .with_timezone(&Utc);
        let before_midnight = [event_at(midnight - chrono::Duration::seconds(1))];
        assert!(carries_late(
            &before_midnight,
            midnight - chrono::Duration::seconds(1)
        ));
        let after_midnight = [event_at(midnight)];
        assert!(!carries_late(&after_midnight, midnight));
    }
}
