//! Session data: what a gateway asks for ([`CreateSessionRequest`]) and what the store keeps
//! ([`TaskSession`]), with the validation limits of a create request.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound as _, Utc};
use uuid::Uuid;

use crate::budget::BudgetId;
use crate::error::SessionError;
use crate::session_token::TokenSecret;

/// The tool or credential entry that authorizes every tool or credential.
pub const WILDCARD: &str = "*";

/// Bounds checked by [`CreateSessionRequest::validate`].
pub mod limits {
    use chrono::Duration;

    /// Shortest time limit.
    pub const MIN_TIME_LIMIT: Duration = Duration::seconds(1);
    /// Longest time limit.
    pub const MAX_TIME_LIMIT: Duration = Duration::hours(24);
    /// Most entries in `authorized_tools` (and in `authorized_credentials`,
    /// `delegation_chain_snapshot`).
    pub const MAX_TOOLS: usize = 1024;
    /// Longest tool, credential or delegation entry, in bytes.
    pub const MAX_NAME_BYTES: usize = 256;
    /// Longest declared intent, in bytes.
    pub const MAX_INTENT_BYTES: usize = 4096;
    /// Largest budget or rate limit: PostgreSQL stores them as `bigint`.
    pub const MAX_COUNT: u64 = i64::MAX as u64;
    /// Longest rate window, in seconds: a window longer than the longest session is
    /// meaningless.
    pub const MAX_RATE_WINDOW_SECS: u64 = 24 * 60 * 60;
    /// Largest cost of one call or batch in a shared budget's units, and of one tool in
    /// `tool_costs`: a batch of [`MAX_TOOLS`] tools at this cost each still fits in a
    /// `bigint`.
    pub const MAX_COST: u64 = 1_000_000_000_000;
    /// Most reservations a session holds open at once: each is a line of its row.
    pub const MAX_OPEN_RESERVATIONS: usize = 32;
}

/// Lifecycle of a session. Moves only from `Active` to `Closed` or `Expired`, never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Usable while now is before `expires_at`.
    Active,
    /// Closed explicitly; never usable again.
    Closed,
    /// Marked expired after its time limit; never usable again.
    Expired,
}

impl SessionStatus {
    /// The name stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Closed => "closed",
            SessionStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(SessionStatus::Active),
            "closed" => Ok(SessionStatus::Closed),
            "expired" => Ok(SessionStatus::Expired),
            other => Err(format!("unknown session status {other:?}")),
        }
    }
}

/// How sensitive the data a session may touch is, ordered from least to most sensitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DataSensitivity {
    /// Public data.
    #[default]
    Public,
    /// Internal data.
    Internal,
    /// Confidential data.
    Confidential,
    /// Restricted data.
    Restricted,
}

impl DataSensitivity {
    /// The name stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            DataSensitivity::Public => "public",
            DataSensitivity::Internal => "internal",
            DataSensitivity::Confidential => "confidential",
            DataSensitivity::Restricted => "restricted",
        }
    }
}

impl fmt::Display for DataSensitivity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataSensitivity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "public" => Ok(DataSensitivity::Public),
            "internal" => Ok(DataSensitivity::Internal),
            "confidential" => Ok(DataSensitivity::Confidential),
            "restricted" => Ok(DataSensitivity::Restricted),
            other => Err(format!("unknown data sensitivity {other:?}")),
        }
    }
}

