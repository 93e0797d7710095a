//! The service's wire format: request and response bodies (their OpenAPI schemas derive
//! from these types), and the one error body every failure answers with.
//!
//! # Invariant: one error shape, nothing leaked
//! Every error is `{"error": <code>, "message": <text>}` with the status of
//! `status_code_for_error`. For a [`SessionError`] the code is its variant in snake_case and
//! the message its opaque `Display`; for a request the service refused before the store
//! (bad JSON, a bad id, a body too large, a missing token) the message names the problem
//! without echoing the input. Nothing is written for any refused request.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::openapi;
use crate::budget::{BudgetId, BudgetTerms, BudgetUsage};
use crate::http::status::{Status, Warning};
use crate::http::{error_code, status_code_for_error};
use crate::model::{Reservation, SessionSummary, Settlement};
use crate::operator::report::{EventRecord, SessionLine};
use crate::{SessionError, TaskSession};

/// Every error body.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// A stable code: the error variant in snake_case (`budget_exceeded`,
    /// `storage_write_through`, …), or `invalid_request`, `unauthorized`, `forbidden`,
    /// `payload_too_large`, `not_found`.
    pub(crate) error: &'static str,
    /// A fixed, human-readable text; never contains an id, a count or a tool name.
    pub(crate) message: String,
}

/// A failure, as answered.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error,
                message: message.into(),
            },
            retry_after_secs: None,
        }
    }

    /// 400: the request was malformed; nothing was written.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
    }

    pub(crate) fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not use this route",
        )
    }

    pub(crate) fn no_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub(crate) fn no_budget() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such budget")
    }

    /// The status, the JSON body and the `Retry-After` seconds, as answered over HTTP, for
    /// a transport that writes them in its own form (gRPC's `DeniedHttpResponse`).
    pub(crate) fn parts(&self) -> (StatusCode, String, Option<u64>) {
        // An ErrorBody is a static str and a String: it always serializes.
        let body = serde_json::to_string(&self.body).unwrap_or_default();
        (self.status, body, self.retry_after_secs)
    }

    /// The error's stable code (`budget_exceeded`, `invalid_request`, …).
    pub(crate) fn code(&self) -> &'static str {
        self.body.error
    }

    /// 413: a body larger than `limit` bytes.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 401 on `/mcp`: no session token, or one that authenticates for no session.
    pub(crate) fn session_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid session token is required (Authorization: Bearer <session_token>)",
        )
    }

    /// 503 on `/mcp`: the upstream MCP server did not answer.
    pub(crate) fn upstream_unavailable(message: &'static str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_unavailable",
            message,
        )
    }

    /// The error answered for `err`, with `Retry-After` for a full rate window.
    pub(crate) fn session(err: &SessionError, retry_after_secs: Option<u64>) -> Self {
        let status = StatusCode::from_u16(status_code_for_error(err))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError {
            retry_after_secs,
            ..Self::new(status, error_code(err), err.to_string())
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> Self {
        ApiError::session(&err, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A JSON body whose rejections answer in the service's error shape: 413 past the body
/// limit, 400 for anything else (malformed JSON, a wrong type, an unknown field, a missing
/// content type).
#[derive(Debug)]
pub(crate) struct Body<T>(pub(crate) T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(rejected(rejection.status(), rejection.body_text())),
        }
    }
}

/// The error for a body axum refused with `status`.
pub(crate) fn rejected(status: StatusCode, detail: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than 64 KiB",
        );
    }
    tracing::debug!(%status, %detail, "request body refused");
    ApiError::invalid("the request body is not the expected JSON")
}

