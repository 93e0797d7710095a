//! The store's core: the state every handle of a [`SessionStore`](crate::SessionStore)
//! shares, the one lookup every call starts with (from a session id to its slot), and
//! write-through: the mutations of one session, decided and made durable under the
//! session's lock, combined when they queue up. One call of the facade goes through here
//! top to bottom: `mutate`, `slot`, `run_round`, `mutate_locked`, then `applied` or
//! `write_failed`.
//!
//! # Invariant: isolation
//! Only a session's own async mutex is held across an await; the locks of the pending set
//! and of the live slots (`Slots`) are held for map operations only, and a cache lookup
//! never waits for another session.
//!
//! # Invariant: lookups of uncached ids take a bounded share of storage
//! An agent chooses the session id it presents, so it can make every request miss the
//! cache (random ids). At most `cold_loads` loads from storage run at once (the cold-load
//! lane, smaller than a pool); the others wait for the lane within their call's deadline.
//! So however many such lookups arrive, the writes of cached sessions keep the rest of the
//! storage's connections.
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
//! (a `round`) and writes them as ONE row update carrying one event each, then answers
//! each caller. So 64 callers on one hot session cost a handful of commits, not 64, and
//! every decision still sees the effect of the ones before it. A mutation that finds the
//! lock free is a round of one, on the same path. The writes of different sessions share
//! a commit too (`group_commit`).

use std::sync::{Arc, Weak};

use chrono::{DateTime, SubsecRound as _, Utc};
use moka::future::Cache;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use uuid::Uuid;

use super::denial_log::DenialLog;
use super::escrow::{Escrow, Hold};
use super::group_commit::GroupCommit;
use super::listener::Listener;
use super::maintenance::Maintenance;
use super::pending::PendingSet;
use super::queued::{Answer, Mutated, Queued};
use super::reconciler::Reconciler;
use super::round::Round;
use super::slot::{Slot, SlotState, Slots};
use super::stats::Counters;
use super::time_bounded::TimeBounded;
use crate::audit::{AuditEvent, EventKind};
use crate::clock::Clock;
use crate::error::{SessionError, StorageError, error_chain};
use crate::model::{CreateSessionRequest, TaskSession};
use crate::policy::Mutation;
use crate::storage::{LockWait, LockedUpdate, Storage, UpdateOutcome, Versioned};

pub(crate) struct Inner<S> {
    storage: Arc<TimeBounded<S>>,
    /// The negative cache: ids recently found missing, so a flood of requests for unknown
    /// sessions costs one load per id per TTL, not one per request. Bounded; ids are random
    /// v4, so an id is never created after it was looked up.
    negative_cache: Cache<Uuid, ()>,
    clock: Arc<dyn Clock>,
    cache: Cache<Uuid, Arc<Slot>>,
    /// Every live slot, one per session: where a lookup that misses the cache looks first.
    slots: Arc<Slots>,
    /// The cold-load lane: permits for loads from storage on a cache miss.
    cold_loads: Semaphore,
    pending: PendingSet,
    counters: Arc<Counters>,
    instance_id: Uuid,
    /// The store itself, for the background tasks, which must not keep it alive.
    me: Weak<Inner<S>>,
    commits: Arc<GroupCommit<S>>,
    reconciler: Reconciler,
    denials: Arc<DenialLog<S>>,
    listener: Listener,
    maintenance: Maintenance,
    escrow: Escrow,
    /// Turns of the lanes (see `next_lane`).
    next_lane: std::sync::atomic::AtomicUsize,
}

/// What a store is built from (`SessionStoreBuilder::build`); [`Inner::new`] makes the
/// rest.
pub(super) struct Parts<S> {
    pub(super) storage: TimeBounded<S>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) cache: Cache<Uuid, Arc<Slot>>,
    pub(super) negative_cache: Cache<Uuid, ()>,
    pub(super) counters: Arc<Counters>,
    /// The cold-load lane's width.
    pub(super) cold_loads: usize,
    pub(super) instance_id: Uuid,
    pub(super) reconciler: Reconciler,
    pub(super) listener: Listener,
    pub(super) maintenance: Maintenance,
    /// The denial buffer's bounds: entries, then bytes.
    pub(super) denial_buffer: (usize, usize),
    pub(super) escrow: Escrow,
}

