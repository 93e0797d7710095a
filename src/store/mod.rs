//! [`SessionStore`]: the moka cache in front of a [`Storage`], written through.
//!
//! This file is the facade: the public calls, each a few lines over the components. They
//! are, one file each, with the invariant each owns stated at its top:
//! * `builder`: the options and their defaults;
//! * `inner`: the shared state, the lookup from id to slot, and write-through: deciding and
//!   writing under the session's lock, combining queued mutations (isolation, the bounded
//!   cold loads, write-through);
//! * `round`: the mutations of one session decided together, and their answers;
//! * `slot`: one live slot per session, and one session's state and queue; `queued`: the
//!   mutations waiting in that queue;
//! * `group_commit`: the writes of different sessions sharing one statement;
//! * `pending`: sessions ahead of storage (pinning); `reconciler`: writing them later;
//! * `denial_log`: denied calls recorded off the hot path;
//! * `escrow`: this process's shares of the shared budgets, and the hold each round
//!   takes from them (a process never spends a unit it was not granted; no unit
//!   stranded);
//! * `listener`: cache invalidation from the change feed; `maintenance`: the storage's
//!   periodic upkeep (for PostgreSQL, the audit trail's partitions and the rollups);
//! * `time_bounded`: storage bounded in time, one deadline per call; `worker`: how every
//!   background task starts, parks and ends; `stats`: the counters.
//!
//! `docs/architecture.md` follows one call through all of them.
//!
//! # Invariants owned here
//! * **Budget.** Every `Ok` is a versioned write over the state it was decided from, and
//!   storage refuses `calls_made > call_budget`, so the `Ok` calls of a session, summed over
//!   every process, never exceed its budget or its rate window's limit.
//! * **Monotonic status.** Closed or expired never becomes active again, in the cache
//!   (policy never reopens; merges keep the terminal status) or in storage (a trigger).
//!
//! # Concurrent calls on the same session
//! They are serialized in this process by the slot's mutex, in arrival order (tokio's mutex
//! is fair); across processes by the versioned write.

mod builder;
mod denial_log;
mod escrow;
mod group_commit;
mod inner;
mod listener;
mod maintenance;
mod pending;
mod queued;
mod reconciler;
mod round;
mod slot;
mod stats;
mod time_bounded;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use uuid::Uuid;

pub use builder::SessionStoreBuilder;
pub use reconciler::ReconcileReport;
pub use stats::StoreStats;

use self::inner::{Inner, read_failed};
use crate::budget::{self, BudgetId, BudgetTerms, BudgetUsage, BudgetWrite};
use crate::error::{SessionError, StorageError};
use crate::http::status::{BudgetLeft, Status};
use crate::metrics::{self, Gauge, UseTimer};
use crate::model::{
    CreateSessionRequest, Reservation, SessionStatus, SessionSummary, Settlement, TaskSession,
};
use crate::policy::{Mutation, Reserve, Settle};
use crate::session_token::SessionToken;
use crate::storage::{CapOutcome, PgStorage, Storage};

/// Sessions `expire_due` asks storage for at a time.
const EXPIRE_BATCH: u32 = 512;

/// What [`SessionStore::shutdown`] could not make durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Sessions whose cached state is still ahead of storage: their last changes are lost
    /// if the process exits now (only calls that were denied with `StorageWriteThrough`).
    pub unflushed: Vec<Uuid>,
    /// Denied calls still waiting to be recorded in the audit trail.
    pub unrecorded_denials: usize,
}

impl ShutdownReport {
    /// Whether every pending session and every denial was made durable.
    pub fn is_clean(&self) -> bool {
        self.unflushed.is_empty() && self.unrecorded_denials == 0
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
    /// How long a reservation stays open before it lapses at its estimate.
    reservation_ttl: chrono::Duration,
}

impl<S: Storage> Clone for SessionStore<S> {
    fn clone(&self) -> Self {
        SessionStore {
            inner: Arc::clone(&self.inner),
            reservation_ttl: self.reservation_ttl,
        }
    }
}

impl SessionStore<PgStorage> {
    /// A store over PostgreSQL with default options. Run [`crate::migrate`] first.
    pub fn postgres(pool: sqlx::PgPool) -> Self {
        SessionStore::new(PgStorage::new(pool))
    }

