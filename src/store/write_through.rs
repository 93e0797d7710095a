//! Write-through: one mutation of one session, decided and made durable under the
//! session's lock.
//!
//! # Invariant: write-through
//! A mutation decides from the cached state and writes the new state with its audit event
//! in one statement naming the version it was decided from; `Ok` is returned only once
//! storage accepted it. After a version conflict it decides once more on the row read
//! under a row lock ([`Storage::update_locked`]), so a newer row is never overwritten and
//! a caller never starves behind a hot writer elsewhere. A write that fails leaves the new
//! state in the cache (the change stays counted) and pins the slot in the pending set.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Inner;
use super::read_failed;
use super::slot::{Slot, SlotState};
use super::stats::Counters;
use crate::audit::AuditEvent;
use crate::error::{SessionError, StorageError, error_chain};
use crate::model::TaskSession;
use crate::policy::{self, Decision, Mutation};
use crate::storage::{LockedUpdate, Storage, UpdateOutcome};

/// What a mutation did.
pub(super) struct Mutated {
    pub(super) session: TaskSession,
    pub(super) changed: bool,
}

impl Mutated {
    fn unchanged(state: &SlotState) -> Self {
        Mutated {
            session: state.current.clone(),
            changed: false,
        }
    }
}

/// What the decision inside a locked update was (the closure reports it through this).
#[allow(
    clippy::large_enum_variant,
    reason = "one lives on the stack of a conflicted mutation; boxing buys nothing"
)]
enum Locked {
    NotReached,
    Write(TaskSession, AuditEvent),
    Unchanged,
    Denied(SessionError),
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

    /// Decides and writes one mutation under the session's lock, and records a denied
    /// call in the denial log.
    ///
    /// First optimistically: decide from the cached state and write naming its version.
    /// If another writer got there first (a conflict), decide once more on the row read
    /// under a row lock ([`Storage::update_locked`]), which cannot lose a race: one
    /// conflict at most per call, however hot the session is elsewhere.
    ///
    /// Async cancellation safety: the cached state changes only once the write's outcome
    /// is known. If this future is dropped mid-write, the write may or may not have
    /// committed; either way the slot still names the old version, so the next mutation
    /// sees a conflict (if it committed) and reloads. No call is lost or double-counted.
    pub(super) async fn mutate(
        &self,
        id: Uuid,
        mutation: Mutation<'_>,
    ) -> Result<Mutated, SessionError> {
        let slot = self.slot(id).await?;
        let mut state = slot.state.lock().await;
        let result = self.mutate_locked(id, &slot, &mut state, mutation).await;
        if let (Err(err), Mutation::Use { tools, .. }) = (&result, mutation) {
            self.record_denial(&state.current, tools, err);
        }
        result
    }

    /// [`Self::mutate`] with the session's lock held.
    async fn mutate_locked(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mutation: Mutation<'_>,
    ) -> Result<Mutated, SessionError> {
        let now = self.now();
        let Some((next, event)) = self.decide(&state.current, mutation, now)? else {
            return Ok(Mutated::unchanged(state));
        };
        let events = state.events_with(&event);
        match self
            .storage
            .update(&next, state.durable_version, &events)
            .await
        {
            Ok(UpdateOutcome::Applied(version)) => {
                return Ok(self.applied(id, slot, state, next, version));
            }
            Ok(UpdateOutcome::Conflict) => Counters::bump(&self.counters.conflicts),
            Err(err) => {
                return Err(self.write_failed(id, slot, state, next, event, &err).await);
            }
        }

        let mut decided = Locked::NotReached;
        let probe = state.unwritten_keys();
        let locked = self
            .storage
            .update_locked(id, &probe, |fresh, landed| {
                // Dropped calls were denied to their callers; this call's own event (if
                // any) carries the merged counters.
                state.rebase(fresh, landed);
                match self.decide(&state.current, mutation, now) {
                    Ok(Some((next, event))) => {
                        let events = state.events_with(&event).into_owned();
                        decided = Locked::Write(next.clone(), event);
                        Some((next, events))
                    }
                    Ok(None) => {
                        decided = Locked::Unchanged;
                        None
                    }
                    Err(denial) => {
                        decided = Locked::Denied(denial);
                        None
                    }
                }
            })
            .await;
        if !state.is_ahead() {
            // The locked read showed that everything unwritten had landed after all.
            self.unpin(id, slot, state);
        }
        match (locked, decided) {
            (Ok(LockedUpdate::Missing), _) => {
                self.forget(id, slot, state).await;
                Err(SessionError::NotFound(id))
            }
            (Ok(LockedUpdate::Applied(version)), Locked::Write(next, _)) => {
                Ok(self.applied(id, slot, state, next, version))
            }
            (Ok(_), Locked::Unchanged) => Ok(Mutated::unchanged(state)),
            (Ok(_), Locked::Denied(denial)) => Err(denial),
            (Err(err), Locked::Write(next, event)) => {
                Err(self.write_failed(id, slot, state, next, event, &err).await)
            }
            // Failed before deciding (begin, or the locked read): nothing changed.
            (Err(err), _) => Err(read_failed(Some(id), &err)),
            (Ok(outcome), _) => Err(SessionError::StorageWriteThrough {
                session_id: id,
                detail: format!("storage broke the update_locked contract: {outcome:?}"),
            }),
        }
    }

    /// A write of `next` succeeded at `version`.
    fn applied(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        next: TaskSession,
        version: i64,
    ) -> Mutated {
        state.current = next;
        state.mark_durable(version);
        self.unpin(id, slot, state);
        Mutated {
            session: state.current.clone(),
            changed: true,
        }
    }

    /// Takes a slot whose state storage now holds out of the pending set.
    pub(super) fn unpin(&self, id: Uuid, slot: &Arc<Slot>, state: &mut SlotState) {
        if state.pinned {
            state.pinned = false;
            self.pending.remove(id, slot);
        }
    }

    /// The row is gone (deleted by retention while cached): forget it everywhere, pending
    /// changes included (there is no row left to reconcile them into).
    pub(super) async fn forget(&self, id: Uuid, slot: &Arc<Slot>, state: &mut SlotState) {
        state.pinned = false;
        self.pending.remove(id, slot);
        self.cache.remove(&id).await;
    }

    /// The write of `next` failed: the cache goes ahead (the change stays counted), the slot
    /// is pinned in the pending set and in the cache, and the reconciler is started.
    async fn write_failed(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        next: TaskSession,
        event: AuditEvent,
        err: &StorageError,
    ) -> SessionError {
        state.current = next;
        state.unwritten.push(event);
        Counters::bump(&self.counters.write_failures);
        state.pinned = true;
        self.pending.insert(id, Arc::clone(slot));
        // The cache may hold another slot for `id` (this one was evicted mid-write and a
        // miss loaded the row again): the ahead state must be the one callers see.
        self.cache.insert(id, Arc::clone(slot)).await;
        let detail = error_chain(err);
        tracing::warn!(session_id = %id, error = %detail, "write-through failed; cache is ahead of storage");
        self.wake_reconciler();
        SessionError::StorageWriteThrough {
            session_id: id,
            detail,
        }
    }
}
