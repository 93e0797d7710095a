//! The routes: each handler checks the caller's role, parses, and makes one call of the
//! store; the OpenAPI document (`openapi`) is derived from these handlers and the types of
//! `api`.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use metrics_exporter_prometheus::PrometheusHandle;
use uuid::Uuid;

use crate::budget::{BudgetId, BudgetWrite};
use crate::http::status::Status;
use crate::model::DataSensitivity;
use crate::operator::{chain, report};
use crate::{CreateSessionRequest, SessionError, TaskSession, TokenSecret};

use super::AppState;
use super::api::{
    ApiError, Body, BudgetBody, BudgetList, BudgetView, CloseAnswer, Closed, CreateBody,
    CreatedView, ErrorBody, EventPage, EventView, EventsQuery, Health, LiveCount, ReserveAnswer,
    ReserveBody, SessionPage, SessionView, SessionsQuery, SettleAnswer, SettleBody, SummaryView,
    UseAnswer, UseBatchBody, UseBody, in_four_digit_years,
};
use super::auth::{Caller, Role};
use super::cursor;
use super::ext_authz::{self, Ask, HEADERS_TO_REMOVE};
use super::readiness::Ready;

/// A session or agent id from the path; anything but a UUID is 400 `invalid_request`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Id(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<Uuid>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Id(id)),
            Err(_) => Err(ApiError::invalid("the id in the path is not a UUID")),
        }
    }
}

impl CreateBody {
    fn into_request(self) -> Result<CreateSessionRequest, ApiError> {
        let secs = i64::try_from(self.time_limit_secs)
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .ok_or_else(|| ApiError::invalid("time_limit_secs is out of range"))?;
        let mut req =
            CreateSessionRequest::new(self.agent_id, self.authorized_tools, self.call_budget, secs);
        req.rate_limit_per_minute = self.rate_limit_per_minute;
        if let Some(window) = self.rate_limit_window_secs {
            req.rate_limit_window_secs = window;
        }
        if let Some(intent) = self.declared_intent {
            req.declared_intent = intent;
        }
        if let Some(chain) = self.delegation_chain {
            req.delegation_chain_snapshot = chain;
        }
        if let Some(credentials) = self.authorized_credentials {
            req.authorized_credentials = credentials;
        }
        req.tool_limits = self.tool_limits;
        req.budget_id = self.budget_id.map(BudgetId::new).transpose()?;
        req.tool_costs = self.tool_costs;
        if let Some(ceiling) = self.data_sensitivity_ceiling {
            req.data_sensitivity_ceiling = ceiling.parse::<DataSensitivity>().map_err(|_| {
                ApiError::invalid(
                    "data_sensitivity_ceiling must be public, internal, confidential or restricted",
                )
            })?;
        }
        Ok(req)
    }
}

/// Seconds until the rate window of `session` ends (at least 1).
fn retry_after(session: &TaskSession) -> u64 {
    let Some(started) = session.rate_window_started_at else {
        return 1;
    };
    let window = i64::try_from(session.rate_limit_window_secs).unwrap_or(i64::MAX);
    let ends = chrono::Duration::try_seconds(window).and_then(|w| started.checked_add_signed(w));
    ends.map_or(1, |ends| {
        let left = (ends - Utc::now()).num_milliseconds();
        // Rounded up: a client that waits this long finds a new window.
        std::cmp::max(u64::try_from((left + 999) / 1000).unwrap_or(0), 1)
    })
}

/// An allowed answer: the JSON body `answer` makes of the session's status signals, with
/// the same signals as `x-arbiter-*` headers.
async fn allowed<T: serde::Serialize>(
    state: &AppState,
    session: &TaskSession,
    answer: impl FnOnce(&Status) -> T,
) -> Response {
    let status = state.signals.of(session).await;
    let mut response = Json(answer(&status)).into_response();
    insert_signals(response.headers_mut(), &status);
    response
}

/// Sets the headers of `status` on `headers`.
pub(crate) fn insert_signals(headers: &mut HeaderMap, status: &Status) {
    for (name, value) in status.headers() {
        // Digits, commas and lowercase letters: always a valid header value.
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    }
}

