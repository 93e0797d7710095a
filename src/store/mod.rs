//! [`SessionStore`]: the moka cache in front of a [`Storage`], with write-through
//! (`write_through`), per-session serialization (`slot`), one slot per session
//! (`registry`), the pending set (`pending`), the reconciler (`reconciler`), cache
//! invalidation (`invalidation`), group commit (`group_commit`), the denial log
//! (`denials`) and one deadline per call (`deadline`). Each of those modules states its
//! own invariant.
//!
//! # Invariants owned here
//! * **Budget.** Every `Ok` is a versioned write over the state it was decided from, and
//!   storage refuses `calls_made > call_budget`, so the `Ok` calls of a session, summed over
//!   every process, never exceed its budget or its rate window's limit.
//! * **Monotonic status.** Closed or expired never becomes active again, in the cache
//!   (policy never reopens; merges keep the terminal status) or in storage (a trigger).
//! * **Isolation.** Only a session's own async mutex is held across an await; the pending
//!   set's and the slot registry's locks are held for map operations only, and a cache
//!   lookup never waits for another session.
//!
//! # Concurrent calls on the same session
//! They are serialized in this process by the slot's mutex, in arrival order (tokio's mutex
//! is fair); across processes by the versioned write.

mod deadline;
mod denials;
mod group_commit;
mod invalidation;
mod pending;
mod reconciler;
mod registry;
mod slot;
mod stats;
mod write_through;

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use moka::future::Cache;
use tokio::sync::watch;
use uuid::Uuid;

pub use reconciler::{ReconcileReport, ShutdownReport};
pub use stats::StoreStats;

use self::deadline::Deadline;
use self::denials::DenialBuffer;
use self::pending::PendingSet;
use self::registry::Slots;
use self::slot::Slot;
use self::stats::Counters;
use crate::audit::{AuditEvent, EventKind};
use crate::clock::{Clock, SystemClock};
use crate::error::{SessionError, StorageError, error_chain};
use crate::model::{CreateSessionRequest, TaskSession};
use crate::policy::Mutation;
use crate::storage::{CapOutcome, PgStorage, Storage, Versioned};

/// Default cache capacity, in sessions.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
/// Default time a cached session stays without being used. Pending sessions are pinned
/// regardless.
pub const DEFAULT_CACHE_IDLE: Duration = Duration::from_secs(300);
/// Default first delay before the reconciler retries a pending session; it doubles on
/// each failed pass up to [`MAX_RECONCILE_BACKOFF`].
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest delay between two reconciler passes while sessions are pending.
pub const MAX_RECONCILE_BACKOFF: Duration = Duration::from_secs(10);

/// Default deadline for one storage operation.
pub const DEFAULT_STORAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound of the buffer of denied calls waiting to be recorded.
pub const DEFAULT_DENIAL_BUFFER: usize = 10_000;
/// Default number of unknown session ids remembered.
pub const DEFAULT_NEGATIVE_CAPACITY: u64 = 10_000;
/// Default time an unknown session id is remembered.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Sessions `expire_due` asks storage for at a time.
const EXPIRE_BATCH: u32 = 512;

/// Builds a [`SessionStore`]. Obtained from [`SessionStore::builder`].
#[derive(Debug)]
#[must_use]
pub struct SessionStoreBuilder<S> {
    storage: S,
    cache_capacity: u64,
    cache_idle: Duration,
    clock: Arc<dyn Clock>,
    reconcile_interval: Duration,
    instance_id: Uuid,
    storage_timeout: Duration,
    negative_capacity: u64,
    negative_ttl: Duration,
    listen_for_changes: bool,
    denial_buffer: usize,
}

impl<S: Storage> SessionStoreBuilder<S> {
    /// Longest wait for any one storage operation (default [`DEFAULT_STORAGE_TIMEOUT`]),
    /// connection acquisition included. Past it, a mutation returns `StorageWriteThrough`
    /// (its change stays counted and pending) and a read returns `StorageRead`: a stalled
    /// PostgreSQL never stalls the gateway for longer.
    pub fn storage_timeout(mut self, timeout: Duration) -> Self {
        self.storage_timeout = timeout;
        self
    }

    /// Whether to listen to the storage's change feed (default `true`; PostgreSQL's is
    /// LISTEN/NOTIFY, one connection per store) and drop sessions whose status another
    /// process or an operator changed. Without it, such a change is seen at this store's
    /// next write of the session (a version conflict) or when the entry leaves the cache.
    pub fn listen_for_changes(mut self, listen: bool) -> Self {
        self.listen_for_changes = listen;
        self
    }

