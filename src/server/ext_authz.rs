//! Envoy's external authorization, whichever way it arrives: HTTP (`/v1/check`, in
//! `routes`) or gRPC (`envoy.service.auth.v3.Authorization/Check`, in `grpc`).
//!
//! # Invariant: one decision, whichever transport
//! Each transport only reads its request into an [`Ask`] and writes [`decide`]'s outcome in
//! its own form: the same fields decide (`crate::http::check`), the same calls are counted,
//! an allowed check carries the same status signals (`crate::http::status`) and drops the
//! same client headers, and a denied one the same status, JSON body and `Retry-After` as
//! the HTTP route would answer.

use uuid::Uuid;

use crate::TaskSession;
use crate::http::check::{PARTIAL_BODY_HEADER, tools_to_decide};
use crate::http::status::{Status, is_arbiter_header};
use crate::http::{SESSION_HEADER, parse_session_header};

use super::AppState;
use super::api::ApiError;
use super::routes::denied;

/// The header that names the presenting agent.
pub(crate) const AGENT_HEADER: &str = "x-arbiter-agent";
/// The header that names the tool, when the body has no `tools/call` (see
/// `crate::http::check` for how the two are decided).
pub(crate) const TOOL_HEADER: &str = "x-arbiter-tool";
/// The header that gives a checked call's cost in its session's shared budget.
pub(crate) const COST_HEADER: &str = "x-arbiter-cost";
/// The header of an allowed HTTP check that tells Envoy which of the request's headers to
/// drop before it goes on (gRPC has `OkHttpResponse.headers_to_remove` instead).
pub(crate) const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// What a check request carries, whichever transport brought it.
#[derive(Debug)]
pub(crate) struct Ask<'a> {
    session: Option<&'a [u8]>,
    agent: Option<&'a [u8]>,
    tool: Option<&'a [u8]>,
    cost: Option<&'a [u8]>,
    truncated: bool,
    body: &'a [u8],
    /// The names of the request's `x-arbiter-*` headers, lowercase.
    arbiter_headers: Vec<String>,
}

/// An allowed check.
#[derive(Debug)]
pub(crate) struct Allowed {
    pub(crate) session: TaskSession,
    pub(crate) status: Status,
    /// The client's `x-arbiter-*` headers to drop before the request goes on: every one
    /// the answer does not set itself (those it sets replace the client's).
    pub(crate) strip: Vec<String>,
}

impl<'a> Ask<'a> {
    /// The ask of a request whose header `name` (lowercase) is `header(name)`, whose header
    /// names are `names`, and whose forwarded body is `body`.
    pub(crate) fn new<'n>(
        header: impl Fn(&str) -> Option<&'a [u8]>,
        names: impl IntoIterator<Item = &'n str>,
        body: &'a [u8],
    ) -> Self {
        Ask {
            session: header(&SESSION_HEADER.to_ascii_lowercase()),
            agent: header(AGENT_HEADER),
            tool: header(TOOL_HEADER),
            cost: header(COST_HEADER),
            truncated: header(PARTIAL_BODY_HEADER)
                .is_some_and(|value| value.eq_ignore_ascii_case(b"true")),
            body,
            arbiter_headers: names
                .into_iter()
                .filter(|name| is_arbiter_header(name))
                .map(str::to_ascii_lowercase)
                .collect(),
        }
    }
}

/// Decides `ask` with `state`'s store: the calls it names, all or nothing.
///
/// # Errors
/// The error to answer: 400 for a request that cannot be decided (nothing counted), else
/// the denial.
pub(crate) async fn decide(state: &AppState, ask: &Ask<'_>) -> Result<Allowed, ApiError> {
    let id = header_id(ask.session, SESSION_HEADER)?;
    let agent = header_id(ask.agent, AGENT_HEADER)?;
    let tools = tools_to_decide(ask.tool, ask.body, ask.truncated).map_err(|refusal| {
        tracing::warn!(session_id = %id, %refusal, "check refused before the store");
        ApiError::invalid(refusal.to_string())
    })?;
    let cost = header_cost(ask.cost)?;
    let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
    let used = match cost {
        Some(cost) => {
            state
                .store
                .use_session_batch_with_cost(id, &tools, Some(agent), cost)
                .await
        }
        None => state.store.use_session_batch(id, &tools, Some(agent)).await,
    };
    match used {
        Ok(session) => {
            let status = state.signals.of(&session).await;
            let set = status.headers();
            let strip = ask
                .arbiter_headers
                .iter()
                .filter(|name| !set.iter().any(|(set, _)| set == name))
                .cloned()
                .collect();
            Ok(Allowed {
                session,
                status,
                strip,
            })
        }
        Err(err) => Err(denied(state, id, err).await),
    }
}

/// The session or agent id of header `name`: a UUID, else 400.
fn header_id(value: Option<&[u8]>, name: &str) -> Result<Uuid, ApiError> {
    value
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(parse_session_header)
        .ok_or_else(|| ApiError::invalid(format!("the {name} header must be a UUID")))
}

/// The call's cost from `x-arbiter-cost`, if sent: a decimal integer, else 400.
fn header_cost(value: Option<&[u8]>) -> Result<Option<u64>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    std::str::from_utf8(value)
        .ok()
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(format!("the {COST_HEADER} header must be a whole number"))
        })
}