/// Whole numbers as JSON may write them: `7`, or `7.0` (JSON Schema's `integer` admits
/// both, so a client that trusts the schema may send either). Anything with a fraction, a
/// sign or past `u64` is refused like any other malformed body.
mod whole {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserialize, Deserializer, Visitor};

    /// A whole number.
    struct Whole(u64);

    impl<'de> Deserialize<'de> for Whole {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct WholeVisitor;
            impl Visitor<'_> for WholeVisitor {
                type Value = Whole;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a whole number")
                }
                fn visit_u64<E: de::Error>(self, value: u64) -> Result<Whole, E> {
                    Ok(Whole(value))
                }
                fn visit_i64<E: de::Error>(self, value: i64) -> Result<Whole, E> {
                    u64::try_from(value)
                        .map(Whole)
                        .map_err(|_| E::custom("a negative number"))
                }
                // `as` is exact here: checked first to be whole, not negative and below 2^64.
                fn visit_f64<E: de::Error>(self, value: f64) -> Result<Whole, E> {
                    // 2^64, exactly representable.
                    const END: f64 = 18_446_744_073_709_551_616.0;
                    if value.fract() == 0.0 && (0.0..END).contains(&value) {
                        Ok(Whole(value as u64))
                    } else {
                        Err(E::custom("not a whole number"))
                    }
                }
            }
            deserializer.deserialize_any(WholeVisitor)
        }
    }

    pub(super) fn one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        Whole::deserialize(deserializer).map(|whole| whole.0)
    }

    pub(super) fn optional<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        Option::<Whole>::deserialize(deserializer).map(|whole| whole.map(|whole| whole.0))
    }

    pub(super) fn map<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, u64>, D::Error> {
        BTreeMap::<String, Whole>::deserialize(deserializer)
            .map(|map| map.into_iter().map(|(key, whole)| (key, whole.0)).collect())
    }
}

/// `POST /v1/sessions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    /// The agent the session is bound to.
    pub(crate) agent_id: Uuid,
    /// Tools the agent may call; `["*"]` allows every tool.
    #[schema(schema_with = openapi::authorized_tools)]
    pub(crate) authorized_tools: Vec<String>,
    /// Total calls allowed.
    #[schema(schema_with = openapi::call_budget)]
    #[serde(deserialize_with = "whole::one")]
    pub(crate) call_budget: u64,
    /// How long the session lives, in seconds.
    #[schema(schema_with = openapi::time_limit_secs)]
    #[serde(deserialize_with = "whole::one")]
    pub(crate) time_limit_secs: u64,
    /// Calls allowed per rate window.
    #[schema(schema_with = openapi::rate_limit_per_minute)]
    #[serde(default, deserialize_with = "whole::optional")]
    pub(crate) rate_limit_per_minute: Option<u64>,
    /// Length of the rate window in seconds (default 60).
    #[schema(schema_with = openapi::rate_window_secs)]
    #[serde(default, deserialize_with = "whole::optional")]
    pub(crate) rate_limit_window_secs: Option<u64>,
    /// What the agent says it is doing.
    #[schema(schema_with = openapi::declared_intent)]
    pub(crate) declared_intent: Option<String>,
    /// Who delegated to the agent.
    #[schema(schema_with = openapi::delegation_chain)]
    pub(crate) delegation_chain: Option<Vec<String>>,
    /// Credentials the agent may use.
    #[schema(schema_with = openapi::authorized_credentials)]
    pub(crate) authorized_credentials: Option<Vec<String>>,
    /// `public`, `internal`, `confidential` or `restricted`.
    #[schema(schema_with = openapi::sensitivity)]
    pub(crate) data_sensitivity_ceiling: Option<String>,
    /// Refuse the create (429 `too_many_sessions`) if the agent already has this many live
    /// sessions, decided across every process.
    #[schema(schema_with = openapi::max_live_sessions)]
    #[serde(default, deserialize_with = "whole::optional")]
    pub(crate) max_live_sessions: Option<u64>,
    /// Call limits of single tools inside the budget, by tool name (each at least 1, each
    /// tool authorized by `authorized_tools`); none by default.
    #[schema(schema_with = openapi::tool_limits)]
    #[serde(default, deserialize_with = "whole::map")]
    pub(crate) tool_limits: BTreeMap<String, u64>,
    /// The shared budget the session's calls are charged to (it must exist).
    #[schema(schema_with = openapi::session_budget_id)]
    pub(crate) budget_id: Option<String>,
    /// What a call of a tool costs in the shared budget's units, by tool name (0 allowed;
    /// a tool without an entry costs 1); only with `budget_id`.
    #[schema(schema_with = openapi::tool_costs)]
    #[serde(default, deserialize_with = "whole::map")]
    pub(crate) tool_costs: BTreeMap<String, u64>,
}