    /// Most denied calls waiting to be recorded (default [`DEFAULT_DENIAL_BUFFER`]). Denials
    /// are written in batches off the hot path; past this bound they are dropped and
    /// counted in `stats().denials_dropped`.
    pub fn denial_buffer(mut self, denials: usize) -> Self {
        self.denial_buffer = denials;
        self
    }

    /// Remember up to `capacity` ids found missing for `ttl` (defaults
    /// [`DEFAULT_NEGATIVE_CAPACITY`] and [`DEFAULT_NEGATIVE_TTL`]), answering `NotFound`
    /// for them without a storage round trip. A capacity of 0 disables it.
    pub fn negative_cache(mut self, capacity: u64, ttl: Duration) -> Self {
        self.negative_capacity = capacity;
        self.negative_ttl = ttl;
        self
    }

    /// Most sessions kept in the cache (default [`DEFAULT_CACHE_CAPACITY`]). Memory stays
    /// bounded by this plus the pending set.
    pub fn cache_capacity(mut self, sessions: u64) -> Self {
        self.cache_capacity = sessions;
        self
    }

    /// How long an unused session stays cached (default [`DEFAULT_CACHE_IDLE`]). This only
    /// reclaims memory; whether a session is expired is always decided by the clock.
    pub fn cache_idle(mut self, idle: Duration) -> Self {
        self.cache_idle = idle;
        self
    }

    /// The clock every decision reads (default [`SystemClock`]). Tests pass a
    /// [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// First retry delay of the reconciler (default [`DEFAULT_RECONCILE_INTERVAL`]).
    pub fn reconcile_interval(mut self, interval: Duration) -> Self {
        self.reconcile_interval = interval;
        self
    }

    /// The id this process writes into every audit event (default: random per store).
    pub fn instance_id(mut self, instance_id: Uuid) -> Self {
        self.instance_id = instance_id;
        self
    }

    /// Builds the store. Starts no task: the reconciler runs only while sessions are
    /// pending, so a store may be built outside a tokio runtime.
    pub fn build(self) -> SessionStore<S> {
        let counters = Arc::new(Counters::default());
        let evictions = Arc::clone(&counters);
        let cache = Cache::builder()
            .max_capacity(self.cache_capacity)
            .time_to_idle(self.cache_idle)
            // Counting only: persistence never depends on this lazy listener.
            .eviction_listener(move |_, _, cause| {
                if cause.was_evicted() {
                    Counters::bump(&evictions.evictions);
                }
            })
            .build();
        SessionStore {
            inner: Arc::new_cyclic(|me| Inner {
                storage: Deadline {
                    inner: self.storage,
                    after: self.storage_timeout,
                },
                missing: Cache::builder()
                    .max_capacity(self.negative_capacity)
                    .time_to_live(self.negative_ttl)
                    .build(),
                clock: self.clock,
                cache,
                slots: Arc::default(),
                pending: PendingSet::default(),
                counters,
                instance_id: self.instance_id,
                reconcile_interval: self.reconcile_interval,
                reconciler_running: AtomicBool::new(false),
                reconcile_passes: AtomicUsize::new(0),
                me: me.clone(),
                listen_for_changes: self.listen_for_changes,
                listener_started: AtomicBool::new(false),
                dropped: watch::Sender::new(()),
                denials: DenialBuffer::new(self.denial_buffer),
                denial_flusher_running: AtomicBool::new(false),
                commits: group_commit::GroupCommit::default(),
            }),
        }
    }
}

/// Durable task sessions: a moka cache written through to a [`Storage`].
///
/// Cloning is shallow: clones share the cache, the pending set and the storage. The store
/// is `Send + Sync` and its futures are `Send`, so gateways call it from any tokio task.
///
/// # Errors
/// Every method returns a [`SessionError`]. A mutation that could not be made durable
/// returns [`SessionError::StorageWriteThrough`]: deny that call; the store keeps it
/// counted and reconciles. A failed read is [`SessionError::StorageRead`], never
/// [`SessionError::NotFound`].
#[derive(Debug)]
pub struct SessionStore<S: Storage = PgStorage> {
    inner: Arc<Inner<S>>,
}

impl<S: Storage> Clone for SessionStore<S> {
    fn clone(&self) -> Self {
        SessionStore {
            inner: Arc::clone(&self.inner),
        }
    }
}

