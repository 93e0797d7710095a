//! Write-through: mutations of one session, decided and made durable under the session's
//! lock, combined when they queue up.
//!
//! # Invariant: write-through
//! A mutation decides from the cached state and writes the new state with its audit event
//! in one statement naming the version it was decided from; `Ok` is returned only once
//! storage accepted it. After a version conflict it decides once more on the row read
//! under a row lock ([`Storage::update_locked`]), so a newer row is never overwritten and
//! a caller never starves behind a hot writer elsewhere. A write that fails leaves the new
//! state in the cache (the change stays counted) and pins the slot in the pending set.
//!
//! # Combining
//! Mutations that find the session's lock taken wait in the slot's queue; whoever takes
//! the lock next decides every queued mutation in arrival order against the evolving state
//! and writes them as ONE row update carrying one event each, then answers each caller.
//! So 64 callers on one hot session cost a handful of commits, not 64, and every decision
//! still sees the effect of the ones before it. The writes of different sessions share a
//! commit too (`group_commit`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

use super::inner::{Inner, read_failed};
use super::queued::{Answer, Mutated, Queued};
use super::slot::{Slot, SlotState};
use crate::audit::AuditEvent;
use crate::error::{SessionError, StorageError, error_chain};
use crate::model::TaskSession;
use crate::policy::{self, Decision, Mutation};
use crate::storage::{LockWait, LockedUpdate, Storage, UpdateOutcome};

/// A mutation's decision within a combined round, before the write's outcome is known.
enum Decided {
    /// Changed the session; the state right after it.
    Changed(TaskSession),
    /// Nothing to change; the state it saw.
    Unchanged(TaskSession),
    /// Denied by the policy: nothing consumed.
    Denied(SessionError),
}

/// Every mutation of a round decided in order: the final state (if any mutation changed
/// the session) and the events to write.
struct Round {
    next: Option<TaskSession>,
    events: Vec<AuditEvent>,
    decided: Vec<Decided>,
}

impl Round {
    fn changes(&self) -> bool {
        self.next.is_some()
    }

    /// The callers' results once the round's write succeeded (or there was none).
    fn answers(self) -> Vec<Answer> {
        self.decided
            .into_iter()
            .map(|decided| match decided {
                Decided::Changed(session) => Ok(Mutated {
                    session,
                    changed: true,
                }),
                Decided::Unchanged(session) => Ok(Mutated {
                    session,
                    changed: false,
                }),
                Decided::Denied(err) => Err(err),
            })
            .collect()
    }
}

/// The caller's answer did not arrive: the session's lock holder that took its mutation
/// was cancelled mid-write. The write may or may not have committed.
fn abandoned(id: Uuid) -> SessionError {
    SessionError::StorageWriteThrough {
        session_id: id,
        detail: "the mutation's writer was cancelled; its outcome is unknown".to_owned(),
    }
}

/// The caller's deadline passed while its mutation waited behind another write of the
/// same session. If no lock holder had taken the mutation yet, it is never made; if one
/// had, it is decided and written like any other, and counted if it was allowed.
fn queued_too_long(id: Uuid, after: std::time::Duration) -> SessionError {
    SessionError::StorageWriteThrough {
        session_id: id,
        detail: format!(
            "waited {after:?} behind another write of the session; the call may or may not be counted"
        ),
    }
}

impl<S: Storage> Inner<S> {
    /// Decides `mutation` against `current`: the new state and its audit event, `None` if
    /// nothing changes, or the denial.
    fn decide(
        &self,
        current: &TaskSession,
        mutation: Mutation<'_>,
        now: DateTime<Utc>,
    ) -> Result<Option<(TaskSession, AuditEvent)>, SessionError> {
        let (next, kind) = match policy::decide(current, mutation, now)? {
            Decision::Apply(next, kind) => (next, kind),
            Decision::Unchanged => return Ok(None),
        };
        let tools = match mutation {
            Mutation::Use { tools, .. } => tools.iter().map(|t| (*t).to_owned()).collect(),
            Mutation::Close | Mutation::Expire => Vec::new(),
        };
        let event = AuditEvent::new(kind, tools, &next, now, self.instance_id);
        Ok(Some((next, event)))
    }