/// The error for a denied use, with `Retry-After` when the rate window is full.
pub(crate) async fn denied(state: &AppState, id: Uuid, err: SessionError) -> ApiError {
    if matches!(err, SessionError::RateLimited { .. }) {
        // From the cache: the use that was just denied loaded the session.
        let secs = state.store.get(id).await.map_or(1, |s| retry_after(&s));
        return ApiError::session(&err, Some(secs));
    }
    ApiError::from(err)
}

/// Creates a session (admin).
#[utoipa::path(post, path = "/v1/sessions", request_body = CreateBody,
    responses((status = 201, body = CreatedView), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(body): Body<CreateBody>,
) -> Result<(StatusCode, Json<CreatedView>), ApiError> {
    caller.require(&[Role::Admin])?;
    let cap = body.max_live_sessions;
    let secret = TokenSecret::generate();
    let req = body.into_request()?.with_token(&secret);
    let session = match cap {
        Some(max) => state.store.create_if_under_cap(req, max).await?,
        None => state.store.create(req).await?,
    };
    Ok((
        StatusCode::CREATED,
        Json(CreatedView {
            session: SessionView::from(&session),
            session_token: secret.token_for(session.session_id).as_str().to_owned(),
        }),
    ))
}

/// One session (admin, gateway, viewer).
#[utoipa::path(get, path = "/v1/sessions/{id}", params(("id" = Uuid, Path)),
    responses((status = 200, body = SessionView), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_session(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
) -> Result<Json<SessionView>, ApiError> {
    caller.require(&[Role::Admin, Role::Gateway, Role::Viewer])?;
    let session = state.store.get(id).await?;
    Ok(Json(SessionView::from(&session)))
}

/// Counts one call of a tool (gateway).
#[utoipa::path(post, path = "/v1/sessions/{id}/use", params(("id" = Uuid, Path)),
    request_body = UseBody,
    responses((status = 200, body = UseAnswer), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn use_session(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
    Body(body): Body<UseBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Gateway])?;
    let used = match body.cost {
        Some(cost) => {
            state
                .store
                .use_session_with_cost(id, &body.tool, Some(body.agent_id), cost)
                .await
        }
        None => {
            state
                .store
                .use_session(id, &body.tool, Some(body.agent_id))
                .await
        }
    };
    match used {
        Ok(session) => {
            Ok(allowed(&state, &session, |status| UseAnswer::new(&session, status)).await)
        }
        Err(err) => Err(denied(&state, id, err).await),
    }
}

/// Counts one call per tool, all or nothing (gateway).
#[utoipa::path(post, path = "/v1/sessions/{id}/use-batch", params(("id" = Uuid, Path)),
    request_body = UseBatchBody,
    responses((status = 200, body = UseAnswer), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn use_batch(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
    Body(body): Body<UseBatchBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Gateway])?;
    let tools: Vec<&str> = body.tools.iter().map(String::as_str).collect();
    let used = match body.cost {
        Some(cost) => {
            state
                .store
                .use_session_batch_with_cost(id, &tools, Some(body.agent_id), cost)
                .await
        }
        None => {
            state
                .store
                .use_session_batch(id, &tools, Some(body.agent_id))
                .await
        }
    };
    match used {
        Ok(session) => {
            Ok(allowed(&state, &session, |status| UseAnswer::new(&session, status)).await)
        }
        Err(err) => Err(denied(&state, id, err).await),
    }
}

/// Reserves an estimated cost of the session's shared budget for one call of a tool, whose
/// actual cost is known only afterwards (gateway): decided like `/use` with that cost, and
/// held until settled, or until the reservation lapses (settled at its estimate).
#[utoipa::path(post, path = "/v1/sessions/{id}/reserve", params(("id" = Uuid, Path)),
    request_body = ReserveBody,
    responses((status = 200, body = ReserveAnswer), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
    Body(body): Body<ReserveBody>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Gateway])?;
    match state
        .store
        .reserve(id, &body.tool, Some(body.agent_id), body.cost)
        .await
    {
        Ok(reservation) => Ok(allowed(&state, &reservation.session, |status| {
            ReserveAnswer::new(&reservation, status)
        })
        .await),
        Err(err) => Err(denied(&state, id, err).await),
    }
}