/// What a gateway asks for when it opens a session.
///
/// Built with [`CreateSessionRequest::new`] and the `with_*` setters (its fields stay
/// public to read and to set): a field added later has a default and breaks no caller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateSessionRequest {
    /// The agent the session is bound to.
    pub agent_id: Uuid,
    /// Who delegated to the agent, outermost first, as it was at creation.
    pub delegation_chain_snapshot: Vec<String>,
    /// What the agent said it is doing, for audit.
    pub declared_intent: String,
    /// Tools the agent may call; `["*"]` allows every tool, an empty list none.
    pub authorized_tools: Vec<String>,
    /// Credentials the agent may use; same rule as tools.
    pub authorized_credentials: Vec<String>,
    /// How long the session lives, from 1 s to 24 h.
    pub time_limit: Duration,
    /// Total calls allowed, at least 1.
    pub call_budget: u64,
    /// Calls allowed per rate window; `None` means no rate limit.
    pub rate_limit_per_minute: Option<u64>,
    /// Length of the rate window in seconds, at least 1 (60 by convention).
    pub rate_limit_window_secs: u64,
    /// The most sensitive data the session may touch.
    pub data_sensitivity_ceiling: DataSensitivity,
    /// Call limits of single tools inside the budget, by tool name: a call of a limited
    /// tool counts against its limit and against `call_budget`; a tool without one is
    /// bounded by `call_budget` alone. Each limit is at least 1, each name must be
    /// authorized by `authorized_tools` (where `"*"` authorizes any), and there are at
    /// most as many entries as `authorized_tools` has. Empty by default.
    pub tool_limits: BTreeMap<String, u64>,
    /// The shared budget the session's calls are charged to, and so each of its
    /// ancestors (see [`crate::budget`]); `None` by default. It must exist.
    pub budget_id: Option<BudgetId>,
    /// What a call of a tool costs in the shared budget's units, by tool name (0 is
    /// allowed; at most [`limits::MAX_COST`]); a tool without an entry costs 1. Only with
    /// a `budget_id`; each name authorized by `authorized_tools`. Empty by default.
    pub tool_costs: BTreeMap<String, u64>,
    /// SHA-256 of the secret of the session's bearer token, for the paths where the agent
    /// presents the session itself (see [`crate::session_token`]); `None` (the default):
    /// the session has no token. Set it with [`Self::with_token`].
    pub token_digest: Option<[u8; 32]>,
}

impl CreateSessionRequest {
    /// A request with the given agent, tools, budget and time limit; no rate limit, a 60 s
    /// window, no credentials, public data only, no tool limits. The `with_*` setters
    /// change the rest.
    pub fn new(
        agent_id: Uuid,
        authorized_tools: impl IntoIterator<Item = impl Into<String>>,
        call_budget: u64,
        time_limit: Duration,
    ) -> Self {
        CreateSessionRequest {
            agent_id,
            delegation_chain_snapshot: Vec::new(),
            declared_intent: String::new(),
            authorized_tools: authorized_tools.into_iter().map(Into::into).collect(),
            authorized_credentials: Vec::new(),
            time_limit,
            call_budget,
            rate_limit_per_minute: None,
            rate_limit_window_secs: 60,
            data_sensitivity_ceiling: DataSensitivity::Public,
            tool_limits: BTreeMap::new(),
            budget_id: None,
            tool_costs: BTreeMap::new(),
            token_digest: None,
        }
    }

    /// The request with a bearer token whose secret is `secret`: once the session is
    /// created, [`TokenSecret::token_for`] its id is the token to give the agent.
    #[must_use]
    pub fn with_token(mut self, secret: &TokenSecret) -> Self {
        self.token_digest = Some(secret.digest());
        self
    }

    /// The request with its calls charged to the shared budget `budget` (see
    /// [`budget_id`](Self::budget_id)).
    #[must_use]
    pub fn with_budget(mut self, budget: BudgetId) -> Self {
        self.budget_id = Some(budget);
        self
    }

    /// The request with a call of `tool` costing `cost` units of its shared budget (see
    /// [`tool_costs`](Self::tool_costs)).
    #[must_use]
    pub fn with_tool_cost(mut self, tool: impl Into<String>, cost: u64) -> Self {
        self.tool_costs.insert(tool.into(), cost);
        self
    }

    /// The request with a call limit of its own for `tool` (see
    /// [`tool_limits`](Self::tool_limits)).
    #[must_use]
    pub fn with_tool_limit(mut self, tool: impl Into<String>, limit: u64) -> Self {
        self.tool_limits.insert(tool.into(), limit);
        self
    }