/// A session.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionView {
    pub(crate) session_id: Uuid,
    pub(crate) agent_id: Uuid,
    /// `active`, `closed` or `expired`.
    pub(crate) status: &'static str,
    pub(crate) calls_made: u64,
    pub(crate) call_budget: u64,
    pub(crate) calls_remaining: u64,
    pub(crate) authorized_tools: Vec<String>,
    pub(crate) rate_limit_per_minute: Option<u64>,
    pub(crate) rate_limit_window_secs: u64,
    pub(crate) rate_window_calls: u64,
    pub(crate) declared_intent: String,
    pub(crate) data_sensitivity_ceiling: &'static str,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) expires_at: DateTime<Utc>,
    /// The tools with a call limit of their own, by name.
    pub(crate) tool_limits: BTreeMap<String, ToolLimitView>,
    /// The shared budget the session's calls are charged to.
    pub(crate) budget_id: Option<String>,
    /// What a call of a tool costs in the shared budget, for the tools that cost other
    /// than 1.
    pub(crate) tool_costs: BTreeMap<String, u64>,
}

/// `POST /v1/sessions`: the session, and its bearer token.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedView {
    #[serde(flatten)]
    pub(crate) session: SessionView,
    /// The session's bearer token, shown this once (only its digest is kept): the agent
    /// presents it to the MCP proxy (`Authorization: Bearer …` on `/mcp`), which binds it
    /// to this session and its agent.
    pub(crate) session_token: String,
}

/// `POST /v1/sessions/{id}/close`: the session, and what it came to.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CloseAnswer {
    #[serde(flatten)]
    pub(crate) session: SessionView,
    /// What the session came to; absent only if its trail could not be read just then
    /// (the close itself is done).
    pub(crate) summary: Option<SummaryView>,
}

/// What a session came to, from its row and its audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SummaryView {
    pub(crate) calls_made: u64,
    pub(crate) call_budget: u64,
    /// `calls_made` as a percentage of `call_budget`, to one decimal.
    pub(crate) budget_used_percent: f64,
    /// Seconds the session ran (until its close, or its time limit if that came first).
    pub(crate) time_used_secs: u64,
    pub(crate) time_limit_secs: u64,
    /// `time_used_secs` as a percentage of `time_limit_secs`, to one decimal.
    pub(crate) time_used_percent: f64,
    /// Denied attempts in the audit trail, by reason (`budget`, `tool`, `tool_budget`,
    /// `rate`, `agent_mismatch`, `closed`, `expired`, `shared_budget`, `write_through`,
    /// `invalid`); reasons with none are left out.
    pub(crate) denials: BTreeMap<String, u64>,
    /// Units charged to the session's shared budget (0 without one).
    pub(crate) budget_units_charged: u64,
}

impl From<&SessionSummary> for SummaryView {
    fn from(s: &SessionSummary) -> Self {
        let secs = |d: chrono::Duration| u64::try_from(d.num_seconds()).unwrap_or(0);
        SummaryView {
            calls_made: s.calls_made,
            call_budget: s.call_budget,
            budget_used_percent: s.budget_used_percent(),
            time_used_secs: secs(s.time_used),
            time_limit_secs: secs(s.time_limit),
            time_used_percent: s.time_used_percent(),
            denials: s.denials.clone(),
            budget_units_charged: s.budget_units,
        }
    }
}

/// A tool's own call limit and its calls so far.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ToolLimitView {
    pub(crate) limit: u64,
    pub(crate) calls: u64,
}

impl From<&TaskSession> for SessionView {
    fn from(s: &TaskSession) -> Self {
        SessionView {
            session_id: s.session_id,
            agent_id: s.agent_id,
            status: s.status.as_str(),
            calls_made: s.calls_made,
            call_budget: s.call_budget,
            calls_remaining: s.calls_remaining(),
            authorized_tools: s.authorized_tools.to_vec(),
            rate_limit_per_minute: s.rate_limit_per_minute,
            rate_limit_window_secs: s.rate_limit_window_secs,
            rate_window_calls: s.rate_window_calls,
            declared_intent: s.declared_intent.to_string(),
            data_sensitivity_ceiling: s.data_sensitivity_ceiling.as_str(),
            created_at: s.created_at,
            expires_at: s.expires_at,
            tool_limits: s
                .tool_limits
                .iter()
                .map(|l| {
                    let view = ToolLimitView {
                        limit: l.limit,
                        calls: l.calls,
                    };
                    (l.tool.to_string(), view)
                })
                .collect(),
            budget_id: s.budget_id.as_ref().map(ToString::to_string),
            tool_costs: s
                .tool_costs
                .iter()
                .map(|c| (c.tool.to_string(), c.cost))
                .collect(),
        }
    }
}