/// Settles a reservation at its actual cost, once (gateway): the rest of the estimate goes
/// back to the budget; a cost above the estimate is charged in full as an overrun. A second
/// settlement, or one after the reservation lapsed, is 409.
#[utoipa::path(post, path = "/v1/reservations/{reservation_id}/settle",
    params(("reservation_id" = Uuid, Path)),
    request_body = SettleBody,
    responses((status = 200, body = SettleAnswer), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn settle(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
    Body(body): Body<SettleBody>,
) -> Result<Json<SettleAnswer>, ApiError> {
    caller.require(&[Role::Gateway])?;
    let settled = state.store.settle(id, body.cost).await?;
    Ok(Json(SettleAnswer::from(&settled)))
}

/// Closes a session (admin, gateway), and answers what it came to: calls made of the
/// budget, time used of the limit, denied attempts by reason and the units charged to its
/// shared budget, from its audit trail.
#[utoipa::path(post, path = "/v1/sessions/{id}/close", params(("id" = Uuid, Path)),
    responses((status = 200, body = CloseAnswer), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn close(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
) -> Result<Json<CloseAnswer>, ApiError> {
    caller.require(&[Role::Admin, Role::Gateway])?;
    let session = state.store.close(id).await?;
    // The close is done: a trail that cannot be read just now leaves the summary out
    // rather than answer the close as failed.
    let summary = state.store.summary(&session).await.ok();
    Ok(Json(CloseAnswer {
        session: SessionView::from(&session),
        summary: summary.as_ref().map(SummaryView::from),
    }))
}

/// Rows in a page of a listing (sessions, a trail), by default and at most.
const PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// The rows a page asks for: `limit`, by default [`PAGE`], 1 to [`MAX_PAGE`].
pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(PAGE);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid("limit must be 1 to 1000"))
    }
}

/// Reads the operator's views with `read`, within the store's storage timeout; a failure is
/// `storage_read` (503), about `session_id` if it names one.
pub(super) async fn read_views<T>(
    state: &AppState,
    session_id: Option<Uuid>,
    read: impl Future<Output = Result<T, crate::error::StorageError>>,
) -> Result<T, ApiError> {
    let failed = |detail: String| ApiError::from(SessionError::StorageRead { session_id, detail });
    tokio::time::timeout(state.storage_timeout, read)
        .await
        .map_err(|_| failed("the operator's views were not read in time".to_owned()))?
        .map_err(|err| failed(crate::error::error_chain(&err)))
}

/// `rows`, read with one row more than `limit`, cut to `limit`; the cursor of the next page
/// (`cursor_of` its last row) if there is one.
pub(super) fn next_page<T>(
    rows: &mut Vec<T>,
    limit: u32,
    cursor_of: impl Fn(&T) -> String,
) -> Option<String> {
    let limit = limit as usize;
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(cursor_of)
}