    /// The request with at most `calls` calls per rate window (see
    /// [`rate_limit_per_minute`](Self::rate_limit_per_minute)).
    #[must_use]
    pub fn with_rate_limit_per_minute(mut self, calls: u64) -> Self {
        self.rate_limit_per_minute = Some(calls);
        self
    }

    /// The request with a rate window of `secs` seconds (default 60).
    #[must_use]
    pub fn with_rate_limit_window_secs(mut self, secs: u64) -> Self {
        self.rate_limit_window_secs = secs;
        self
    }

    /// The request with what the agent says it is doing, for audit.
    #[must_use]
    pub fn with_declared_intent(mut self, intent: impl Into<String>) -> Self {
        self.declared_intent = intent.into();
        self
    }

    /// The request with who delegated to the agent, outermost first.
    #[must_use]
    pub fn with_delegation_chain(
        mut self,
        chain: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.delegation_chain_snapshot = chain.into_iter().map(Into::into).collect();
        self
    }

    /// The request with the credentials the agent may use (same rule as tools).
    #[must_use]
    pub fn with_authorized_credentials(
        mut self,
        credentials: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.authorized_credentials = credentials.into_iter().map(Into::into).collect();
        self
    }

    /// The request with the most sensitive data the session may touch.
    #[must_use]
    pub fn with_data_sensitivity_ceiling(mut self, ceiling: DataSensitivity) -> Self {
        self.data_sensitivity_ceiling = ceiling;
        self
    }

    /// Checks every field against [`limits`]. Returns [`SessionError::InvalidRequest`] naming
    /// the first violation.
    pub fn validate(&self) -> Result<(), SessionError> {
        use limits::*;
        let invalid = |reason: String| Err(SessionError::InvalidRequest { reason });

        if self.call_budget == 0 || self.call_budget > MAX_COUNT {
            return invalid(format!("call_budget must be 1..={MAX_COUNT}"));
        }
        if self.time_limit < MIN_TIME_LIMIT || self.time_limit > MAX_TIME_LIMIT {
            return invalid("time_limit must be from 1 s to 24 h".to_owned());
        }
        if self.rate_limit_window_secs == 0 || self.rate_limit_window_secs > MAX_RATE_WINDOW_SECS {
            return invalid(format!(
                "rate_limit_window_secs must be 1..={MAX_RATE_WINDOW_SECS}"
            ));
        }
        if let Some(limit) = self.rate_limit_per_minute
            && (limit == 0 || limit > MAX_COUNT)
        {
            return invalid(format!("rate_limit_per_minute must be 1..={MAX_COUNT}"));
        }
        if self.declared_intent.len() > MAX_INTENT_BYTES {
            return invalid(format!("declared_intent exceeds {MAX_INTENT_BYTES} bytes"));
        }
        if self.declared_intent.contains('\0') {
            return invalid("declared_intent contains NUL".to_owned());
        }
        for (field, names) in [
            ("authorized_tools", &self.authorized_tools),
            ("authorized_credentials", &self.authorized_credentials),
            ("delegation_chain_snapshot", &self.delegation_chain_snapshot),
        ] {
            validate_names(field, names)?;
        }
        self.validate_tool_limits()?;
        self.validate_tool_costs()
    }

    fn validate_tool_costs(&self) -> Result<(), SessionError> {
        use limits::*;
        let invalid = |reason: String| Err(SessionError::InvalidRequest { reason });
        if self.tool_costs.is_empty() {
            return Ok(());
        }
        if self.budget_id.is_none() {
            return invalid("tool_costs needs a budget_id".to_owned());
        }
        if self.tool_costs.len() > self.authorized_tools.len() {
            return invalid("tool_costs has more entries than authorized_tools".to_owned());
        }
        for (tool, &cost) in &self.tool_costs {
            // Checked first: a name that is not valid is not echoed back.
            if !is_valid_name(tool) {
                return invalid(format!(
                    "tool_costs names must be 1..={MAX_NAME_BYTES} bytes without NUL"
                ));
            }
            if !list_authorizes(&self.authorized_tools, tool) {
                return invalid(format!(
                    "tool_costs names {tool:?}, which authorized_tools does not authorize"
                ));
            }
            if cost > MAX_COST {
                return invalid(format!("tool_costs[{tool:?}] must be 0..={MAX_COST}"));
            }
        }
        Ok(())
    }

