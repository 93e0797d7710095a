//! [`MemoryStorage`]: the storage contract kept in process memory, for unit tests and for
//! embedding without a database. It keeps the same guards as the PostgreSQL schema, so a
//! bug caught by a constraint there is caught here too.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CapOutcome, LockWait, LockedUpdate, Storage, UpdateOutcome, Version, Versioned};
use crate::audit::{AuditEvent, Denial};
use crate::error::StorageError;
use crate::model::{SessionStatus, TaskSession, ToolLimit};

/// In-memory storage. Clones share the same data.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    inner: Arc<Mutex<Tables>>,
    /// Whether to report [`Storage::batches_writes`], so a store groups concurrent writes
    /// as it does over PostgreSQL.
    batching: bool,
}

#[derive(Debug, Default)]
struct Tables {
    sessions: HashMap<Uuid, Versioned>,
    events: Vec<(Uuid, AuditEvent)>,
    /// Every stored event key, like the `session_events_key_unique` constraint.
    event_keys: HashSet<Uuid>,
}

impl MemoryStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the store group concurrent writes of different sessions into one
    /// [`Storage::update_many`] (applied under one lock), as it does over PostgreSQL: the
    /// group commit's behaviour, tested without a database. Off by default.
    #[must_use]
    pub fn with_batching(mut self, batching: bool) -> Self {
        self.batching = batching;
        self
    }

    /// The audit events of `session_id`, oldest first.
    pub fn events(&self, session_id: Uuid) -> Vec<AuditEvent> {
        self.tables()
            .events
            .iter()
            .filter(|(id, _)| *id == session_id)
            .map(|(_, event)| event.clone())
            .collect()
    }

    // The lock is never held across an await, and no code under it panics, so a poisoned
    // lock still guards consistent data.
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn constraint(name: &str) -> StorageError {
    StorageError::Constraint {
        name: name.to_owned(),
        source: format!("memory storage refused the write ({name})").into(),
    }
}

impl Tables {
    fn insert(
        &mut self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        if self.sessions.contains_key(&session.session_id) {
            return Err(constraint("sessions_pkey"));
        }
        // Shared budgets live in PostgreSQL only: no budget exists here.
        if session.budget_id.is_some() {
            return Err(constraint("sessions_budget_id_fkey"));
        }
        if !self.event_keys.insert(event.key) {
            return Err(constraint("session_events_key_unique"));
        }
        self.sessions.insert(
            session.session_id,
            Versioned {
                session: session.clone(),
                version: 1,
            },
        );
        self.events.push((session.session_id, event.clone()));
        Ok(1)
    }

    fn update(
        &mut self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        let Some(stored) = self.sessions.get_mut(&session.session_id) else {
            return Ok(UpdateOutcome::Conflict);
        };
        if stored.version != expected {
            return Ok(UpdateOutcome::Conflict);
        }
        if session.calls_made > stored.session.call_budget {
            return Err(constraint("sessions_calls_within_budget"));
        }
        if stored
            .session
            .rate_limit_per_minute
            .is_some_and(|limit| session.rate_window_calls > limit)
        {
            return Err(constraint("sessions_rate_calls_bounded"));
        }
        if stored.session.status != SessionStatus::Active && session.status != stored.session.status
        {
            return Err(constraint("sessions_status_monotonic"));
        }
        // As PostgreSQL's CHECK: one count per limited tool, each within its limit and
        // within the session's calls.
        let stored_limits = &stored.session.tool_limits;
        if session.tool_limits.len() != stored_limits.len()
            || session
                .tool_limits
                .iter()
                .zip(stored_limits.iter())
                .any(|(new, old)| new.calls > old.limit || new.calls > session.calls_made)
        {
            return Err(constraint("sessions_tool_calls_within_limits"));
        }
        if events.iter().any(|new| self.event_keys.contains(&new.key)) {
            return Err(constraint("session_events_key_unique"));
        }
        // Only the mutable state is written, as in PgStorage.
        stored.session.calls_made = session.calls_made;
        stored.session.rate_window_started_at = session.rate_window_started_at;
        stored.session.rate_window_calls = session.rate_window_calls;
        stored.session.status = session.status;
        stored.session.tool_limits = stored_limits
            .iter()
            .zip(session.tool_limits.iter())
            .map(|(old, new)| ToolLimit {
                calls: new.calls,
                ..old.clone()
            })
            .collect();
        stored.version += 1;
        let version = stored.version;
        let id = session.session_id;
        self.event_keys.extend(events.iter().map(|e| e.key));
        self.events.extend(events.iter().map(|e| (id, e.clone())));
        Ok(UpdateOutcome::Applied(version))
    }