pub(crate) struct Inner<S> {
    storage: Deadline<S>,
    /// Ids recently found missing, so a flood of requests for unknown sessions costs one
    /// load per id per `negative_ttl`, not one per request. Bounded; ids are random v4, so
    /// an id is never created after it was looked up.
    missing: Cache<Uuid, ()>,
    clock: Arc<dyn Clock>,
    cache: Cache<Uuid, Arc<Slot>>,
    /// Every live slot, one per session: where a lookup that misses the cache looks first.
    slots: Arc<Slots>,
    pending: PendingSet,
    counters: Arc<Counters>,
    instance_id: Uuid,
    reconcile_interval: Duration,
    /// True while a reconciler task exists; it exits when the pending set drains, so an
    /// idle store runs no background work.
    reconciler_running: AtomicBool,
    /// Reconciliation passes so far: where in the pending set the next pass starts.
    reconcile_passes: AtomicUsize,
    /// The store itself, for spawning background tasks with a reference that does not keep
    /// the store alive.
    me: Weak<Inner<S>>,
    listen_for_changes: bool,
    listener_started: AtomicBool,
    /// Dropped with the store; its receivers tell background tasks to stop.
    dropped: watch::Sender<()>,
    denials: DenialBuffer,
    /// True while the denial flusher task exists; it exits when the buffer is empty.
    denial_flusher_running: AtomicBool,
    /// Writes waiting for the next group commit.
    commits: group_commit::GroupCommit,
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

impl SessionStore<PgStorage> {
    /// A store over PostgreSQL with default options. Run [`crate::migrate`] first.
    pub fn postgres(pool: sqlx::PgPool) -> Self {
        SessionStore::new(PgStorage::new(pool))
    }
}

impl<S: Storage> SessionStore<S> {
    /// A store with default options.
    pub fn new(storage: S) -> Self {
        Self::builder(storage).build()
    }

    /// A builder over `storage`.
    pub fn builder(storage: S) -> SessionStoreBuilder<S> {
        SessionStoreBuilder {
            storage,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            cache_idle: DEFAULT_CACHE_IDLE,
            clock: Arc::new(SystemClock),
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            instance_id: Uuid::new_v4(),
            storage_timeout: DEFAULT_STORAGE_TIMEOUT,
            negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            listen_for_changes: true,
            denial_buffer: DEFAULT_DENIAL_BUFFER,
        }
    }

    /// The storage behind the store.
    pub fn storage(&self) -> &S {
        &self.inner.storage.inner
    }

    /// The id this store writes into audit events.
    pub fn instance_id(&self) -> Uuid {
        self.inner.instance_id
    }

    /// Creates a session.
    ///
    /// # Errors
    /// [`SessionError::InvalidRequest`] if the request is out of bounds (nothing written);
    /// [`SessionError::StorageWriteThrough`] if the insert failed. A failed create is not
    /// cached or retried: the caller got no session to use. (If the failure was ambiguous
    /// and the insert did commit, the session exists unused until its time limit.)
    pub async fn create(&self, req: CreateSessionRequest) -> Result<TaskSession, SessionError> {
        req.validate()?;
        let (session, event) = self.inner.new_session(&req);
        match self.inner.storage.insert(&session, &event).await {
            Ok(version) => Ok(self.inner.cache_created(session, version).await),
            Err(err) => Err(self.inner.create_failed(session.session_id, &err)),
        }
    }

    /// Creates a session unless its agent already has `max` live sessions (active and not
    /// past their time limit), decided inside storage across every process.
    ///
    /// # Errors
    /// [`SessionError::TooManySessions`] at the cap; otherwise as [`Self::create`].
    pub async fn create_if_under_cap(
        &self,
        req: CreateSessionRequest,
        max: u64,
    ) -> Result<TaskSession, SessionError> {
        req.validate()?;
        let (session, event) = self.inner.new_session(&req);
        let now = event.occurred_at;
        match self
            .inner
            .storage
            .insert_if_under_cap(&session, &event, max, now)
            .await
        {
            Ok(CapOutcome::Created(version)) => {
                Ok(self.inner.cache_created(session, version).await)
            }
            Ok(CapOutcome::AtCap { current }) => Err(SessionError::TooManySessions {
                agent_id: req.agent_id.to_string(),
                max,
                current,
            }),
            Err(err) => Err(self.inner.create_failed(session.session_id, &err)),
        }
    }

