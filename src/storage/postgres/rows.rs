//! Rows as PostgreSQL holds them and the encodings the statements take: a `sessions` row
//! decoded (and checked) into a [`Versioned`] session, and events and denials encoded as
//! JSON for `jsonb_to_recordset`, so one statement carries any number of them.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::audit::{AuditEvent, Denial, DenialReason, ReservationChange};
use crate::budget::BudgetId;
use crate::error::StorageError;
use crate::model::{OpenReservation, TaskSession, ToolCost, ToolLimit};
use crate::storage::Versioned;

/// A `sessions` row as the load statements select it.
pub(super) struct SessionRow {
    pub(super) session_id: Uuid,
    pub(super) agent_id: Uuid,
    pub(super) delegation_chain: Vec<String>,
    pub(super) declared_intent: String,
    pub(super) authorized_tools: Vec<String>,
    pub(super) authorized_credentials: Vec<String>,
    pub(super) call_budget: i64,
    pub(super) calls_made: i64,
    pub(super) rate_limit: Option<i64>,
    pub(super) rate_window_secs: i64,
    pub(super) rate_window_started_at: Option<DateTime<Utc>>,
    pub(super) rate_window_calls: i64,
    pub(super) data_sensitivity_ceiling: String,
    pub(super) status: String,
    pub(super) created_at: DateTime<Utc>,
    pub(super) expires_at: DateTime<Utc>,
    pub(super) version: i64,
    pub(super) limited_tools: Vec<String>,
    pub(super) tool_limits: Vec<i64>,
    pub(super) tool_calls: Vec<i64>,
    pub(super) budget_id: Option<String>,
    pub(super) cost_tools: Vec<String>,
    pub(super) tool_costs: Vec<i64>,
    pub(super) reservation_ids: Vec<Uuid>,
    pub(super) reservations_until: Vec<DateTime<Utc>>,
    pub(super) token_digest: Option<Vec<u8>>,
}

impl TryFrom<SessionRow> for Versioned {
    type Error = StorageError;

    /// A row edited by hand may hold anything the constraints allow; decoding checks the
    /// rest instead of panicking.
    fn try_from(row: SessionRow) -> Result<Self, StorageError> {
        let id = row.session_id;
        let count = |name: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| StorageError::Decode(format!("session {id}: {name} is {value}")))
        };
        let tool_limits = tool_limits(id, row.limited_tools, row.tool_limits, row.tool_calls)?;
        let tool_costs = tool_costs(id, row.cost_tools, row.tool_costs)?;
        if row.reservation_ids.len() != row.reservations_until.len() {
            return Err(StorageError::Decode(format!(
                "session {id}: {} reservations and {} lapse instants",
                row.reservation_ids.len(),
                row.reservations_until.len()
            )));
        }
        let reservations = row
            .reservation_ids
            .into_iter()
            .zip(row.reservations_until)
            .map(|(reservation_id, expires_at)| OpenReservation {
                reservation_id,
                expires_at,
            })
            .collect();
        let budget_id = row
            .budget_id
            .map(BudgetId::new)
            .transpose()
            .map_err(|_| StorageError::Decode(format!("session {id}: budget_id")))?;
        let token_digest = row
            .token_digest
            .map(|digest| <[u8; 32]>::try_from(digest.as_slice()))
            .transpose()
            .map_err(|_| StorageError::Decode(format!("session {id}: token_digest")))?;
        let session = TaskSession {
            session_id: row.session_id,
            agent_id: row.agent_id,
            delegation_chain_snapshot: row.delegation_chain.into(),
            declared_intent: row.declared_intent.into(),
            authorized_tools: row.authorized_tools.into(),
            authorized_credentials: row.authorized_credentials.into(),
            time_limit: row.expires_at - row.created_at,
            call_budget: count("call_budget", row.call_budget)?,
            calls_made: count("calls_made", row.calls_made)?,
            rate_limit_per_minute: row
                .rate_limit
                .map(|limit| count("rate_limit", limit))
                .transpose()?,
            rate_limit_window_secs: count("rate_window_secs", row.rate_window_secs)?,
            rate_window_started_at: row.rate_window_started_at,
            rate_window_calls: count("rate_window_calls", row.rate_window_calls)?,
            data_sensitivity_ceiling: row
                .data_sensitivity_ceiling
                .parse()
                .map_err(|e| StorageError::Decode(format!("session {id}: {e}")))?,
            created_at: row.created_at,
            expires_at: row.expires_at,
            status: row
                .status
                .parse()
                .map_err(|e| StorageError::Decode(format!("session {id}: {e}")))?,
            tool_limits,
            budget_id,
            tool_costs,
            reservations,
            token_digest,
        };
        Ok(Versioned {
            session,
            version: row.version,
        })
    }
}