    fn validate_tool_limits(&self) -> Result<(), SessionError> {
        use limits::*;
        let invalid = |reason: String| Err(SessionError::InvalidRequest { reason });
        if self.tool_limits.len() > self.authorized_tools.len() {
            return invalid("tool_limits has more entries than authorized_tools".to_owned());
        }
        for (tool, &limit) in &self.tool_limits {
            // Checked first: a name that is not valid is not echoed back.
            if !is_valid_name(tool) {
                return invalid(format!(
                    "tool_limits names must be 1..={MAX_NAME_BYTES} bytes without NUL"
                ));
            }
            if !list_authorizes(&self.authorized_tools, tool) {
                return invalid(format!(
                    "tool_limits names {tool:?}, which authorized_tools does not authorize"
                ));
            }
            if limit == 0 || limit > MAX_COUNT {
                return invalid(format!("tool_limits[{tool:?}] must be 1..={MAX_COUNT}"));
            }
        }
        Ok(())
    }
}

/// What a call of a tool costs in its session's shared budget (when not 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCost {
    /// The tool's name.
    pub tool: Arc<str>,
    /// Units of the shared budget one call of it costs.
    pub cost: u64,
}

/// A reservation of a session's shared budget that is not settled yet: its estimate is
/// charged, and [`SessionStore::settle`](crate::SessionStore::settle) charges the actual
/// cost instead. It lapses at `expires_at`, settled at its estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReservation {
    /// The reservation's id (the key of the event that made it).
    pub reservation_id: Uuid,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
}

/// A reservation made ([`SessionStore::reserve`](crate::SessionStore::reserve)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Reservation {
    /// The id to settle it by.
    pub reservation_id: Uuid,
    /// The units it holds (charged until settled).
    pub estimate: u64,
    /// When it lapses, settled at its estimate.
    pub expires_at: DateTime<Utc>,
    /// The session after the call that made it.
    pub session: TaskSession,
}

/// A reservation settled ([`SessionStore::settle`](crate::SessionStore::settle)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settlement {
    /// The reservation.
    pub reservation_id: Uuid,
    /// The units charged in all: the actual cost.
    pub charged: u64,
    /// Units of the estimate given back (the estimate less the actual cost, or 0).
    pub released: u64,
    /// Units charged above the estimate (the actual cost less the estimate, or 0).
    pub overrun: u64,
}

/// What a session came to, from its row and its audit trail
/// ([`SessionStore::summary`](crate::SessionStore::summary)): what a close answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionSummary {
    /// Calls made.
    pub calls_made: u64,
    /// Calls allowed.
    pub call_budget: u64,
    /// How long the session ran: until now, or until its time limit if that came first.
    pub time_used: Duration,
    /// How long it could run.
    pub time_limit: Duration,
    /// Denied attempts recorded in the trail, by reason (`budget`, `tool`, `rate`,
    /// `shared_budget`, …; see [`DenialReason`](crate::audit::DenialReason)).
    pub denials: BTreeMap<String, u64>,
    /// Units charged to the session's shared budget (0 without one): allowed calls' and
    /// reservations' costs, with what settlements released or added.
    pub budget_units: u64,
}

impl SessionSummary {
    /// Calls made as a percentage of the budget, to one decimal (0 for a budget of 0).
    pub fn budget_used_percent(&self) -> f64 {
        percent(self.calls_made, self.call_budget)
    }