impl<S> std::fmt::Debug for Inner<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("instance_id", &self.instance_id)
            .field("cache_entries", &self.cache.entry_count())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Why a cache miss could not produce a slot (moka shares it between coalesced loaders).
#[derive(Debug)]
enum LoadError {
    NotFound,
    Read(StorageError),
}

/// A failed read, logged, as the caller gets it.
pub(super) fn read_failed(session_id: Option<Uuid>, err: &StorageError) -> SessionError {
    let detail = error_chain(err);
    tracing::warn!(session_id = ?session_id, error = %detail, "session storage read failed");
    SessionError::StorageRead { session_id, detail }
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
    pub(super) fn new(parts: Parts<S>) -> Arc<Self> {
        let storage = Arc::new(parts.storage);
        let (denial_entries, denial_bytes) = parts.denial_buffer;
        Arc::new_cyclic(|me| Inner {
            commits: GroupCommit::new(Arc::clone(&storage)),
            denials: DenialLog::new(
                Arc::clone(&storage),
                parts.instance_id,
                denial_entries,
                denial_bytes,
            ),
            storage,
            negative_cache: parts.negative_cache,
            clock: parts.clock,
            cache: parts.cache,
            slots: Arc::default(),
            cold_loads: Semaphore::new(parts.cold_loads),
            pending: PendingSet::default(),
            counters: parts.counters,
            instance_id: parts.instance_id,
            me: me.clone(),
            reconciler: parts.reconciler,
            listener: parts.listener,
            maintenance: parts.maintenance,
            escrow: parts.escrow,
            next_lane: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The storage, bounded in time. The facade's calls that bypass the slots (create, the
    /// per-agent reads) and the background tasks use it directly.
    pub(super) fn storage(&self) -> &Arc<TimeBounded<S>> {
        &self.storage
    }

    /// This store's id, recorded in every event it writes.
    pub(super) fn instance_id(&self) -> Uuid {
        self.instance_id
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    pub(super) fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    pub(super) fn listener(&self) -> &Listener {
        &self.listener
    }

    pub(super) fn maintenance(&self) -> &Maintenance {
        &self.maintenance
    }

    pub(super) fn denials(&self) -> &DenialLog<S> {
        &self.denials
    }

    pub(super) fn escrow(&self) -> &Escrow {
        &self.escrow
    }

    /// The group commit's lane for the next round charging a shared budget, and so the
    /// share of this process its calls are charged to (see `escrow`): in turn, so that each
    /// lane's share is spent at the same rate and runs out with the others.
    fn next_lane(&self) -> usize {
        self.next_lane
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % super::group_commit::LANES
    }

    /// Whether a write of `state` must first merge its unwritten calls into a fresh row:
    /// some were charged to a share that died (see `escrow`), and are to be dropped.
    pub(super) fn holds_dead_charges(&self, state: &SlotState) -> bool {
        state.unwritten.iter().any(|event| {
            event
                .charged_share()
                .is_some_and(|share| self.escrow.is_dead(share))
        })
    }

    /// Rebases `state` on `fresh` (see `SlotState::rebase`), dropping the unwritten calls
    /// charged to a dead share and giving back the units of those it drops otherwise.
    pub(super) fn rebase(&self, state: &mut SlotState, fresh: Versioned, landed: usize) -> usize {
        let dropped = state.rebase(fresh, landed, |event| {
            event
                .charged_share()
                .is_none_or(|share| !self.escrow.is_dead(share))
        });
        for event in &dropped {
            self.escrow.refund(event);
        }
        dropped.len()
    }

    /// The sessions ahead of storage and their slots, in no order.
    pub(super) fn pending_snapshot(&self) -> Vec<(Uuid, Arc<Slot>)> {
        self.pending.snapshot()
    }

    /// How many sessions are ahead of storage.
    pub(super) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The cache's entries, as moka last counted them.
    pub(super) fn cache_entries(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The clock's time at PostgreSQL's precision, so a reloaded session equals the cached
    /// one.
    pub(super) fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }

    pub(super) fn new_session(&self, req: &CreateSessionRequest) -> (TaskSession, AuditEvent) {
        let now = self.now();
        let session = TaskSession::from_request(Uuid::new_v4(), req, now);
        let event = AuditEvent::new(
            EventKind::Created,
            Vec::new(),
            &session,
            now,
            self.instance_id,
        );
        (session, event)
    }

    /// Starts the background tasks that run on their own (the listener, the upkeep) the
    /// first time the store is used inside a runtime.
    fn start_tasks(&self) {
        self.listener.ensure_started(&self.me, &*self.storage);
        self.maintenance.ensure_started(&self.me);
    }

    pub(super) async fn cache_created(&self, session: TaskSession, version: i64) -> TaskSession {
        self.start_tasks();
        let id = session.session_id;
        let slot = self.slots.get_or_make(Versioned {
            session: session.clone(),
            version,
        });
        self.cache.insert(id, slot).await;
        session
    }

    pub(super) fn create_failed(&self, session_id: Uuid, err: &StorageError) -> SessionError {
        if let StorageError::Constraint { name, .. } = err
            && name == "sessions_budget_id_fkey"
        {
            return SessionError::InvalidRequest {
                reason: "budget_id names no budget".to_owned(),
            };
        }
        self.counters.write_failed();
        let detail = error_chain(err);
        tracing::warn!(%session_id, error = %detail, "session create was not made durable");
        SessionError::StorageWriteThrough { session_id, detail }
    }

    /// Decides and writes one mutation, and records a denied call in the denial log.
    ///
    /// If the session's lock is free, the mutation runs at once. Otherwise it waits in the
    /// slot's queue until the lock holder (or this caller, once it gets the lock) decides
    /// it together with the other queued ones (see the module documentation).
    ///
    /// The whole call, waiting in the queue included, is bounded by one deadline of
    /// `storage_timeout` from its start (see `time_bounded`'s invariant). A caller whose
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
            let mut answers = self
                .run_round(id, &slot, &mut state, &[mutation], deadline)
                .await;
            return answers.pop().unwrap_or_else(|| Err(abandoned(id)));
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

    /// The slot of `id`: from the cache, else the live slot (pinned or in use), else a new
    /// one loaded from storage through the cold-load lane, by `deadline`. Concurrent misses
    /// for one id share a single load.
    pub(super) async fn slot(
        &self,
        id: Uuid,
        deadline: Instant,
    ) -> Result<Arc<Slot>, SessionError> {
        self.start_tasks();
        if let Some(slot) = self.cache.get(&id).await {
            Counters::bump(&self.counters.cache_hits);
            return Ok(slot);
        }
        if self.negative_cache.contains_key(&id) {
            Counters::bump(&self.counters.negative_hits);
            return Err(SessionError::NotFound(id));
        }
        Counters::bump(&self.counters.cache_misses);
        let loaded = self
            .cache
            .try_get_with(id, async {
                // A live slot first: storage may hold an older state than this process
                // (see `slot`'s invariant).
                if let Some(slot) = self.slots.get(id) {
                    return Ok(slot);
                }
                match self.load_cold(id, deadline).await {
                    // A slot made while we read storage wins over what we read.
                    Ok(Some(stored)) => Ok(self.slots.get_or_make(stored)),
                    Ok(None) => Err(LoadError::NotFound),
                    Err(err) => Err(LoadError::Read(err)),
                }
            })
            .await;
        match loaded {
            Ok(slot) => Ok(slot),
            Err(err) => match &*err {
                LoadError::NotFound => {
                    self.negative_cache.insert(id, ()).await;
                    Err(SessionError::NotFound(id))
                }
                LoadError::Read(err) => Err(read_failed(Some(id), err)),
            },
        }
    }

    /// Loads `id` from storage once the cold-load lane has room, by `deadline`.
    async fn load_cold(
        &self,
        id: Uuid,
        deadline: Instant,
    ) -> Result<Option<Versioned>, StorageError> {
        let storage = &self.storage;
        storage
            .by(deadline, async {
                // The lane is never closed.
                let _lane = self
                    .cold_loads
                    .acquire()
                    .await
                    .map_err(|_| storage.timed_out())?;
                storage.load(id).await
            })
            .await
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
        let answers = self.run_round(id, slot, state, &mutations, deadline).await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that gave up no longer listens.
            let _ = reply.send(answer);
        }
    }

    /// Decides and writes `mutations` as one round with the session's lock held, records
    /// the calls it denied in the denial log, and answers each mutation, in order. Every
    /// mutation goes through here, alone (a free lock) or combined (a queue).
    async fn run_round(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mutations: &[Mutation<'_>],
        deadline: Instant,
    ) -> Vec<Answer> {
        let now = self.now();
        let answers = self
            .mutate_locked(id, slot, state, mutations, now, deadline)
            .await;
        for (answer, mutation) in answers.iter().zip(mutations) {
            if let (Err(err), Mutation::Use { tools, agent, .. }) = (answer, mutation) {
                self.denials.record(&state.current, tools, *agent, err, now);
            }
        }
        answers
    }

    /// Decides `mutations` in order at `now` and writes them as one update by `deadline`,
    /// with the session's lock held. One answer per mutation, in order.
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
        let mut first = true;
        // The same lane for the round decided again: its share was found closed, and the
        // lane's account takes a new one.
        let lane = self.next_lane();
        loop {
            let mut hold = match Round::cost(&state.current, mutations, now) {
                Some((budget, units)) => Some(
                    self.escrow
                        .hold(
                            &self.me,
                            &self.storage,
                            (&budget, lane),
                            units,
                            now,
                            deadline,
                        )
                        .await,
                ),
                None => None,
            };
            // Dropping the hold, here or where the caller went away, gives back what the
            // round did not spend.
            let written = self
                .decide_and_write(
                    id,
                    slot,
                    state,
                    mutations,
                    now,
                    deadline,
                    hold.as_mut(),
                    first,
                )
                .await;
            match written {
                Some(answers) => return answers,
                // A share the round charged was closed: nothing was written. Once more,
                // on a new share.
                None => first = false,
            }
        }
    }

    /// [`Self::mutate_locked`] once the round's shared-budget units are held: the calls
    /// spend from `hold`, and what they did not spend goes back when it is dropped.
    /// `None` when the write was refused because a share it charged is closed (a limit was
    /// lowered, or the lease ran out) and `retry` allows deciding the round again: that
    /// share is marked dead and nothing changed.
    #[expect(
        clippy::too_many_arguments,
        reason = "the round, its lock and its hold"
    )]
    async fn decide_and_write(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mutations: &[Mutation<'_>],
        now: DateTime<Utc>,
        deadline: Instant,
        mut hold: Option<&mut Hold>,
        retry: bool,
    ) -> Option<Vec<Answer>> {
        let round = Round::decide(
            &state.current,
            mutations,
            now,
            self.instance_id,
            hold.as_deref_mut(),
        );
        let Some(next) = round.next() else {
            return Some(round.answers());
        };
        // Calls charged to a dead share cannot land: merge into the fresh row, which drops
        // them, rather than write and be refused.
        if !self.holds_dead_charges(state) {
            let written = self
                .commits
                .write(
                    next,
                    state.durable_version,
                    &state.events_with(round.events()),
                    now,
                    deadline,
                    hold.as_deref().and_then(Hold::lane),
                )
                .await;
            match written {
                Ok(UpdateOutcome::Applied(version)) => {
                    return Some(self.applied(id, slot, state, round, version));
                }
                Ok(UpdateOutcome::Conflict) => self.counters.conflict(),
                Err(err) if retry && self.share_closed(&err) => return None,
                Err(err) => return Some(self.write_failed(id, slot, state, round, &err)),
            }
        }
        if let Some(hold) = hold.as_deref_mut() {
            hold.restart();
        }

        // The round decided under the row lock. It is kept outside the closure, not handed
        // back in the result: the deadline may drop the future after the decision, with
        // its write's outcome unknown, and the round must then still go ahead in the cache.
        let mut decided = None;
        let probe = state.unwritten_keys();
        let locked = self
            .storage
            .by(
                deadline,
                self.storage
                    .update_locked(id, &probe, LockWait::Wait, |fresh, landed| {
                        // Dropped calls were denied to their callers; this round's events (if
                        // any) carry the merged counters.
                        self.rebase(state, fresh, landed);
                        let round =
                            Round::decide(&state.current, mutations, now, self.instance_id, hold);
                        let write = round
                            .next()
                            .cloned()
                            .map(|next| (next, state.events_with(round.events()).into_owned()));
                        decided = Some(round);
                        write
                    }),
            )
            .await;
        if !state.is_ahead() {
            // The locked read showed that everything unwritten had landed after all.
            self.unpin(id, slot, state);
        }
        Some(match (locked, decided) {
            (Err(err), Some(round))
                if retry && round.next().is_some() && self.share_closed(&err) =>
            {
                return None;
            }
            (Ok(LockedUpdate::Missing), _) => {
                self.forget(id, slot, state).await;
                mutations
                    .iter()
                    .map(|_| Err(SessionError::NotFound(id)))
                    .collect()
            }
            (Ok(LockedUpdate::Applied(version)), Some(round)) if round.next().is_some() => {
                self.applied(id, slot, state, round, version)
            }
            (Ok(LockedUpdate::Declined), Some(round)) if round.next().is_none() => round.answers(),
            (Err(err), Some(round)) if round.next().is_some() => {
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
        })
    }

    /// Whether `err` is a write refused because a share it charged is closed; if so, that
    /// share is marked dead (its calls that are not written are dropped at reconcile).
    fn share_closed(&self, err: &StorageError) -> bool {
        if let StorageError::ShareClosed { share_id } = err {
            self.escrow.mark_dead(*share_id);
            true
        } else {
            false
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
        for event in round.events() {
            // Units charged: calls' costs and overruns (a release takes nothing back).
            if let (Some(budget), Some(cost)) = (&event.budget_id, event.cost)
                && let Ok(units) = u64::try_from(cost)
            {
                crate::metrics::charged(budget, units);
            }
        }
        if let (Some(next), _) = round.take_changes() {
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
    /// new place in the cache: it is the session's only slot (see `slot`), so a lookup
    /// that misses the cache finds it.
    fn write_failed(
        &self,
        id: Uuid,
        slot: &Arc<Slot>,
        state: &mut SlotState,
        mut round: Round,
        err: &StorageError,
    ) -> Vec<Answer> {
        self.share_closed(err);
        let (next, events) = round.take_changes();
        if let Some(next) = next {
            state.current = next;
        }
        state.unwritten.extend(events);
        self.counters.write_failed();
        self.pin(id, slot, state);
        let detail = error_chain(err);
        tracing::warn!(session_id = %id, error = %detail, "write-through failed; cache is ahead of storage");
        round.answers_after_failure(id, &detail)
    }

    /// The session's stored status changed elsewhere: drop it from the cache and have the
    /// next `get` reload its live slot.
    pub(super) async fn invalidate(&self, id: Uuid) {
        self.slots.mark_stale(id);
        self.cache.invalidate(&id).await;
    }

    /// Changes may have been missed: treat every session as stale.
    pub(super) fn invalidate_all(&self) {
        self.slots.mark_all_stale();
        self.cache.invalidate_all();
    }

    /// A slot whose state is ahead of storage: pin it in the pending set and wake the
    /// reconciler. Nothing here awaits, so a cancelled caller cannot leave a pinned slot
    /// without a reconciler.
    pub(super) fn pin(&self, id: Uuid, slot: &Arc<Slot>, state: &mut SlotState) {
        state.pinned = true;
        self.pending.insert(id, Arc::clone(slot));
        self.reconciler.wake(&self.me);
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
        self.slots.remove(id, slot);
        self.cache.remove(&id).await;
    }
}