/// `POST /v1/sessions/{id}/use`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UseBody {
    /// The tool the agent is about to call.
    #[schema(schema_with = openapi::name)]
    pub(crate) tool: String,
    /// The agent presenting the session.
    pub(crate) agent_id: Uuid,
    /// What the call costs in the session's shared budget, instead of its `tool_costs`.
    #[schema(schema_with = openapi::optional_cost)]
    #[serde(default, deserialize_with = "whole::optional")]
    pub(crate) cost: Option<u64>,
}

/// `POST /v1/sessions/{id}/use-batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UseBatchBody {
    /// The tools, one call each, all or nothing.
    #[schema(schema_with = openapi::batch_tools)]
    pub(crate) tools: Vec<String>,
    /// The agent presenting the session.
    pub(crate) agent_id: Uuid,
    /// What the whole batch costs in the session's shared budget, instead of the sum of
    /// its tools' costs.
    #[schema(schema_with = openapi::optional_cost)]
    #[serde(default, deserialize_with = "whole::optional")]
    pub(crate) cost: Option<u64>,
}

/// An allowed use, with what is left (the same figures as its `x-arbiter-*` headers).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UseAnswer {
    pub(crate) calls_made: u64,
    /// Calls left in the session's budget (`x-arbiter-calls-remaining`).
    pub(crate) calls_remaining: u64,
    /// `active`, `closed` or `expired`.
    pub(crate) status: &'static str,
    /// Whole seconds before the session expires (`x-arbiter-seconds-remaining`).
    pub(crate) seconds_remaining: u64,
    /// Units left in the session's shared budget, at the level of its chain with the
    /// least left, read at most a second ago (`x-arbiter-budget-remaining`); absent
    /// without a shared budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) budget_remaining: Option<u64>,
    /// What runs low: under a tenth of the calls or the shared budget's units
    /// (`budget_low`), of the time (`time_low`) (`x-arbiter-warning`).
    pub(crate) warnings: Vec<WarningView>,
}

impl UseAnswer {
    pub(crate) fn new(s: &TaskSession, signals: &Status) -> Self {
        UseAnswer {
            calls_made: s.calls_made,
            calls_remaining: signals.calls_remaining,
            status: s.status.as_str(),
            seconds_remaining: signals.seconds_remaining,
            budget_remaining: signals.budget.map(|b| b.remaining),
            warnings: signals
                .warnings
                .iter()
                .copied()
                .map(WarningView::from)
                .collect(),
        }
    }
}

/// A warning of an allowed answer.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WarningView {
    BudgetLow,
    TimeLow,
}

impl From<Warning> for WarningView {
    fn from(warning: Warning) -> Self {
        match warning {
            Warning::BudgetLow => WarningView::BudgetLow,
            Warning::TimeLow => WarningView::TimeLow,
        }
    }
}

/// `POST /v1/sessions/{id}/reserve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveBody {
    /// The tool the agent is about to call.
    #[schema(schema_with = openapi::name)]
    pub(crate) tool: String,
    /// The agent presenting the session.
    pub(crate) agent_id: Uuid,
    /// The estimated cost, in the session's shared budget's units: charged now, and
    /// replaced by the actual cost when settled.
    #[schema(schema_with = openapi::estimate)]
    #[serde(deserialize_with = "whole::one")]
    pub(crate) cost: u64,
}

/// The answer to a reservation: as `/use`, with the reservation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReserveAnswer {
    #[serde(flatten)]
    pub(crate) answer: UseAnswer,
    /// The id to settle it by (`POST /v1/reservations/{reservation_id}/settle`).
    pub(crate) reservation_id: Uuid,
    /// The units it holds.
    pub(crate) estimate: u64,
    /// When it lapses, settled at its estimate.
    pub(crate) expires_at: DateTime<Utc>,
}

impl ReserveAnswer {
    pub(crate) fn new(r: &Reservation, signals: &Status) -> Self {
        ReserveAnswer {
            answer: UseAnswer::new(&r.session, signals),
            reservation_id: r.reservation_id,
            estimate: r.estimate,
            expires_at: r.expires_at,
        }
    }
}