    /// Time used as a percentage of the time limit, to one decimal.
    pub fn time_used_percent(&self) -> f64 {
        let used = u64::try_from(self.time_used.num_milliseconds()).unwrap_or(0);
        let limit = u64::try_from(self.time_limit.num_milliseconds()).unwrap_or(0);
        percent(used, limit)
    }
}

/// `part` of `whole` in percent, rounded to one decimal; 0 when `whole` is 0.
// `as f64` loses precision past 2^53 only, far beyond any budget or time limit.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (part as f64 * 1000.0 / whole as f64).round() / 10.0
}

/// A tool with a call limit of its own inside a session, and its calls so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolLimit {
    /// The tool's name.
    pub tool: Arc<str>,
    /// Calls of the tool allowed in the session.
    pub limit: u64,
    /// Calls of the tool counted so far.
    pub calls: u64,
}

fn validate_names(field: &str, names: &[String]) -> Result<(), SessionError> {
    use limits::*;
    let invalid = |reason: String| Err(SessionError::InvalidRequest { reason });
    if names.len() > MAX_TOOLS {
        return invalid(format!("{field} has more than {MAX_TOOLS} entries"));
    }
    // PostgreSQL text cannot hold NUL; refusing it here keeps the error a clear 400.
    if let Some(index) = names.iter().position(|name| !is_valid_name(name)) {
        return invalid(format!(
            "{field}[{index}] must be 1..={MAX_NAME_BYTES} bytes without NUL"
        ));
    }
    Ok(())
}

/// A task session: the terms it was created with and its current counters and status.
///
/// A `TaskSession` returned by the store is a snapshot; changing it changes nothing stored.
/// The lists are shared (`Arc`), so a snapshot is cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskSession {
    /// The session's id.
    pub session_id: Uuid,
    /// The agent the session is bound to.
    pub agent_id: Uuid,
    /// Who delegated to the agent, as at creation.
    pub delegation_chain_snapshot: Arc<[String]>,
    /// What the agent said it is doing.
    pub declared_intent: Arc<str>,
    /// Tools the agent may call; `["*"]` allows every tool.
    pub authorized_tools: Arc<[String]>,
    /// Credentials the agent may use; `["*"]` allows every credential.
    pub authorized_credentials: Arc<[String]>,
    /// How long the session lives (`expires_at - created_at`).
    pub time_limit: Duration,
    /// Total calls allowed.
    pub call_budget: u64,
    /// Calls counted so far.
    pub calls_made: u64,
    /// Calls allowed per rate window; `None` means no rate limit.
    pub rate_limit_per_minute: Option<u64>,
    /// Length of the rate window in seconds.
    pub rate_limit_window_secs: u64,
    /// Start of the current rate window; `None` before the first call.
    pub rate_window_started_at: Option<DateTime<Utc>>,
    /// Calls counted in the current rate window.
    pub rate_window_calls: u64,
    /// The most sensitive data the session may touch.
    pub data_sensitivity_ceiling: DataSensitivity,
    /// When the session was created.
    pub created_at: DateTime<Utc>,
    /// When the time limit runs out.
    pub expires_at: DateTime<Utc>,
    /// Lifecycle status.
    pub status: SessionStatus,
    /// The tools with a call limit of their own, sorted by name, with their calls so far;
    /// empty when no tool has one.
    pub tool_limits: Arc<[ToolLimit]>,
    /// The shared budget the session's calls are charged to, if any.
    pub budget_id: Option<BudgetId>,
    /// The tools whose call costs other than 1 unit of the shared budget, sorted by name.
    pub tool_costs: Arc<[ToolCost]>,
    /// The reservations not yet settled, oldest first; some may have lapsed (see
    /// [`Self::open_reservation`]).
    pub reservations: Arc<[OpenReservation]>,
    /// SHA-256 of the secret of the session's bearer token; `None`: it has none (see
    /// [`crate::session_token`]).
    pub token_digest: Option<[u8; 32]>,
}