    fn count_live(&self, agent_id: Uuid, now: DateTime<Utc>) -> u64 {
        let live = self
            .sessions
            .values()
            .filter(|v| v.session.agent_id == agent_id && v.session.is_live(now))
            .count();
        u64::try_from(live).unwrap_or(u64::MAX)
    }
}

impl Storage for MemoryStorage {
    async fn load(&self, session_id: Uuid) -> Result<Option<Versioned>, StorageError> {
        Ok(self.tables().sessions.get(&session_id).cloned())
    }

    async fn insert(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
    ) -> Result<Version, StorageError> {
        self.tables().insert(session, event)
    }

    async fn insert_if_under_cap(
        &self,
        session: &TaskSession,
        event: &AuditEvent,
        max: u64,
        now: DateTime<Utc>,
    ) -> Result<CapOutcome, StorageError> {
        let mut tables = self.tables();
        let current = tables.count_live(session.agent_id, now);
        if current >= max {
            return Ok(CapOutcome::AtCap { current });
        }
        tables.insert(session, event).map(CapOutcome::Created)
    }

    async fn update(
        &self,
        session: &TaskSession,
        expected: Version,
        events: &[AuditEvent],
    ) -> Result<UpdateOutcome, StorageError> {
        self.tables().update(session, expected, events)
    }

    fn batches_writes(&self) -> bool {
        self.batching
    }

    async fn update_many(
        &self,
        batch: &[super::BatchUpdate<'_>],
    ) -> Result<Vec<UpdateOutcome>, StorageError> {
        let mut tables = self.tables();
        batch
            .iter()
            .map(|u| tables.update(u.session, u.expected, u.events))
            .collect()
    }

    async fn update_locked<F>(
        &self,
        session_id: Uuid,
        probe_keys: &[Uuid],
        _wait: LockWait,
        decide: F,
    ) -> Result<LockedUpdate, StorageError>
    where
        F: FnOnce(Versioned, usize) -> Option<(TaskSession, Vec<AuditEvent>)> + Send,
    {
        // The table lock is the row lock: nothing interleaves between read and write, and
        // it is never held across an await, so no row is ever busy.
        let mut tables = self.tables();
        let Some(fresh) = tables.sessions.get(&session_id).cloned() else {
            return Ok(LockedUpdate::Missing);
        };
        // Keys are unique across sessions, and the store probes only its own session's.
        let landed = probe_keys
            .iter()
            .filter(|key| tables.event_keys.contains(key))
            .count();
        let version = fresh.version;
        match decide(fresh, landed) {
            None => Ok(LockedUpdate::Declined),
            Some((next, events)) => match tables.update(&next, version, &events)? {
                UpdateOutcome::Applied(version) => Ok(LockedUpdate::Applied(version)),
                UpdateOutcome::Conflict => Ok(LockedUpdate::Missing),
            },
        }
    }

    async fn record_denials(&self, denials: &[Denial]) -> Result<(), StorageError> {
        let mut tables = self.tables();
        for denial in denials {
            // Idempotent, like PostgreSQL's `ON CONFLICT DO NOTHING`.
            if tables.event_keys.insert(denial.event.key) {
                tables
                    .events
                    .push((denial.session_id, denial.event.clone()));
            }
        }
        Ok(())
    }

    async fn count_live_for_agent(
        &self,
        agent_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<u64, StorageError> {
        Ok(self.tables().count_live(agent_id, now))
    }

    async fn active_for_agent(&self, agent_id: Uuid) -> Result<Vec<Uuid>, StorageError> {
        Ok(self
            .tables()
            .sessions
            .values()
            .filter(|v| v.session.agent_id == agent_id && v.session.status == SessionStatus::Active)
            .map(|v| v.session.session_id)
            .collect())
    }

    async fn due_for_expiry(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StorageError> {
        let tables = self.tables();
        let mut due: Vec<&TaskSession> = tables
            .sessions
            .values()
            .map(|v| &v.session)
            .filter(|s| s.status == SessionStatus::Active && s.expires_at <= now)
            .collect();
        due.sort_by_key(|s| s.expires_at);
        Ok(due
            .into_iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
            .map(|s| s.session_id)
            .collect())
    }
}