/// `POST /v1/reservations/{reservation_id}/settle`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SettleBody {
    /// The actual cost, in the budget's units.
    #[schema(schema_with = openapi::cost)]
    #[serde(deserialize_with = "whole::one")]
    pub(crate) cost: u64,
}

/// A settled reservation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SettleAnswer {
    pub(crate) reservation_id: Uuid,
    /// Units charged in all: the actual cost.
    pub(crate) charged: u64,
    /// Units of the estimate given back to the budget.
    pub(crate) released: u64,
    /// Units charged above the estimate (they may take the budget past its limit).
    pub(crate) overrun: u64,
}

impl From<&Settlement> for SettleAnswer {
    fn from(s: &Settlement) -> Self {
        SettleAnswer {
            reservation_id: s.reservation_id,
            charged: s.charged,
            released: s.released,
            overrun: s.overrun,
        }
    }
}

/// `GET /v1/sessions`: which sessions, and which page.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SessionsQuery {
    /// Only this agent's sessions.
    pub(crate) agent_id: Option<Uuid>,
    /// Only sessions with this status now (`expired`: marked, or active past its time
    /// limit).
    #[param(inline, value_type = Option<StatusFilter>)]
    pub(crate) status: Option<StatusFilter>,
    /// Only sessions charged to this shared budget.
    #[param(pattern = "^[A-Za-z0-9.:/-]{1,128}$")]
    pub(crate) budget_id: Option<String>,
    /// Only sessions created at or after this instant (RFC 3339).
    pub(crate) created_since: Option<DateTime<Utc>>,
    /// Most sessions in the page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub(crate) limit: Option<u32>,
    /// Where the page starts: the `next_cursor` of the page before (absent: the newest).
    #[param(pattern = "^[0-9]{1,18}-[0-9a-f]{32}$")]
    pub(crate) cursor: Option<String>,
}

/// `value` if it falls in the years 0000 to 9999 (RFC 3339's, and within PostgreSQL's
/// range, which a year chrono parses with a sign may pass), else 400 naming `field`.
pub(crate) fn in_four_digit_years<T: Datelike>(
    field: &str,
    value: Option<T>,
) -> Result<Option<T>, ApiError> {
    match value {
        Some(when) if !(0..=9999).contains(&when.year()) => Err(ApiError::invalid(format!(
            "{field} must fall in the years 0000 to 9999"
        ))),
        _ => Ok(value),
    }
}

/// A status to list sessions by.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StatusFilter {
    Active,
    Closed,
    Expired,
}

impl StatusFilter {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StatusFilter::Active => "active",
            StatusFilter::Closed => "closed",
            StatusFilter::Expired => "expired",
        }
    }
}

/// One page of sessions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SessionPage {
    pub(crate) sessions: Vec<SessionLine>,
    /// The cursor of the next page; absent on the last.
    pub(crate) next_cursor: Option<String>,
}

/// `GET /v1/sessions/{id}/events`: which page.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Most events in the page (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub(crate) limit: Option<u32>,
    /// Where the page starts: the `next_cursor` of the page before (absent: the first).
    #[param(pattern = "^[0-9]{1,18}-[0-9]{1,18}$")]
    pub(crate) cursor: Option<String>,
}

/// One page of a session's audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventPage {
    pub(crate) session_id: Uuid,
    /// Whether both of the session's hash chains (its state changes, its denials) verify,
    /// over its whole trail.
    pub(crate) chain_intact: bool,
    /// The first link that does not verify, when one does not.
    pub(crate) broken_link: Option<String>,
    /// The events, in the order they happened.
    pub(crate) events: Vec<EventView>,
    /// The cursor of the next page; absent on the last.
    pub(crate) next_cursor: Option<String>,
}

/// One audit event.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventView {
    pub(crate) event_id: i64,
    pub(crate) occurred_at: DateTime<Utc>,
    /// `created`, `call_allowed`, `batch_allowed`, `settled`, `closed`, `expired`,
    /// `reconciled` or `denied`.
    pub(crate) kind: String,
    /// Why a call was denied (denials only).
    pub(crate) reason: Option<String>,
    pub(crate) tools: Vec<String>,
    /// Calls made after the event.
    pub(crate) calls_made: i64,
    /// Status after the event.
    pub(crate) status: String,
    /// The session's version after the event (none for denials).
    pub(crate) session_version: Option<i64>,
    /// Denials: the agent that presented the session.
    pub(crate) presented_agent_id: Option<Uuid>,
    /// The event's link in its hash chain, hex.
    pub(crate) hash: Option<String>,
}