impl TaskSession {
    /// A fresh active session for a validated request, created at `now`.
    pub(crate) fn from_request(
        session_id: Uuid,
        req: &CreateSessionRequest,
        now: DateTime<Utc>,
    ) -> Self {
        // PostgreSQL keeps microseconds; rounding here makes a reloaded session equal the
        // cached one. `now` comes from the store already truncated.
        let expires_at = (now + req.time_limit).trunc_subsecs(6);
        TaskSession {
            session_id,
            agent_id: req.agent_id,
            delegation_chain_snapshot: req.delegation_chain_snapshot.as_slice().into(),
            declared_intent: req.declared_intent.as_str().into(),
            authorized_tools: req.authorized_tools.as_slice().into(),
            authorized_credentials: req.authorized_credentials.as_slice().into(),
            time_limit: expires_at - now,
            call_budget: req.call_budget,
            calls_made: 0,
            rate_limit_per_minute: req.rate_limit_per_minute,
            rate_limit_window_secs: req.rate_limit_window_secs,
            rate_window_started_at: None,
            rate_window_calls: 0,
            data_sensitivity_ceiling: req.data_sensitivity_ceiling,
            created_at: now,
            expires_at,
            status: SessionStatus::Active,
            tool_limits: req
                .tool_limits
                .iter()
                .map(|(tool, &limit)| ToolLimit {
                    tool: tool.as_str().into(),
                    limit,
                    calls: 0,
                })
                .collect(),
            budget_id: req.budget_id.clone(),
            tool_costs: req
                .tool_costs
                .iter()
                .map(|(tool, &cost)| ToolCost {
                    tool: tool.as_str().into(),
                    cost,
                })
                .collect(),
            reservations: Arc::from([]),
            token_digest: req.token_digest,
        }
    }

    /// The reservation `reservation_id` if it is open at `now`: made, not settled, and not
    /// lapsed.
    pub fn open_reservation(
        &self,
        reservation_id: Uuid,
        now: DateTime<Utc>,
    ) -> Option<&OpenReservation> {
        self.reservations
            .iter()
            .find(|open| open.reservation_id == reservation_id && now < open.expires_at)
    }

    /// What a call of `tools` costs in the session's shared budget: `explicit` when given,
    /// else the sum of each tool's cost (its entry in [`tool_costs`](Self::tool_costs),
    /// else 1). `None` when the session draws on no shared budget.
    pub fn cost_of(&self, tools: &[&str], explicit: Option<u64>) -> Option<u64> {
        self.budget_id.as_ref()?;
        Some(explicit.unwrap_or_else(|| {
            tools
                .iter()
                .map(|tool| {
                    self.tool_costs
                        .binary_search_by(|entry| (*entry.tool).cmp(tool))
                        .ok()
                        .and_then(|index| self.tool_costs.get(index))
                        .map_or(1, |entry| entry.cost)
                })
                .fold(0, u64::saturating_add)
        }))
    }

    /// Whether the session may be used at `now`: active and before `expires_at`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.status == SessionStatus::Active && now < self.expires_at
    }

    /// Whether `tool` is in the allow-list (or the list is `["*"]`).
    pub fn is_tool_authorized(&self, tool: &str) -> bool {
        list_authorizes(&self.authorized_tools, tool)
    }

    /// Whether the credential `reference` may be used; same rule as tools.
    pub fn is_credential_authorized(&self, reference: &str) -> bool {
        list_authorizes(&self.authorized_credentials, reference)
    }

    /// Whether data at `level` is at or below the session's ceiling.
    pub fn allows_sensitivity(&self, level: DataSensitivity) -> bool {
        level <= self.data_sensitivity_ceiling
    }

    /// Calls left in the budget.
    pub fn calls_remaining(&self) -> u64 {
        self.call_budget.saturating_sub(self.calls_made)
    }

    /// The limit of `tool` and its calls so far, if it has a limit of its own.
    pub fn tool_limit(&self, tool: &str) -> Option<&ToolLimit> {
        let index = self.tool_limit_index(tool)?;
        self.tool_limits.get(index)
    }

    /// Where `tool`'s limit is in [`tool_limits`](Self::tool_limits) (sorted by name).
    pub(crate) fn tool_limit_index(&self, tool: &str) -> Option<usize> {
        self.tool_limits
            .binary_search_by(|limit| (*limit.tool).cmp(tool))
            .ok()
    }
}

