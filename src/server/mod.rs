//! The store behind HTTP and gRPC (feature `server`): the routes of `arbiter-session
//! serve`, as an axum [`Router`] a Rust gateway can also mount in its own app, the
//! connection loop that serves them with bounded timeouts ([`serve_connections`]), Envoy's
//! gRPC `ext_authz` ([`Server::authorization_service`], [`serve_authorization`]), the
//! MCP proxy ([`Server::with_mcp_upstream`]) and the operator's console at `/ui/`.
//!
//! One [`Server`] is one store: every route makes one call of [`SessionStore`], nothing is
//! re-implemented. The routes' roles, wire format and errors are in the README ("Run it as
//! a service"); each route's OpenAPI description is at `/openapi.json`.
//!
//! ```no_run
//! # async fn mount(store: arbiter_session::SessionStore) -> Result<(), Box<dyn std::error::Error>> {
//! use arbiter_session::server::{Server, Tokens};
//!
//! let tokens = Tokens::new("an admin token, 16+ bytes", "a gateway token, 16+ bytes")?;
//! let routes = Server::new(store, tokens).router();
//! let app = axum::Router::new().nest("/arbiter", routes);
//! # let _ = app;
//! # Ok(())
//! # }
//! ```
//!
//! Its invariants are stated where they are kept: one error shape and nothing leaked
//! (`api`), no token leaks and no timing oracle ([`Tokens`]), the check decides the calls a
//! body names (`crate::http::check`), one check decision whichever transport
//! (`ext_authz`), the status signals are the service's and never the client's
//! (`crate::http::status`), no call reaches the MCP upstream undecided and no tool is seen
//! unallowed (`mcp`), a request the schema calls valid is never refused as invalid
//! (`openapi`), every cursor a route's pattern admits decodes (`cursor`), the console asks
//! nothing of any other host (`console`), readiness costs at most one connection
//! (`readiness`), and no client holds a connection or the shutdown past its bound
//! ([`serve_connections`]).

mod api;
mod auth;
mod connections;
mod console;
mod cursor;
mod ext_authz;
mod grpc;
mod mcp;
mod openapi;
mod readiness;
mod reports;
mod routes;
mod signals;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{any, get, post};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use auth::{MIN_TOKEN_BYTES, TokenError, Tokens};
pub use connections::{ConnectionLimits, Drained, serve_connections};
pub use grpc::{Authorizer, serve_authorization};
pub use mcp::{DENIED as MCP_DENIED, MAX_MESSAGE_BYTES, McpUpstream, McpUpstreamError};

use crate::SessionStore;
use readiness::Readiness;
use signals::Signals;

/// Most bytes a request body may have.
const BODY_LIMIT: usize = 64 * 1024;

/// Requests answered, by route (its pattern, never the raw path: ids would make one series
/// per session) and status.
const HTTP_REQUESTS: &str = "arbiter_http_requests_total";

/// The routes over one store, with the tokens that guard them.
#[derive(Debug, Clone)]
pub struct Server {
    state: AppState,
}

/// What every handler shares; cloning is shallow.
#[derive(Debug, Clone)]
struct AppState {
    store: SessionStore,
    tokens: Arc<Tokens>,
    /// Renders `/metrics`, when the server has a recorder's handle.
    metrics: Option<PrometheusHandle>,
    /// The store's timeout, which bounds every request.
    storage_timeout: Duration,
    readiness: Arc<Readiness>,
    /// The status signals of allowed answers.
    signals: Signals,
    /// The MCP proxy's upstream, when `/mcp` is served.
    mcp: Option<mcp::Proxy>,
}

impl FromRef<AppState> for Arc<Tokens> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.tokens)
    }
}

impl Server {
    /// The routes over `store`, guarded by `tokens`.
    pub fn new(store: SessionStore, tokens: Tokens) -> Self {
        let storage_timeout = store.storage_timeout();
        Server {
            state: AppState {
                tokens: Arc::new(tokens),
                metrics: None,
                storage_timeout,
                readiness: Arc::new(Readiness::new(storage_timeout)),
                signals: Signals::new(store.clone()),
                store,
                mcp: None,
            },
        }
    }

    /// Serves Prometheus text at `/metrics` of [`Self::metrics_router`] from `handle` (the
    /// handle of the recorder the library's metrics go to; see [`describe_metrics`]).
    #[must_use]
    pub fn with_metrics(mut self, handle: PrometheusHandle) -> Self {
        self.state.metrics = Some(handle);
        self
    }