    /// Creates budget `id` with `terms`, or replaces the terms of the existing one. New
    /// terms take effect for the next grant of units; a budget's period and time zone never
    /// change.
    ///
    /// # Errors
    /// [`SessionError::InvalidRequest`] (nothing written) for terms out of bounds, an
    /// unknown parent or time zone, a parent that would make a cycle or a tree deeper than
    /// [`budget::MAX_DEPTH`](crate::budget::MAX_DEPTH), or a changed period or time zone;
    /// [`SessionError::StorageRead`] if storage did not answer.
    pub async fn put_budget(
        &self,
        id: &BudgetId,
        terms: &BudgetTerms,
    ) -> Result<BudgetWrite, SessionError> {
        terms.validate(id)?;
        let storage = self.inner.storage();
        storage
            .by(storage.for_call(), storage.inner().put_budget(id, terms))
            .await
            .map_err(|err| match &err {
                StorageError::Constraint { name, .. } => SessionError::InvalidRequest {
                    reason: budget::refused_terms(name).to_owned(),
                },
                _ => read_failed(None, &err),
            })
    }

    /// Budget `id` with its current period's usage, `None` if there is no such budget.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`].
    pub async fn budget(&self, id: &BudgetId) -> Result<Option<BudgetUsage>, SessionError> {
        Ok(self.read_budgets(Some(id)).await?.into_iter().next())
    }

    /// Every budget with its current period's usage, ordered by id.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`].
    pub async fn budgets(&self) -> Result<Vec<BudgetUsage>, SessionError> {
        self.read_budgets(None).await
    }

    /// What is left of budget `id` for a call charged to it: the units left at the level
    /// of its chain (the budget and its ancestors) with the least left, with that level's
    /// limit. `None` if there is no such budget. Each level is read from storage: this is
    /// a report, never a decision (calls are decided against this process's shares).
    ///
    /// # Errors
    /// [`SessionError::StorageRead`].
    pub async fn budget_left(&self, id: &BudgetId) -> Result<Option<BudgetLeft>, SessionError> {
        let mut tightest: Option<BudgetLeft> = None;
        let mut level = Some(id.clone());
        // A chain has at most MAX_DEPTH levels; the bound also ends a cycle the schema
        // would have refused.
        for _ in 0..budget::MAX_DEPTH {
            let Some(id) = level.take() else { break };
            let Some(usage) = self.budget(&id).await? else {
                break;
            };
            let left = BudgetLeft {
                remaining: usage.remaining(),
                limit: usage.terms.limit,
            };
            if tightest.is_none_or(|t| left.remaining < t.remaining) {
                tightest = Some(left);
            }
            level = usage.terms.parent_id;
        }
        Ok(tightest)
    }

    /// What `session` came to: its counts and time from `session` (as [`Self::close`] or
    /// [`Self::get`] answered it), its denials by reason and the units it charged to its
    /// shared budget from its audit trail. This store's buffered denials are written first,
    /// so every denial it answered is counted; another process's reach the trail within
    /// its writer's interval (200 ms).
    ///
    /// # Errors
    /// [`SessionError::StorageRead`].
    pub async fn summary(&self, session: &TaskSession) -> Result<SessionSummary, SessionError> {
        self.inner.denials().write_buffered().await;
        let storage = self.inner.storage();
        let totals = storage
            .by(
                storage.for_call(),
                storage
                    .inner()
                    .trail_totals(session.session_id, session.created_at),
            )
            .await
            .map_err(|err| read_failed(Some(session.session_id), &err))?;
        let ran_until = std::cmp::min(self.inner.now(), session.expires_at);
        Ok(SessionSummary {
            calls_made: session.calls_made,
            call_budget: session.call_budget,
            time_used: std::cmp::max(ran_until - session.created_at, chrono::Duration::zero()),
            time_limit: session.time_limit,
            denials: totals.denials,
            budget_units: totals.budget_units,
        })
    }

    async fn read_budgets(&self, id: Option<&BudgetId>) -> Result<Vec<BudgetUsage>, SessionError> {
        let storage = self.inner.storage();
        storage
            .by(storage.for_call(), storage.inner().budget_usage(id))
            .await
            .map_err(|err| read_failed(None, &err))
    }
}

impl<S: Storage> SessionStore<S> {
    /// A store with default options.
    pub fn new(storage: S) -> Self {
        Self::builder(storage).build()
    }

    /// A builder over `storage`.
    pub fn builder(storage: S) -> SessionStoreBuilder<S> {
        SessionStoreBuilder::new(storage)
    }

    /// The storage behind the store.
    pub fn storage(&self) -> &S {
        self.inner.storage().inner()
    }

    /// The longest one storage operation may take (the builder's `storage_timeout`): a
    /// public call answers within a small multiple of it.
    pub fn storage_timeout(&self) -> std::time::Duration {
        self.inner.storage().after()
    }