    /// Counts one call of `tool` against the session, if policy allows it.
    ///
    /// `agent` is the presenting agent; `None` skips the binding check, for trusted
    /// internal callers only. Checks run in the order documented in [`crate::policy`]'s
    /// module: agent, closed, expired, budget, tool, rate.
    ///
    /// # Errors
    /// The policy denial (nothing consumed), [`SessionError::NotFound`],
    /// [`SessionError::StorageRead`], or [`SessionError::StorageWriteThrough`] (deny the
    /// call; it stays counted).
    pub async fn use_session(
        &self,
        session_id: Uuid,
        tool: &str,
        agent: Option<Uuid>,
    ) -> Result<TaskSession, SessionError> {
        let tools = [tool];
        self.inner
            .mutate(
                session_id,
                Mutation::Use {
                    tools: &tools,
                    agent,
                },
            )
            .await
            .map(|m| m.session)
    }

    /// Counts one call per entry of `tools`, all or nothing: one unauthorized tool, or a
    /// budget or window without room for all of them, consumes nothing. At most
    /// [`limits::MAX_TOOLS`](crate::model::limits::MAX_TOOLS) tools; an empty batch is
    /// [`SessionError::InvalidRequest`].
    ///
    /// # Errors
    /// As [`Self::use_session`].
    pub async fn use_session_batch(
        &self,
        session_id: Uuid,
        tools: &[&str],
        agent: Option<Uuid>,
    ) -> Result<TaskSession, SessionError> {
        self.inner
            .mutate(session_id, Mutation::Use { tools, agent })
            .await
            .map(|m| m.session)
    }

    /// Closes the session. Closed is final.
    ///
    /// # Errors
    /// [`SessionError::AlreadyClosed`], [`SessionError::Expired`] (already marked
    /// expired), [`SessionError::NotFound`], or a storage error.
    pub async fn close(&self, session_id: Uuid) -> Result<TaskSession, SessionError> {
        self.inner
            .mutate(session_id, Mutation::Close)
            .await
            .map(|m| m.session)
    }

    /// The session as this store knows it: the cached state (which may be ahead of
    /// storage), loading it on a miss. It waits for a mutation of the same session that is
    /// in flight, so it reads its own writes; the whole call takes at most
    /// `storage_timeout`.
    ///
    /// # Errors
    /// [`SessionError::NotFound`] or [`SessionError::StorageRead`] (storage unavailable, or
    /// a write of this session in flight did not finish in time).
    pub async fn get(&self, session_id: Uuid) -> Result<TaskSession, SessionError> {
        let deadline = self.inner.storage.for_call();
        let slot = self.inner.slot(session_id).await?;
        let storage = &self.inner.storage;
        let mut state = storage
            .by(deadline, async { Ok(slot.state.lock().await) })
            .await
            .map_err(|err| read_failed(Some(session_id), &err))?;
        // The change feed said the row changed: read it again, unless our state is ahead
        // (the next write merges then). Under the lock, no write of ours interleaves.
        if slot.take_stale() && !state.is_ahead() {
            match storage.by(deadline, storage.load(session_id)).await {
                Ok(Some(fresh)) => {
                    state.rebase(fresh, 0);
                }
                Ok(None) => {
                    self.inner.forget(session_id, &slot, &mut state).await;
                    return Err(SessionError::NotFound(session_id));
                }
                Err(err) => {
                    slot.mark_stale();
                    return Err(read_failed(Some(session_id), &err));
                }
            }
        }
        Ok(state.current.clone())
    }

    /// Live sessions (active, not past their time limit) of `agent_id`, counted in storage
    /// across every process.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`].
    pub async fn count_active_for_agent(&self, agent_id: Uuid) -> Result<u64, SessionError> {
        let now = self.inner.now();
        self.inner
            .storage
            .count_live_for_agent(agent_id, now)
            .await
            .map_err(|err| read_failed(None, &err))
    }

    /// Closes every active session of `agent_id`; returns how many this call closed.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`] if the sessions could not be listed. Otherwise every
    /// session is attempted; if any close failed to write, the first such error is
    /// returned after the others were closed.
    pub async fn close_sessions_for_agent(&self, agent_id: Uuid) -> Result<usize, SessionError> {
        let ids = self
            .inner
            .storage
            .active_for_agent(agent_id)
            .await
            .map_err(|err| read_failed(None, &err))?;
        let mut closed = 0;
        let mut first_failure = None;
        for id in ids {
            match self.inner.mutate(id, Mutation::Close).await {
                Ok(_) => closed += 1,
                // Closed, expired or deleted meanwhile: nothing left to do for it.
                Err(
                    SessionError::AlreadyClosed(_)
                    | SessionError::Expired(_)
                    | SessionError::NotFound(_),
                ) => {}
                Err(err) => {
                    first_failure.get_or_insert(err);
                }
            }
        }
        first_failure.map_or(Ok(closed), Err)
    }