/// One page of the sessions, newest first, narrowed by agent, status, shared budget
/// and creation instant (admin, viewer).
#[utoipa::path(get, path = "/v1/sessions", params(SessionsQuery),
    responses((status = 200, body = SessionPage), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_sessions(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Json<SessionPage>, ApiError> {
    caller.require(&[Role::Admin, Role::Viewer])?;
    let Ok(Query(query)) = query else {
        return Err(ApiError::invalid(
            "the query may hold agent_id, status, budget_id, created_since, limit and cursor",
        ));
    };
    let limit = page_limit(query.limit)?;
    let budget_id = query.budget_id.map(BudgetId::new).transpose()?;
    let before = query
        .cursor
        .as_deref()
        .map(cursor::parse_instant_id)
        .transpose()?;
    let filter = report::SessionsFilter {
        agent: query.agent_id,
        status: query.status.map(|status| status.as_str().to_owned()),
        budget_id: budget_id.map(|id| id.as_str().to_owned()),
        created_since: in_four_digit_years("created_since", query.created_since)?,
    };
    let pool = state.store.storage().pool();
    let now = state.store.now();
    let read = report::sessions_page(pool, &filter, before, i64::from(limit) + 1, now);
    let mut page = read_views(&state, None, read).await?;
    let next_cursor = next_page(&mut page, limit, |last| {
        cursor::instant_id(last.created_at, last.session_id)
    });
    Ok(Json(SessionPage {
        sessions: page,
        next_cursor,
    }))
}

/// One page of a session's audit trail, in the order things happened, each event with its
/// link in the hash chain, and whether the session's chains verify (admin, viewer).
#[utoipa::path(get, path = "/v1/sessions/{id}/events", params(("id" = Uuid, Path), EventsQuery),
    responses((status = 200, body = EventPage), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn session_events(
    State(state): State<AppState>,
    caller: Caller,
    Id(id): Id,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    caller.require(&[Role::Admin, Role::Viewer])?;
    let Ok(Query(query)) = query else {
        return Err(ApiError::invalid(
            "the query may hold limit (1 to 1000) and cursor only",
        ));
    };
    let limit = page_limit(query.limit)?;
    let after = query
        .cursor
        .as_deref()
        .map(cursor::parse_instant_event)
        .transpose()?;
    // An unknown session is 404, as on every route that names one.
    state.store.get(id).await?;
    let pool = state.store.storage().pool();
    let read = async {
        let page = report::session_events_page(pool, id, after, i64::from(limit) + 1).await?;
        let chain = chain::verify_audit_chain(pool, id).await?;
        Ok::<_, crate::error::StorageError>((page, chain))
    };
    let (mut page, chain) = read_views(&state, Some(id), read).await?;
    let next_cursor = next_page(&mut page, limit, |last| {
        cursor::instant_event(last.occurred_at, last.event_id)
    });
    Ok(Json(EventPage {
        session_id: id,
        chain_intact: chain.is_intact(),
        broken_link: chain.broken.as_ref().map(ToString::to_string),
        events: page.iter().map(EventView::from).collect(),
        next_cursor,
    }))
}

/// Live sessions of an agent, across every process (admin, viewer).
#[utoipa::path(get, path = "/v1/agents/{agent_id}/live-sessions",
    params(("agent_id" = Uuid, Path)),
    responses((status = 200, body = LiveCount), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn live_sessions(
    State(state): State<AppState>,
    caller: Caller,
    Id(agent): Id,
) -> Result<Json<LiveCount>, ApiError> {
    caller.require(&[Role::Admin, Role::Viewer])?;
    let count = state.store.count_live_for_agent(agent).await?;
    Ok(Json(LiveCount { count }))
}

/// Closes every active session of an agent (admin).
#[utoipa::path(post, path = "/v1/agents/{agent_id}/close-all",
    params(("agent_id" = Uuid, Path)),
    responses((status = 200, body = Closed), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn close_all(
    State(state): State<AppState>,
    caller: Caller,
    Id(agent): Id,
) -> Result<Json<Closed>, ApiError> {
    caller.require(&[Role::Admin])?;
    let closed = state.store.close_sessions_for_agent(agent).await?;
    Ok(Json(Closed { closed }))
}

/// A budget id from the path (it may hold `/`); anything outside the alphabet is 400.
#[derive(Debug, Clone)]
pub(crate) struct BudgetPath(BudgetId);

impl<S: Send + Sync> FromRequestParts<S> for BudgetPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(Path(id)) = Path::<String>::from_request_parts(parts, state).await else {
            return Err(ApiError::invalid("the budget id in the path is not valid"));
        };
        BudgetId::new(id).map(BudgetPath).map_err(ApiError::from)
    }
}

/// Creates a budget or replaces its terms (admin): 201 when created, 200 when replaced.
#[utoipa::path(put, path = "/v1/budgets/{budget_id}", params(("budget_id" = String, Path, pattern = "^[A-Za-z0-9.:/-]{1,128}$")),
    request_body = BudgetBody,
    responses((status = 201, body = BudgetView), (status = 200, body = BudgetView),
        (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn put_budget(
    State(state): State<AppState>,
    caller: Caller,
    BudgetPath(id): BudgetPath,
    Body(body): Body<BudgetBody>,
) -> Result<(StatusCode, Json<BudgetView>), ApiError> {
    caller.require(&[Role::Admin])?;
    let terms = body.into_terms()?;
    let status = match state.store.put_budget(&id, &terms).await? {
        BudgetWrite::Created => StatusCode::CREATED,
        BudgetWrite::Replaced => StatusCode::OK,
    };
    let budget = state
        .store
        .budget(&id)
        .await?
        .ok_or_else(ApiError::no_budget)?;
    Ok((status, Json(BudgetView::from(&budget))))
}

/// A budget and its current period's usage (admin, gateway, viewer).
#[utoipa::path(get, path = "/v1/budgets/{budget_id}", params(("budget_id" = String, Path, pattern = "^[A-Za-z0-9.:/-]{1,128}$")),
    responses((status = 200, body = BudgetView), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn get_budget(
    State(state): State<AppState>,
    caller: Caller,
    BudgetPath(id): BudgetPath,
) -> Result<Json<BudgetView>, ApiError> {
    caller.require(&[Role::Admin, Role::Gateway, Role::Viewer])?;
    let budget = state
        .store
        .budget(&id)
        .await?
        .ok_or_else(ApiError::no_budget)?;
    Ok(Json(BudgetView::from(&budget)))
}

/// Every budget and its current period's usage (admin, viewer).
#[utoipa::path(get, path = "/v1/budgets",
    responses((status = 200, body = BudgetList), (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_budgets(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<BudgetList>, ApiError> {
    caller.require(&[Role::Admin, Role::Viewer])?;
    let budgets = state.store.budgets().await?;
    Ok(Json(BudgetList {
        budgets: budgets.iter().map(BudgetView::from).collect(),
    }))
}

/// Envoy's HTTP `ext_authz` contract (gateway): allowed is 200 with the status signals as
/// `x-arbiter-*` headers (and the same JSON body as `/use`), and the client's other
/// `x-arbiter-*` headers named in `x-envoy-auth-headers-to-remove`; denied is the error's
/// status and body, which Envoy returns to the client. The calls decided are those of
/// `crate::http::check` (a JSON-RPC body's `tools/call`s, all or nothing, else
/// `x-arbiter-tool`); a request it cannot decide is 400 and counts nothing.
#[utoipa::path(method(get, post, put, patch, delete), path = "/v1/check/{rest}",
    params(("rest" = String, Path),
        ("x-arbiter-session" = Uuid, Header), ("x-arbiter-agent" = Uuid, Header),
        ("x-arbiter-tool" = String, Header, pattern = "^[!-~]{1,64}$",
            description = "The tool; required unless the body holds JSON-RPC tools/call messages"),
        ("x-arbiter-cost" = Option<u64>, Header, minimum = 0, maximum = 1_000_000_000_000_u64)),
    responses((status = 200, body = UseAnswer, headers(
            ("x-arbiter-calls-remaining" = u64), ("x-arbiter-seconds-remaining" = u64),
            ("x-arbiter-budget-remaining" = Option<u64>), ("x-arbiter-warning" = Option<String>),
            ("x-envoy-auth-headers-to-remove" = Option<String>))),
        (status = "default", body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn check(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Gateway])?;
    let body =
        body.map_err(|rejection| super::api::rejected(rejection.status(), rejection.body_text()))?;
    let ask = Ask::new(
        |name| headers.get(name).map(HeaderValue::as_bytes),
        headers.keys().map(HeaderName::as_str),
        &body,
    );
    let allowed = ext_authz::decide(&state, &ask).await?;
    let mut response = Json(UseAnswer::new(&allowed.session, &allowed.status)).into_response();
    insert_signals(response.headers_mut(), &allowed.status);
    if !allowed.strip.is_empty()
        && let Ok(names) = HeaderValue::try_from(allowed.strip.join(","))
    {
        response.headers_mut().insert(HEADERS_TO_REMOVE, names);
    }
    Ok(response)
}

/// 200 while the process runs.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// 200 when PostgreSQL answers within the storage timeout and the schema is current, as
/// checked at most a second ago (see `readiness`).
#[utoipa::path(get, path = "/readyz",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let ready = state.readiness.check(state.store.storage()).await;
    let status = if ready == Ready::Yes {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: ready.status(),
        }),
    )
}

/// Prometheus text.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> String {
    // Sets the cache and pending gauges.
    let _ = state.store.stats();
    // The route exists only with a handle (`Server::metrics_router`).
    state
        .metrics
        .as_ref()
        .map_or_else(String::new, PrometheusHandle::render)
}

/// The OpenAPI 3 document of these routes.
pub(crate) async fn openapi() -> Json<serde_json::Value> {
    Json(super::openapi::document())
}

/// Any other path.
pub(crate) async fn no_route() -> ApiError {
    ApiError::no_route()
}

/// How long a request may take before the service answers 503 itself: the store answers
/// every call within its storage timeout, so this only catches what the store does not
/// cover (a slow client body).
pub(crate) fn request_timeout(storage_timeout: Duration) -> Duration {
    storage_timeout * 2 + Duration::from_secs(1)
}
