//! The state every handle of a [`SessionStore`](crate::SessionStore) shares, and the one
//! lookup every call starts with: from a session id to its slot.
//!
//! # Invariant: isolation
//! Only a session's own async mutex is held across an await; the pending set's and the
//! slot registry's locks are held for map operations only, and a cache lookup never waits
//! for another session.
//!
//! # Invariant: lookups of uncached ids take a bounded share of storage
//! An agent chooses the session id it presents, so it can make every request miss the
//! cache (random ids). At most `cold_loads` loads from storage run at once (the cold-load
//! lane, smaller than a pool); the others wait for the lane within their call's deadline.
//! So however many such lookups arrive, the writes of cached sessions keep the rest of the
//! storage's connections.

use std::sync::{Arc, Weak};

use chrono::{DateTime, SubsecRound as _, Utc};
use moka::future::Cache;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use uuid::Uuid;

use super::deadline::Deadline;
use super::denial_log::DenialLog;
use super::group_commit::GroupCommit;
use super::listener::Listener;
use super::maintenance::Maintenance;
use super::pending::PendingSet;
use super::reconciler::Reconciler;
use super::registry::Slots;
use super::slot::{Slot, SlotState};
use super::stats::Counters;
use crate::audit::{AuditEvent, EventKind};
use crate::clock::Clock;
use crate::error::{SessionError, StorageError, error_chain};
use crate::model::{CreateSessionRequest, TaskSession};
use crate::storage::{Storage, Versioned};

pub(crate) struct Inner<S> {
    pub(super) storage: Arc<Deadline<S>>,
    /// The negative cache: ids recently found missing, so a flood of requests for unknown
    /// sessions costs one load per id per TTL, not one per request. Bounded; ids are random
    /// v4, so an id is never created after it was looked up.
    pub(super) negative_cache: Cache<Uuid, ()>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) cache: Cache<Uuid, Arc<Slot>>,
    /// Every live slot, one per session: where a lookup that misses the cache looks first.
    pub(super) slots: Arc<Slots>,
    /// The cold-load lane: permits for loads from storage on a cache miss.
    pub(super) cold_loads: Semaphore,
    pub(super) pending: PendingSet,
    pub(super) counters: Arc<Counters>,
    pub(super) instance_id: Uuid,
    /// The store itself, for the background tasks, which must not keep it alive.
    pub(super) me: Weak<Inner<S>>,
    pub(super) commits: Arc<GroupCommit<S>>,
    pub(super) reconciler: Reconciler,
    pub(super) denials: Arc<DenialLog<S>>,
    pub(super) listener: Listener,
    pub(super) maintenance: Maintenance,
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

impl<S: Storage> Inner<S> {
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
        self.counters.write_failed();
        let detail = error_chain(err);
        tracing::warn!(%session_id, error = %detail, "session create was not made durable");
        SessionError::StorageWriteThrough { session_id, detail }
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
                // (see `registry`'s invariant).
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