/// A name that could never be created as an allow-list entry (empty, too long, NUL) is
/// authorized by nothing, not even `"*"`: it would otherwise reach the audit trail.
fn list_authorizes(list: &[String], name: &str) -> bool {
    is_valid_name(name) && list.iter().any(|entry| entry == WILDCARD || entry == name)
}

pub(crate) fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= limits::MAX_NAME_BYTES && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateSessionRequest {
        CreateSessionRequest::new(Uuid::new_v4(), ["read"], 10, Duration::minutes(5))
    }

    #[test]
    fn sensitivity_is_ordered() {
        use DataSensitivity::*;
        assert!(Public < Internal && Internal < Confidential && Confidential < Restricted);
    }

    #[test]
    fn names_round_trip() {
        for s in [
            SessionStatus::Active,
            SessionStatus::Closed,
            SessionStatus::Expired,
        ] {
            assert_eq!(s.as_str().parse::<SessionStatus>(), Ok(s));
        }
        for d in [
            DataSensitivity::Public,
            DataSensitivity::Internal,
            DataSensitivity::Confidential,
            DataSensitivity::Restricted,
        ] {
            assert_eq!(d.as_str().parse::<DataSensitivity>(), Ok(d));
        }
        assert!("ACTIVE".parse::<SessionStatus>().is_err());
    }

    #[test]
    fn wildcard_and_empty_lists() {
        let now = Utc::now();
        let mut req = request();
        req.authorized_tools = vec!["*".into()];
        req.authorized_credentials = vec![];
        let s = TaskSession::from_request(Uuid::new_v4(), &req, now);
        assert!(s.is_tool_authorized("anything"));
        assert!(!s.is_tool_authorized(""));
        assert!(!s.is_tool_authorized("nul\0"));
        assert!(!s.is_tool_authorized(&"x".repeat(257)));
        assert!(!s.is_credential_authorized("anything"));
        req.authorized_credentials = vec!["vault:db".into()];
        let s = TaskSession::from_request(Uuid::new_v4(), &req, now);
        assert!(s.is_credential_authorized("vault:db"));
        assert!(!s.is_credential_authorized("vault:other"));
    }

    #[test]
    fn sensitivity_ceiling_is_inclusive() {
        let mut req = request();
        req.data_sensitivity_ceiling = DataSensitivity::Confidential;
        let s = TaskSession::from_request(Uuid::new_v4(), &req, Utc::now());
        assert!(s.allows_sensitivity(DataSensitivity::Internal));
        assert!(s.allows_sensitivity(DataSensitivity::Confidential));
        assert!(!s.allows_sensitivity(DataSensitivity::Restricted));
    }

    #[test]
    fn tool_limits_name_authorized_tools_with_limits_of_at_least_one() {
        let base =
            CreateSessionRequest::new(Uuid::new_v4(), ["read", "write"], 10, Duration::minutes(5));
        let ok = |r: CreateSessionRequest| r.validate().is_ok();
        assert!(ok(base.clone().with_tool_limit("write", 3)));
        assert!(ok(base
            .clone()
            .with_tool_limit("write", 1)
            .with_tool_limit("read", limits::MAX_COUNT)));
        assert!(!ok(base.clone().with_tool_limit("write", 0)));
        assert!(!ok(base
            .clone()
            .with_tool_limit("write", limits::MAX_COUNT + 1)));
        assert!(
            !ok(base.clone().with_tool_limit("delete", 1)),
            "not authorized"
        );
        assert!(!ok(base.clone().with_tool_limit("", 1)));
        assert!(!ok(base.clone().with_tool_limit("a\0b", 1)));
        assert!(!ok(base.with_tool_limit("w".repeat(257), 1)));
        let wildcard = CreateSessionRequest::new(Uuid::new_v4(), ["*"], 10, Duration::minutes(5));
        assert!(ok(wildcard.clone().with_tool_limit("anything", 1)));
        assert!(
            !ok(wildcard
                .with_tool_limit("anything", 1)
                .with_tool_limit("else", 1)),
            "more entries than the allow-list"
        );
    }

    #[test]
    fn a_new_session_has_its_tool_limits_sorted_and_unused() {
        let req = CreateSessionRequest::new(Uuid::new_v4(), ["b", "a"], 10, Duration::minutes(5))
            .with_tool_limit("b", 2)
            .with_tool_limit("a", 1);
        let s = TaskSession::from_request(Uuid::new_v4(), &req, Utc::now());
        let limits: Vec<(&str, u64, u64)> = s
            .tool_limits
            .iter()
            .map(|l| (&*l.tool, l.limit, l.calls))
            .collect();
        assert_eq!(limits, [("a", 1, 0), ("b", 2, 0)]);
        assert_eq!(s.tool_limit("b").map(|l| l.limit), Some(2));
        assert!(s.tool_limit("c").is_none());
    }

    #[test]
    fn validate_accepts_bounds_and_refuses_past_them() {
        let ok = |f: &dyn Fn(&mut CreateSessionRequest)| {
            let mut r = request();
            f(&mut r);
            r.validate().is_ok()
        };
        assert!(ok(&|_| {}));
        assert!(ok(&|r| r.time_limit = limits::MIN_TIME_LIMIT));
        assert!(ok(&|r| r.time_limit = limits::MAX_TIME_LIMIT));
        assert!(ok(&|r| r.call_budget = limits::MAX_COUNT));
        assert!(ok(
            &|r| r.rate_limit_window_secs = limits::MAX_RATE_WINDOW_SECS
        ));
        assert!(!ok(
            &|r| r.rate_limit_window_secs = limits::MAX_RATE_WINDOW_SECS + 1
        ));
        assert!(ok(&|r| r.authorized_tools = vec!["t".repeat(256); 1024]));
        assert!(ok(&|r| r.declared_intent = "i".repeat(4096)));
        assert!(ok(&|r| r.authorized_tools = vec![]));

        assert!(!ok(&|r| r.call_budget = 0));
        assert!(!ok(&|r| r.call_budget = u64::MAX));
        assert!(!ok(&|r| r.time_limit = Duration::milliseconds(999)));
        assert!(!ok(&|r| r.time_limit = Duration::seconds(-5)));
        assert!(!ok(
            &|r| r.time_limit = Duration::hours(24) + Duration::milliseconds(1)
        ));
        assert!(!ok(&|r| r.rate_limit_window_secs = 0));
        assert!(!ok(&|r| r.rate_limit_per_minute = Some(0)));
        assert!(!ok(&|r| r.rate_limit_per_minute = Some(u64::MAX)));
        assert!(!ok(&|r| r.authorized_tools = vec![String::new()]));
        assert!(!ok(&|r| r.authorized_tools = vec!["t".repeat(257)]));
        assert!(!ok(&|r| r.authorized_tools = vec!["a\0b".into()]));
        assert!(!ok(&|r| r.authorized_tools = vec!["t".into(); 1025]));
        assert!(!ok(&|r| r.authorized_credentials = vec![String::new()]));
        assert!(!ok(&|r| r.delegation_chain_snapshot = vec!["\0".into()]));
        assert!(!ok(&|r| r.declared_intent = "i".repeat(4097)));
        assert!(!ok(&|r| r.declared_intent = "nul\0".into()));
    }
}