/// The tool limits of a row: the three arrays zipped. The names must be strictly sorted,
/// as the library writes them: the counts are written back by position
/// ([`tool_calls`]), so a row in another order (written by hand) is refused rather than
/// sorted, which would credit each count to another tool on the next update.
fn tool_limits(
    id: Uuid,
    tools: Vec<String>,
    limits: Vec<i64>,
    calls: Vec<i64>,
) -> Result<Arc<[ToolLimit]>, StorageError> {
    let decode = |what: String| StorageError::Decode(format!("session {id}: {what}"));
    if tools.len() != limits.len() || tools.len() != calls.len() {
        return Err(decode(format!(
            "{} limited tools, {} limits and {} counts",
            tools.len(),
            limits.len(),
            calls.len()
        )));
    }
    let count = |name: &str, value: i64| {
        u64::try_from(value).map_err(|_| decode(format!("tool {name:?}: a count of {value}")))
    };
    let zipped = tools
        .into_iter()
        .zip(limits)
        .zip(calls)
        .map(|((tool, limit), calls)| {
            Ok(ToolLimit {
                limit: count(&tool, limit)?,
                calls: count(&tool, calls)?,
                tool: tool.into(),
            })
        })
        .collect::<Result<Vec<_>, StorageError>>()?;
    if let Some(pair) = zipped.windows(2).find(|pair| pair[0].tool >= pair[1].tool) {
        return Err(decode(format!(
            "limited tools not sorted by name, or one twice: {:?} before {:?}",
            pair[0].tool, pair[1].tool
        )));
    }
    Ok(zipped.into())
}

/// The tool costs of a row: the two arrays zipped, strictly sorted by name (the store looks
/// a tool's cost up by binary search).
fn tool_costs(
    id: Uuid,
    tools: Vec<String>,
    costs: Vec<i64>,
) -> Result<Arc<[ToolCost]>, StorageError> {
    let decode = |what: String| StorageError::Decode(format!("session {id}: {what}"));
    if tools.len() != costs.len() {
        return Err(decode(format!(
            "{} cost tools and {} costs",
            tools.len(),
            costs.len()
        )));
    }
    let zipped = tools
        .into_iter()
        .zip(costs)
        .map(|(tool, cost)| {
            let cost = u64::try_from(cost)
                .map_err(|_| decode(format!("tool {tool:?}: a cost of {cost}")))?;
            Ok(ToolCost {
                tool: tool.into(),
                cost,
            })
        })
        .collect::<Result<Vec<_>, StorageError>>()?;
    if let Some(pair) = zipped.windows(2).find(|pair| pair[0].tool >= pair[1].tool) {
        return Err(decode(format!(
            "cost tools not sorted by name, or one twice: {:?} before {:?}",
            pair[0].tool, pair[1].tool
        )));
    }
    Ok(zipped.into())
}

/// The calls of each limited tool, in the order of `limited_tools`.
pub(super) fn tool_calls(session: &TaskSession) -> Vec<i64> {
    session
        .tool_limits
        .iter()
        .map(|limit| to_bigint(limit.calls))
        .collect()
}

/// [`tool_calls`] as a PostgreSQL array literal (`{1,3}`), for the group commit's input;
/// `None` for a session without limits (the literal `{}`).
pub(super) fn tool_calls_literal(session: &TaskSession) -> Option<String> {
    if session.tool_limits.is_empty() {
        return None;
    }
    let counts: Vec<String> = session
        .tool_limits
        .iter()
        .map(|limit| limit.calls.to_string())
        .collect();
    Some(format!("{{{}}}", counts.join(",")))
}