impl From<&EventRecord> for EventView {
    fn from(e: &EventRecord) -> Self {
        EventView {
            event_id: e.event_id,
            occurred_at: e.occurred_at,
            kind: e.kind.clone(),
            reason: e.reason.clone(),
            tools: e.tools.clone(),
            calls_made: e.calls_made,
            status: e.status.clone(),
            session_version: e.session_version,
            presented_agent_id: e.presented_agent_id,
            hash: e.hash.clone(),
        }
    }
}

/// `GET /v1/agents/{agent_id}/live-sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LiveCount {
    /// Active sessions not past their time limit, across every process.
    pub(crate) count: u64,
}

/// `POST /v1/agents/{agent_id}/close-all`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Closed {
    /// Sessions this call closed.
    pub(crate) closed: usize,
}

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok`, or why the service is not ready.
    pub(crate) status: &'static str,
}

/// `PUT /v1/budgets/{budget_id}`: a budget's terms. Only `limit` is required.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BudgetBody {
    /// Units allowed per period.
    #[schema(schema_with = openapi::limit)]
    #[serde(deserialize_with = "whole::one")]
    pub(crate) limit: u64,
    /// `none` (the default: one period that never ends), `day` or `month`.
    #[schema(schema_with = openapi::period)]
    pub(crate) period: Option<String>,
    /// The budget charged with this one's charges too.
    #[schema(schema_with = openapi::budget_id)]
    pub(crate) parent_id: Option<String>,
    /// What a unit is, for people (default `calls`).
    #[schema(schema_with = openapi::unit)]
    pub(crate) unit: Option<String>,
    /// The IANA time zone whose midnight starts a day or a month (default `UTC`).
    #[schema(schema_with = openapi::time_zone)]
    pub(crate) time_zone: Option<String>,
}

impl BudgetBody {
    /// The terms, checked as far as the service can without the database.
    pub(crate) fn into_terms(self) -> Result<BudgetTerms, SessionError> {
        let mut terms = BudgetTerms::new(self.limit);
        if let Some(period) = self.period {
            terms.period = period.parse()?;
        }
        terms.parent_id = self.parent_id.map(BudgetId::new).transpose()?;
        if let Some(unit) = self.unit {
            terms.unit = unit;
        }
        if let Some(zone) = self.time_zone {
            terms.time_zone = zone;
        }
        Ok(terms)
    }
}

/// A budget, its terms and its current period's usage.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BudgetView {
    pub(crate) budget_id: String,
    pub(crate) parent_id: Option<String>,
    /// Units allowed per period.
    pub(crate) limit: u64,
    /// `none`, `day` or `month`.
    pub(crate) period: &'static str,
    pub(crate) unit: String,
    pub(crate) time_zone: String,
    /// When the current period started (the epoch for `none`).
    pub(crate) period_start: DateTime<Utc>,
    /// When it ends; absent for `none`.
    pub(crate) period_end: Option<DateTime<Utc>>,
    /// Units spent in the current period, by this budget's sessions and those of every
    /// budget below it.
    pub(crate) used: u64,
    /// Units held by reservations not yet settled.
    pub(crate) reserved: u64,
    /// Units of `used` that settlements charged above their estimates.
    pub(crate) overrun: u64,
    /// `limit - used - reserved`, or 0.
    pub(crate) remaining: u64,
}

impl From<&BudgetUsage> for BudgetView {
    fn from(b: &BudgetUsage) -> Self {
        BudgetView {
            budget_id: b.budget_id.to_string(),
            parent_id: b.terms.parent_id.as_ref().map(ToString::to_string),
            limit: b.terms.limit,
            period: b.terms.period.as_str(),
            unit: b.terms.unit.clone(),
            time_zone: b.terms.time_zone.clone(),
            period_start: b.period_start,
            period_end: b.period_end,
            used: b.used,
            reserved: b.reserved,
            overrun: b.overrun,
            remaining: b.remaining(),
        }
    }
}

/// `GET /v1/budgets`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BudgetList {
    /// Every budget, by id.
    pub(crate) budgets: Vec<BudgetView>,
}