    /// Serves `/mcp`, the MCP proxy to `upstream` (see [`McpUpstream`]): agents present
    /// their session's token, every `tools/call` is decided before it is forwarded, and
    /// tool lists are filtered to the session's allowed tools.
    ///
    /// # Errors
    /// [`McpUpstreamError`] if the upstream's HTTP client cannot be built.
    pub fn with_mcp_upstream(mut self, upstream: McpUpstream) -> Result<Self, McpUpstreamError> {
        self.state.mcp = Some(mcp::Proxy::new(upstream)?);
        Ok(self)
    }

    /// Every route but `/metrics`, with the service's layers: the body limit, the request
    /// timeout (twice the store's storage timeout plus a second), the request counter and
    /// tracing; with [`Tokens::disabled`], only requests whose `Host` is a loopback name
    /// are served.
    pub fn router(&self) -> Router {
        let state = self.state.clone();
        let timeout = routes::request_timeout(state.storage_timeout);
        let router = Router::new()
            .route(
                "/v1/sessions",
                post(routes::create).get(routes::list_sessions),
            )
            .route("/v1/sessions/{id}", get(routes::get_session))
            .route("/v1/sessions/{id}/events", get(routes::session_events))
            .route("/v1/sessions/{id}/use", post(routes::use_session))
            .route("/v1/sessions/{id}/use-batch", post(routes::use_batch))
            .route("/v1/sessions/{id}/reserve", post(routes::reserve))
            .route(
                "/v1/reservations/{reservation_id}/settle",
                post(routes::settle),
            )
            .route("/v1/sessions/{id}/close", post(routes::close))
            .route(
                "/v1/agents/{agent_id}/live-sessions",
                get(routes::live_sessions),
            )
            .route("/v1/agents/{agent_id}/close-all", post(routes::close_all))
            .route("/v1/budgets", get(routes::list_budgets))
            .route(
                "/v1/budgets/{*budget_id}",
                get(routes::get_budget).put(routes::put_budget),
            )
            .route("/v1/check", any(routes::check))
            .route("/v1/check/", any(routes::check))
            .route("/v1/check/{*rest}", any(routes::check))
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .route("/v1/reports/agents", get(reports::agents))
            .route("/v1/reports/tools", get(reports::tools))
            .route("/v1/reports/denials", get(reports::denials))
            .route("/v1/reports/utilization", get(reports::utilization))
            .route("/v1/reports/budgets", get(reports::budgets))
            .route("/v1/overview", get(reports::overview))
            .route("/openapi.json", get(routes::openapi))
            .merge(console::routes())
            .fallback(routes::no_route)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state.tokens),
                auth::loopback_host_only,
            ))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(axum::middleware::from_fn(count_request))
            .layer(TimeoutLayer::with_status_code(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                timeout,
            ))
            .layer(TraceLayer::new_for_http())
            .with_state(state.clone());
        if state.mcp.is_none() {
            return router;
        }
        // `/mcp` has bounds of its own (the upstream's timeout, its body limit), not the
        // request timeout and body limit of the routes above: a tool call may take long.
        let mcp = Router::new()
            .route("/mcp", any(mcp::handle))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&state.tokens),
                auth::loopback_host_only,
            ))
            .layer(DefaultBodyLimit::disable())
            .layer(axum::middleware::from_fn(count_request))
            .layer(TraceLayer::new_for_http())
            .with_state(state);
        router.merge(mcp)
    }

    /// Envoy's gRPC `ext_authz` service (`envoy.service.auth.v3.Authorization`) over the
    /// same store and tokens as [`Self::router`]: serve it with [`serve_authorization`], or
    /// add it to a tonic server of a gateway's own.
    pub fn authorization_service(&self) -> AuthorizationServer<Authorizer> {
        Authorizer::new(self.state.clone()).into_service()
    }

    /// How long a request may take before the service answers it as timed out: twice the
    /// store's storage timeout plus a second (the store answers every call within its
    /// storage timeout).
    pub fn request_timeout(&self) -> Duration {
        routes::request_timeout(self.state.storage_timeout)
    }

    /// `/metrics` alone, when the server has a recorder's handle ([`Self::with_metrics`]):
    /// merge it into [`Self::router`], or serve it on an address of its own.
    pub fn metrics_router(&self) -> Option<Router> {
        self.state.metrics.as_ref()?;
        Some(
            Router::new()
                .route("/metrics", get(routes::metrics))
                .with_state(self.state.clone()),
        )
    }
}

/// Describes the metrics the server and the library emit, for the recorder installed by
/// the process (`arbiter-session serve` installs Prometheus's).
pub fn describe_metrics() {
    crate::metrics::describe();
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route and status");
}

/// Counts each request by route and status.
async fn count_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    response
}