/// The session's open reservations as two array literals (ids, lapse instants), for the
/// batch statement: an array of arrays must be rectangular.
pub(super) fn reservations_literals(session: &TaskSession) -> (String, String) {
    let ids: Vec<String> = session
        .reservations
        .iter()
        .map(|open| open.reservation_id.to_string())
        .collect();
    let until: Vec<String> = session
        .reservations
        .iter()
        .map(|open| {
            format!(
                "\"{}\"",
                open.expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            )
        })
        .collect();
    (
        format!("{{{}}}", ids.join(",")),
        format!("{{{}}}", until.join(",")),
    )
}

/// An event as encoded for `jsonb_to_recordset` (the update statements).
#[derive(serde::Serialize)]
pub(super) struct EventJson<'a> {
    event_key: Uuid,
    kind: &'static str,
    tools: &'a [String],
    calls_made: i64,
    rate_window_calls: i64,
    status: &'static str,
    occurred_at: DateTime<Utc>,
    instance_id: Uuid,
    /// `AuditEvent::tool_calls`, as two parallel arrays; left out (NULL in the row) when
    /// empty, so an event of a session without limits encodes as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    limited_tools: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<i64>>,
    /// `AuditEvent::cost`, `share_id` and `budget_id`; left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    share_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_id: Option<&'a str>,
    /// `AuditEvent::reservation`: when the reservation the event makes lapses, or the
    /// reservation it settles and the actual cost; left out when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settles: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settled_at_cost: Option<i64>,
}

impl<'a> From<&'a AuditEvent> for EventJson<'a> {
    fn from(event: &'a AuditEvent) -> Self {
        let counted = !event.tool_calls.is_empty();
        EventJson {
            event_key: event.key,
            kind: event.kind.as_str(),
            tools: &event.tools,
            calls_made: to_bigint(event.calls_made),
            rate_window_calls: to_bigint(event.rate_window_calls),
            status: event.status.as_str(),
            occurred_at: event.occurred_at,
            instance_id: event.instance_id,
            limited_tools: counted
                .then(|| event.tool_calls.iter().map(|count| &*count.tool).collect()),
            tool_calls: counted.then(|| {
                event
                    .tool_calls
                    .iter()
                    .map(|count| to_bigint(count.calls))
                    .collect()
            }),
            cost: event.cost,
            share_id: event.share_id,
            budget_id: event.budget_id.as_ref().map(BudgetId::as_str),
            reserved_until: match event.reservation {
                Some(ReservationChange::Made { expires_at }) => Some(expires_at),
                _ => None,
            },
            settles: match event.reservation {
                Some(ReservationChange::Settled { reservation_id, .. }) => Some(reservation_id),
                _ => None,
            },
            settled_at_cost: match event.reservation {
                Some(ReservationChange::Settled { charged, .. }) => Some(to_bigint(charged)),
                _ => None,
            },
        }
    }
}

/// An event of a batch, tagged with its session.
#[derive(serde::Serialize)]
pub(super) struct BatchEventJson<'a> {
    pub(super) session_id: Uuid,
    #[serde(flatten)]
    pub(super) event: EventJson<'a>,
}

/// A denial as encoded for `jsonb_to_recordset` (`record_denials.sql`).
#[derive(serde::Serialize)]
pub(super) struct DenialJson<'a> {
    session_id: Uuid,
    agent_id: Uuid,
    presented_agent_id: Option<Uuid>,
    tool_count: i32,
    session_created_at: DateTime<Utc>,
    #[serde(flatten)]
    event: EventJson<'a>,
    reason: Option<&'static str>,
}

impl<'a> From<&'a Denial> for DenialJson<'a> {
    fn from(denial: &'a Denial) -> Self {
        DenialJson {
            session_id: denial.session_id,
            agent_id: denial.agent_id,
            presented_agent_id: denial.presented_agent_id,
            // At most `limits::MAX_TOOLS` for a call the policy read; more only for a batch
            // it refused as too large, whose count is then kept as the largest `integer`.
            tool_count: i32::try_from(denial.tool_count).unwrap_or(i32::MAX),
            session_created_at: denial.session_created_at,
            event: EventJson::from(&denial.event),
            reason: denial.event.reason.map(DenialReason::as_str),
        }
    }
}

/// Counts are validated to fit `bigint` at creation and only grow up to the budget, so this
/// never saturates for a session the store created; a saturated value would be refused by
/// a CHECK constraint rather than wrap.
pub(super) fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