    /// Decides `mutations` in order, each against the state the ones before it left.
    fn decide_all(
        &self,
        start: &TaskSession,
        mutations: &[Mutation<'_>],
        now: DateTime<Utc>,
    ) -> Round {
        let mut next: Option<TaskSession> = None;
        let mut events = Vec::new();
        let decided = mutations
            .iter()
            .map(|mutation| {
                let current = next.as_ref().unwrap_or(start);
                match self.decide(current, *mutation, now) {
                    Ok(Some((changed, event))) => {
                        events.push(event);
                        Decided::Changed(next.insert(changed).clone())
                    }
                    Ok(None) => Decided::Unchanged(current.clone()),
                    Err(denial) => Decided::Denied(denial),
                }
            })
            .collect();
        Round {
            next,
            events,
            decided,
        }
    }

    /// Decides and writes one mutation, and records a denied call in the denial log.
    ///
    /// If the session's lock is free, the mutation runs at once. Otherwise it waits in the
    /// slot's queue until the lock holder (or this caller, once it gets the lock) decides
    /// it together with the other queued ones (see the module documentation).
    ///
    /// The whole call, waiting in the queue included, is bounded by one deadline of
    /// `storage_timeout` from its start (see `deadline`'s invariant). A caller whose
    /// deadline passes while queued is answered `StorageWriteThrough`: its call may or may
    /// not be counted (see [`queued_too_long`]), never `Ok`.
    ///
    /// Async cancellation safety: the cached state changes only once a write's outcome is
    /// known. If the lock holder's future is dropped mid-write, the write may or may not
    /// have committed; either way the slot still names the old version, so the next
    /// mutation sees a conflict (if it committed) and reloads. No call is lost or
    /// double-counted; the callers whose mutations it carried get `StorageWriteThrough`
    /// (their calls are counted exactly when that write committed; the slot is not pinned,
    /// since its state did not move).
    pub(super) async fn mutate(
        &self,
        id: Uuid,
        mutation: Mutation<'_>,
    ) -> Result<Mutated, SessionError> {
        let deadline = self.storage.for_call();
        let slot = self.slot(id, deadline).await?;
        if let Ok(mut state) = slot.state.try_lock() {
            let now = self.now();
            let mut results = self
                .mutate_locked(id, &slot, &mut state, &[mutation], now, deadline)
                .await;
            let result = results.pop().unwrap_or_else(|| Err(abandoned(id)));
            if let (Err(err), Mutation::Use { tools, agent }) = (&result, mutation) {
                self.denials.record(&state.current, tools, agent, err, now);
            }
            return result;
        }
        let (queued, mut answer) = Queued::new(mutation);
        slot.enqueue(queued);
        loop {
            tokio::select! {
                biased;
                result = &mut answer => return result.unwrap_or_else(|_| Err(abandoned(id))),
                // Dropping `answer` tells a later lock holder to skip this mutation.
                () = tokio::time::sleep_until(deadline) => {
                    return Err(queued_too_long(id, self.storage.after()));
                }
                mut state = slot.state.lock() => {
                    // Serve everything queued, this caller's mutation included unless an
                    // earlier holder already took it (then its answer is on the way).
                    let mut queued = slot.drain();
                    // A caller that gave up while queued made no call: do not count it.
                    queued.retain(|q| !q.abandoned());
                    if !queued.is_empty() {
                        self.mutate_queued(id, &slot, &mut state, queued, deadline).await;
                    }
                }
            }
        }
    }

    /// Decides and writes `queued` as one round, and answers each caller.
    async fn mutate_queued(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        queued: Vec<Queued>,
        deadline: Instant,
    ) {
        let (owned, replies): (Vec<_>, Vec<_>) =
            queued.into_iter().map(|q| (q.mutation, q.reply)).unzip();
        let tools: Vec<Vec<&str>> = owned.iter().map(|m| m.tools()).collect();
        let mutations: Vec<Mutation<'_>> = owned
            .iter()
            .zip(&tools)
            .map(|(m, tools)| m.borrow(tools))
            .collect();
        let now = self.now();
        let results = self
            .mutate_locked(id, slot, state, &mutations, now, deadline)
            .await;
        for ((reply, mutation), result) in replies.into_iter().zip(&mutations).zip(results) {
            if let (Err(err), Mutation::Use { tools, agent }) = (&result, mutation) {
                self.denials.record(&state.current, tools, *agent, err, now);
            }
            // A caller that gave up no longer listens.
            let _ = reply.send(result);
        }
    }

    /// Decides `mutations` in order at `now` and writes them as one update by `deadline`,
    /// with the session's lock held. One result per mutation, in order.
    ///
    /// First optimistically: decide from the cached state and write naming its version.
    /// If another writer got there first (a conflict), decide once more on the row read
    /// under a row lock ([`Storage::update_locked`]), which cannot lose a race: one
    /// conflict at most per round, however hot the session is elsewhere.
    async fn mutate_locked(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mutations: &[Mutation<'_>],
        now: DateTime<Utc>,
        deadline: Instant,
    ) -> Vec<Answer> {
        let round = self.decide_all(&state.current, mutations, now);
        let Some(next) = &round.next else {
            return round.answers();
        };
        let written = self
            .commits
            .write(
                next,
                state.durable_version,
                &state.events_with(&round.events),
                now,
                deadline,
            )
            .await;
        match written {
            Ok(UpdateOutcome::Applied(version)) => {
                return self.applied(id, slot, state, round, version);
            }
            Ok(UpdateOutcome::Conflict) => self.counters.conflict(),
            Err(err) => return self.write_failed(id, slot, state, round, &err),
        }

        let mut decided = None;
        let probe = state.unwritten_keys();
        let locked = self
            .storage
            .by(
                deadline,
                self.storage
                    .update_locked(id, &probe, LockWait::Wait, |fresh, landed| {
                        // Dropped calls were denied to their callers; this round's events (if any)
                        // carry the merged counters.
                        state.rebase(fresh, landed);
                        let round = self.decide_all(&state.current, mutations, now);
                        let write = round
                            .next
                            .clone()
                            .map(|next| (next, state.events_with(&round.events).into_owned()));
                        decided = Some(round);
                        write
                    }),
            )
            .await;
        if !state.is_ahead() {
            // The locked read showed that everything unwritten had landed after all.
            self.unpin(id, slot, state);
        }
        match (locked, decided) {
            (Ok(LockedUpdate::Missing), _) => {
                self.forget(id, slot, state).await;
                mutations
                    .iter()
                    .map(|_| Err(SessionError::NotFound(id)))
                    .collect()
            }
            (Ok(LockedUpdate::Applied(version)), Some(round)) if round.changes() => {
                self.applied(id, slot, state, round, version)
            }
            (Ok(LockedUpdate::Declined), Some(round)) if !round.changes() => round.answers(),
            (Err(err), Some(round)) if round.changes() => {
                self.write_failed(id, slot, state, round, &err)
            }
            // Failed before deciding (begin, or the locked read): nothing changed.
            (Err(err), _) => mutations
                .iter()
                .map(|_| Err(read_failed(Some(id), &err)))
                .collect(),
            (Ok(outcome), _) => mutations
                .iter()
                .map(|_| {
                    Err(SessionError::StorageWriteThrough {
                        session_id: id,
                        detail: format!("storage broke the update_locked contract: {outcome:?}"),
                    })
                })
                .collect(),
        }
    }

    /// The round's write succeeded at `version`.
    fn applied(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mut round: Round,
        version: i64,
    ) -> Vec<Answer> {
        if let Some(next) = round.next.take() {
            state.current = next;
        }
        state.mark_durable(version);
        self.unpin(id, slot, state);
        round.answers()
    }

    /// The round's write failed: the cache goes ahead (its changes stay counted), the slot
    /// is pinned in the pending set (which wakes the reconciler). Every mutation that
    /// changed the session is answered `StorageWriteThrough`. Nothing here awaits, so a
    /// cancelled caller cannot leave a pinned slot without a reconciler. The slot needs no
    /// new place in the cache: it is the session's only slot (see `registry`), so a lookup
    /// that misses the cache finds it.
    fn write_failed(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        round: Round,
        err: &StorageError,
    ) -> Vec<Answer> {
        if let Some(next) = round.next {
            state.current = next;
        }
        state.unwritten.extend(round.events);
        self.counters.write_failed();
        self.pin(id, slot, state);
        let detail = error_chain(err);
        tracing::warn!(session_id = %id, error = %detail, "write-through failed; cache is ahead of storage");
        round
            .decided
            .into_iter()
            .map(|decided| match decided {
                Decided::Changed(_) => Err(SessionError::StorageWriteThrough {
                    session_id: id,
                    detail: detail.clone(),
                }),
                Decided::Unchanged(session) => Ok(Mutated {
                    session,
                    changed: false,
                }),
                Decided::Denied(err) => Err(err),
            })
            .collect()
    }
}