    /// The id this store writes into audit events.
    pub fn instance_id(&self) -> Uuid {
        self.inner.instance_id()
    }

    /// The time by the store's clock: the instant it would decide a call at now.
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.now()
    }

    /// The status signals of `session` as of this store's clock (the one that decides
    /// expiry), with what is left of its shared budget when the caller knows it
    /// ([`SessionStore::budget_left`]).
    pub fn status(&self, session: &TaskSession, budget: Option<BudgetLeft>) -> Status {
        Status::of(session, self.inner.now(), budget)
    }

    /// The session whose bearer token `token` is (a [`SessionToken`]'s text, as an agent
    /// presents it), or `None` if it is the token of no session: malformed, of an unknown
    /// session, of a session without a token, or with a wrong secret (all alike, so a
    /// caller learns nothing from which). The session is answered whatever its status:
    /// deciding a call still says whether it is closed or expired.
    ///
    /// # Errors
    /// [`SessionError::StorageRead`] if the session had to be loaded and could not be.
    pub async fn authenticate(&self, token: &str) -> Result<Option<TaskSession>, SessionError> {
        let Some(id) = SessionToken::session_of(token) else {
            return Ok(None);
        };
        match self.get(id).await {
            Ok(session) => Ok(SessionToken::authenticates(token, &session).then_some(session)),
            Err(SessionError::NotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// `Ok` if `session` may still be used by this store's clock (the one that decides);
    /// else what a call of it would be answered: [`SessionError::AlreadyClosed`] or
    /// [`SessionError::Expired`]. For a request that names a session without counting a
    /// call (a proxy's `tools/list`): a call is decided by the store's own checks.
    ///
    /// # Errors
    /// As above.
    pub fn ensure_live(&self, session: &TaskSession) -> Result<(), SessionError> {
        match session.status {
            SessionStatus::Closed => Err(SessionError::AlreadyClosed(session.session_id)),
            SessionStatus::Active if session.is_live(self.inner.now()) => Ok(()),
            SessionStatus::Active | SessionStatus::Expired => {
                Err(SessionError::Expired(session.session_id))
            }
        }
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
        match self.inner.storage().insert(&session, &event).await {
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
            .storage()
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
    /// internal callers only. Checks run in this order, and the first that fails is the error:
    /// agent, closed, expired, budget, tool, rate window.
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
        self.use_tools(session_id, &[tool], agent, None).await
    }

    /// [`Self::use_session`] with the call's cost in the session's shared budget given
    /// explicitly (at most [`limits::MAX_COST`](crate::model::limits::MAX_COST)), instead
    /// of the session's `tool_costs`. A session without a shared budget ignores it.
    ///
    /// # Errors
    /// As [`Self::use_session`], and [`SessionError::SharedBudgetExceeded`] (checked last:
    /// nothing consumed) when a budget of the session's chain has no room for `cost`.
    pub async fn use_session_with_cost(
        &self,
        session_id: Uuid,
        tool: &str,
        agent: Option<Uuid>,
        cost: u64,
    ) -> Result<TaskSession, SessionError> {
        self.use_tools(session_id, &[tool], agent, Some(cost)).await
    }

    /// Counts one call per entry of `tools`, all or nothing: one unauthorized tool, or a
    /// budget or window without room for all of them, consumes nothing. At most
    /// [`limits::MAX_TOOLS`](crate::model::limits::MAX_TOOLS) tools; an empty batch is
    /// [`SessionError::InvalidRequest`]. In a session with a shared budget, the batch
    /// costs the sum of its tools' costs.
    ///
    /// # Errors
    /// As [`Self::use_session`].
    pub async fn use_session_batch(
        &self,
        session_id: Uuid,
        tools: &[&str],
        agent: Option<Uuid>,
    ) -> Result<TaskSession, SessionError> {
        self.use_tools(session_id, tools, agent, None).await
    }

    /// [`Self::use_session_batch`] with the whole batch's cost given explicitly (see
    /// [`Self::use_session_with_cost`]).
    ///
    /// # Errors
    /// As [`Self::use_session_with_cost`].
    pub async fn use_session_batch_with_cost(
        &self,
        session_id: Uuid,
        tools: &[&str],
        agent: Option<Uuid>,
        cost: u64,
    ) -> Result<TaskSession, SessionError> {
        self.use_tools(session_id, tools, agent, Some(cost)).await
    }

    async fn use_tools(
        &self,
        session_id: Uuid,
        tools: &[&str],
        agent: Option<Uuid>,
        cost: Option<u64>,
    ) -> Result<TaskSession, SessionError> {
        if cost.is_some_and(|cost| cost > crate::model::limits::MAX_COST) {
            return Err(SessionError::InvalidRequest {
                reason: format!("cost must be 0..={}", crate::model::limits::MAX_COST),
            });
        }
        self.timed_use(
            session_id,
            Mutation::Use {
                tools,
                agent,
                cost,
                reserve: None,
            },
        )
        .await
    }

    /// Makes `use_mutation` (a call, or a reservation) on `session_id`, timed for the
    /// metrics.
    async fn timed_use(
        &self,
        session_id: Uuid,
        use_mutation: Mutation<'_>,
    ) -> Result<TaskSession, SessionError> {
        let timer = UseTimer::start();
        let result = self
            .inner
            .mutate(session_id, use_mutation)
            .await
            .map(|m| m.session);
        timer.answered(&result);
        result
    }

    /// Reserves `estimate` units of the session's shared budget for a call of `tool` whose
    /// cost is known only afterwards (tokens): decided exactly like
    /// [`Self::use_session_with_cost`] with that cost, which is charged at once, and held
    /// until [`Self::settle`] charges the actual cost instead, or until the reservation
    /// lapses (after [`SessionStoreBuilder::reservation_ttl`]), settled at its estimate.
    ///
    /// # Errors
    /// As [`Self::use_session_with_cost`]; [`SessionError::InvalidRequest`] when `estimate`
    /// is 0, when the session draws on no shared budget, or when it already holds
    /// [`limits::MAX_OPEN_RESERVATIONS`](crate::model::limits::MAX_OPEN_RESERVATIONS) open
    /// reservations.
    pub async fn reserve(
        &self,
        session_id: Uuid,
        tool: &str,
        agent: Option<Uuid>,
        estimate: u64,
    ) -> Result<Reservation, SessionError> {
        // A reservation of nothing would hold no share to settle an overrun against.
        if estimate == 0 || estimate > crate::model::limits::MAX_COST {
            return Err(SessionError::InvalidRequest {
                reason: format!(
                    "a reservation's cost must be 1..={}",
                    crate::model::limits::MAX_COST
                ),
            });
        }
        let reservation_id = Uuid::new_v4();
        let reserve = Mutation::Use {
            tools: &[tool],
            agent,
            cost: Some(estimate),
            reserve: Some(Reserve {
                reservation_id,
                ttl: self.reservation_ttl,
            }),
        };
        let session = self.timed_use(session_id, reserve).await?;
        let expires_at = session
            .reservations
            .iter()
            .find(|open| open.reservation_id == reservation_id)
            .map_or(session.expires_at, |open| open.expires_at);
        Ok(Reservation {
            reservation_id,
            estimate,
            expires_at,
            session,
        })
    }

    /// Settles a reservation at its `actual` cost, once: what the estimate held beyond it
    /// goes back to the budget; what `actual` passes the estimate by is charged in full as
    /// an overrun (the work was done), even past the budget's limit. Whatever became of the
    /// session since (closed, expired), a reservation still open is settled.
    ///
    /// # Errors
    /// [`SessionError::ReservationNotFound`]; [`SessionError::ReservationSettled`] when it
    /// was settled already or lapsed; [`SessionError::InvalidRequest`] for an `actual`
    /// above [`limits::MAX_COST`](crate::model::limits::MAX_COST); a storage error.
    pub async fn settle(
        &self,
        reservation_id: Uuid,
        actual: u64,
    ) -> Result<Settlement, SessionError> {
        if actual > crate::model::limits::MAX_COST {
            return Err(SessionError::InvalidRequest {
                reason: format!("cost must be 0..={}", crate::model::limits::MAX_COST),
            });
        }
        let stored = self
            .inner
            .storage()
            .reservation(reservation_id)
            .await
            .map_err(|err| read_failed(None, &err))?
            .ok_or(SessionError::ReservationNotFound(reservation_id))?;
        if stored.charged.is_some() {
            return Err(SessionError::ReservationSettled(reservation_id));
        }
        // Whether it is still open is the session's row's to say: two settlements of one
        // reservation are decided one after the other on it.
        let settle = Mutation::Settle(Settle {
            reservation_id,
            estimate: stored.estimate,
            share_id: stored.share_id,
            actual,
        });
        match self.inner.mutate(stored.session_id, settle).await {
            Err(SessionError::ReservationSettled(_)) => {
                // This store's copy of the session may be older than the reservation (made
                // by another process, whose write changed no status, so no change feed said
                // so): decide once more on the row as stored.
                self.inner.invalidate(stored.session_id).await;
                self.get(stored.session_id).await?;
                self.inner.mutate(stored.session_id, settle).await?;
            }
            settled => {
                settled?;
            }
        }
        Ok(Settlement {
            reservation_id,
            charged: actual,
            released: stored.estimate.saturating_sub(actual),
            overrun: actual.saturating_sub(stored.estimate),
        })
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
        let deadline = self.inner.storage().for_call();
        let slot = self.inner.slot(session_id, deadline).await?;
        let storage = self.inner.storage();
        let mut state = storage
            .by(deadline, async { Ok(slot.state.lock().await) })
            .await
            .map_err(|err| read_failed(Some(session_id), &err))?;
        // The change feed said the row changed: read it again, unless our state is ahead
        // (the next write merges then). Under the lock, no write of ours interleaves.
        if slot.take_stale() && !state.is_ahead() {
            match storage.by(deadline, storage.load(session_id)).await {
                Ok(Some(fresh)) => {
                    self.inner.rebase(&mut state, fresh, 0);
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
    pub async fn count_live_for_agent(&self, agent_id: Uuid) -> Result<u64, SessionError> {
        let now = self.inner.now();
        self.inner
            .storage()
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
            .storage()
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
                .storage()
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

    /// Counters for metrics. `cache_entries` lags until moka's housekeeping runs. With the
    /// `metrics` feature, also sets the cache-entries and pending gauges.
    pub fn stats(&self) -> StoreStats {
        let inner = &self.inner;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        let listener = inner.listener().counts();
        let denials = inner.denials().counts();
        let maintenance = inner.maintenance().counts();
        let cache_entries = inner.cache_entries();
        let pending = count(inner.pending_len());
        metrics::set(Gauge::CacheEntries, cache_entries);
        metrics::set(Gauge::Pending, pending);
        inner.counters().snapshot(StoreStats {
            cache_entries,
            pending,
            reconciled: inner.reconciler().reconciled(),
            invalidations: listener.invalidations,
            listener_reconnects: listener.reconnects,
            listening: listener.listening,
            denials_recorded: denials.recorded,
            denials_dropped: denials.dropped,
            denials_refused: denials.refused,
            maintenance_runs: maintenance.runs,
            maintenance_failures: maintenance.failures,
            ..StoreStats::default()
        })
    }

    /// Runs one reconciliation pass now, without waiting for the background task: tries to
    /// write every pending session once.
    pub async fn reconcile_now(&self) -> ReconcileReport {
        self.inner.reconciler().pass(&self.inner).await
    }

    /// Makes the pending set and the buffered denials durable, retrying with the
    /// reconciler's backoff until both are empty or `within` has passed, and reports what
    /// it could not. Call before the process exits.
    ///
    /// First it stops the storage's upkeep for good (see
    /// [`SessionStoreBuilder::maintenance_interval`]): a run in progress is cancelled and
    /// none starts again. For PostgreSQL the run starts no further statement, and its open
    /// transaction rolls back once a statement in flight has ended (a rollup keeps the days
    /// it sealed before). Last, it gives back the unspent units of its shares of shared
    /// budgets (see [`SessionStoreBuilder::share_lease`]). The store remains usable for
    /// calls afterwards.
    pub async fn shutdown(&self, within: Duration) -> ShutdownReport {
        let inner = &self.inner;
        let deadline = Instant::now() + within;
        inner.maintenance().stop().await;
        let mut delay = inner.reconciler().first_delay();
        loop {
            let report = tokio::time::timeout_at(deadline, inner.reconciler().pass(inner)).await;
            // Denials after sessions: a reconciled write-through is what some of them record.
            let denials = tokio::time::timeout_at(deadline, inner.denials().write_buffered()).await;
            let done =
                matches!(report, Ok(r) if r.still_pending == 0) && matches!(denials, Ok(true));
            if done || Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = inner.reconciler().backoff(delay);
        }
        // The shares' unspent units go back to their budgets now rather than when their
        // leases run out; a share is closed only if nothing of this store is pending (a
        // pending call may still be written against it).
        let nothing_pending = inner.pending_len() == 0;
        let _ = tokio::time::timeout_at(
            deadline,
            inner.escrow().release_all(inner.storage(), nothing_pending),
        )
        .await;
        ShutdownReport {
            unflushed: inner
                .pending_snapshot()
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            unrecorded_denials: inner.denials().buffered(),
        }
    }
}