    /// Marks every active session past its time limit as expired (nothing is deleted);
    /// returns how many this call marked.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`] if due sessions could not be listed, or the first
    /// [`SessionError::StorageWriteThrough`] (that session is pending and the reconciler
    /// will write its expiry).
    pub async fn expire_due(&self) -> Result<usize, SessionError> {
        let mut expired = 0;
        loop {
            let now = self.inner.now();
            let due = self
                .inner
                .storage
                .due_for_expiry(now, EXPIRE_BATCH)
                .await
                .map_err(|err| read_failed(None, &err))?;
            let batch_len = due.len();
            let mut progressed = 0;
            for id in due {
                match self.inner.mutate(id, Mutation::Expire).await {
                    Ok(m) if m.changed => progressed += 1,
                    Ok(_) | Err(SessionError::NotFound(_)) => {}
                    Err(err) => return Err(err),
                }
            }
            expired += progressed;
            // A short batch was the last one; a batch with no progress would come back
            // unchanged (its sessions are ahead in this cache), so stop rather than spin.
            if batch_len < EXPIRE_BATCH as usize || progressed == 0 {
                return Ok(expired);
            }
        }
    }

    /// Counters for metrics. `cache_entries` lags until moka's housekeeping runs.
    pub fn stats(&self) -> StoreStats {
        let pending = u64::try_from(self.inner.pending.len()).unwrap_or(u64::MAX);
        self.inner
            .counters
            .snapshot(self.inner.cache.entry_count(), pending)
    }

    /// Runs one reconciliation pass now, without waiting for the background task: tries to
    /// write every pending session once.
    pub async fn reconcile_now(&self) -> ReconcileReport {
        self.inner.reconcile_pass().await
    }

    /// Flushes the pending set and the buffered denials, retrying until both are empty or
    /// `within` has passed, and reports what it could not make durable. Call before the
    /// process exits; the store remains usable afterwards.
    pub async fn shutdown(&self, within: Duration) -> ShutdownReport {
        self.inner.flush(within).await
    }
}

fn read_failed(session_id: Option<Uuid>, err: &StorageError) -> SessionError {
    let detail = error_chain(err);
    tracing::warn!(session_id = ?session_id, error = %detail, "session storage read failed");
    SessionError::StorageRead { session_id, detail }
}

impl<S: Storage> Inner<S> {
    /// The clock's time at PostgreSQL's precision, so a reloaded session equals the cached
    /// one.
    fn now(&self) -> DateTime<Utc> {
        self.clock.now().trunc_subsecs(6)
    }

    fn new_session(&self, req: &CreateSessionRequest) -> (TaskSession, AuditEvent) {
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

    async fn cache_created(&self, session: TaskSession, version: i64) -> TaskSession {
        self.ensure_listener();
        let id = session.session_id;
        let slot = self.slots.get_or_make(Versioned {
            session: session.clone(),
            version,
        });
        self.cache.insert(id, slot).await;
        session
    }

    fn create_failed(&self, session_id: Uuid, err: &StorageError) -> SessionError {
        Counters::bump(&self.counters.write_failures);
        let detail = error_chain(err);
        tracing::warn!(%session_id, error = %detail, "session create was not made durable");
        SessionError::StorageWriteThrough { session_id, detail }
    }

    /// The slot of `id`: from the cache, else the live slot (pinned or in use), else a new
    /// one loaded from storage. Concurrent misses for one id share a single load.
    async fn slot(&self, id: Uuid) -> Result<Arc<Slot>, SessionError> {
        self.ensure_listener();
        if let Some(slot) = self.cache.get(&id).await {
            Counters::bump(&self.counters.cache_hits);
            return Ok(slot);
        }
        if self.missing.contains_key(&id) {
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
                match self.storage.load(id).await {
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
                    self.missing.insert(id, ()).await;
                    Err(SessionError::NotFound(id))
                }
                LoadError::Read(err) => Err(read_failed(Some(id), err)),
            },
        }
    }
}
