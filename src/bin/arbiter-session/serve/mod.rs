//! `arbiter-session serve`: the library's store behind HTTP, for gateways not written in
//! Rust (Envoy's `ext_authz`, MCP proxies, LiteLLM). One process, one store, nothing
//! re-implemented: every route is one call of `SessionStore`.
//!
//! Start-up refuses to serve without both tokens unless `--no-auth` is given on a
//! loopback address. Shutdown (SIGTERM or SIGINT) stops accepting, lets requests in flight
//! finish, then makes the pending set and buffered denials durable
//! (`SessionStore::shutdown`) and logs what it could not, and exits 0.

mod api;
mod auth;
mod routes;
mod state;
mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arbiter_session::{PgStorage, SessionStore};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use self::auth::Tokens;
use self::state::AppState;
use crate::Failure;

/// Most bytes a request body may have.
const BODY_LIMIT: usize = 64 * 1024;

/// Options of `arbiter-session serve`. The tokens are read from the environment or from
/// files, never from the command line (which other users can read in the process list).
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ARBITER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve `/metrics` on this address instead of the main one.
    #[arg(long, env = "ARBITER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Apply the embedded migrations before serving.
    #[arg(long)]
    migrate: bool,
    /// File holding the admin token (else `ARBITER_ADMIN_TOKEN`).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File holding the gateway token (else `ARBITER_GATEWAY_TOKEN`).
    #[arg(long)]
    gateway_token_file: Option<PathBuf>,
    /// Serve without tokens: every caller has every role. Loopback addresses only.
    #[arg(long)]
    no_auth: bool,
    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "ARBITER_POOL_SIZE", default_value_t = 16)]
    pool_size: u32,
    /// Most sessions kept in the cache.
    #[arg(long, env = "ARBITER_CACHE_CAPACITY", default_value_t = 100_000)]
    cache_capacity: u64,
    /// Longest wait for PostgreSQL in one call, in milliseconds.
    #[arg(long, env = "ARBITER_STORAGE_TIMEOUT_MS", default_value_t = 5_000)]
    storage_timeout_ms: u64,
    /// Log format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
    /// How long shutdown may take to make pending state durable, in seconds.
    #[arg(long, default_value_t = 10)]
    shutdown_timeout_secs: u64,
}

/// A token from its file (trimmed) or its environment variable.
fn token(file: Option<&PathBuf>, env: &str) -> Result<Option<String>, Failure> {
    let value = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|err| Failure(format!("cannot read {}: {err}", path.display())))?,
        ),
        None => std::env::var(env).ok(),
    };
    Ok(value
        .map(|token| token.trim().to_owned())
        .filter(|token| !token.is_empty()))
}

fn tokens(args: &ServeArgs) -> Result<Tokens, Failure> {
    let admin = token(args.admin_token_file.as_ref(), "ARBITER_ADMIN_TOKEN")?;
    let gateway = token(args.gateway_token_file.as_ref(), "ARBITER_GATEWAY_TOKEN")?;
    if args.no_auth {
        if !args.listen.ip().is_loopback() {
            return Err(Failure(format!(
                "--no-auth is allowed only on a loopback address, not {}",
                args.listen
            )));
        }
        tracing::warn!(listen = %args.listen, "serving WITHOUT authentication (--no-auth)");
        return Ok(Tokens::Disabled);
    }
    match (admin, gateway) {
        (Some(admin), Some(gateway)) => Ok(Tokens::new(&admin, &gateway)),
        _ => Err(Failure(
            "both tokens are required: set ARBITER_ADMIN_TOKEN and ARBITER_GATEWAY_TOKEN \
             (or --admin-token-file and --gateway-token-file), or pass --no-auth on a \
             loopback address"
                .to_owned(),
        )),
    }
}

/// The routes of the service, over `state`.
fn app(state: AppState, with_metrics: bool) -> Router {
    let mut app = Router::new()
        .route("/v1/sessions", post(routes::create))
        .route("/v1/sessions/{id}", get(routes::get_session))
        .route("/v1/sessions/{id}/use", post(routes::use_session))
        .route("/v1/sessions/{id}/use-batch", post(routes::use_batch))
        .route("/v1/sessions/{id}/close", post(routes::close))
        .route(
            "/v1/agents/{agent_id}/live-sessions",
            get(routes::live_sessions),
        )
        .route("/v1/agents/{agent_id}/close-all", post(routes::close_all))
        .route("/v1/check", any(routes::check))
        .route("/v1/check/", any(routes::check))
        .route("/v1/check/{*rest}", any(routes::check))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/openapi.json", get(routes::openapi));
    if with_metrics {
        app = app.route("/metrics", get(routes::metrics));
    }
    let timeout = routes::request_timeout(state.storage_timeout);
    app.fallback(routes::no_route)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(telemetry::count_request))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Runs the service until SIGTERM or SIGINT.
pub(crate) async fn serve(database_url: &str, args: ServeArgs) -> Result<(), Failure> {
    telemetry::init_logs(args.log_format);
    let tokens = tokens(&args)?;
    let metrics = telemetry::install_metrics()?;
    let storage_timeout = Duration::from_millis(args.storage_timeout_ms);
    let storage = PgStorage::connect_with(
        database_url,
        PgStorage::pool_options().max_connections(args.pool_size),
    )
    .await
    .map_err(|err| {
        Failure(format!(
            "cannot connect to DATABASE_URL: {}",
            Failure::from(err).0
        ))
    })?;
    if args.migrate {
        arbiter_session::migrate(storage.pool()).await?;
        tracing::info!("migrations applied");
    }
    let store = SessionStore::builder(storage)
        .cache_capacity(args.cache_capacity)
        .storage_timeout(storage_timeout)
        .build();
    let state = AppState {
        store: store.clone(),
        tokens: Arc::new(tokens),
        metrics,
        storage_timeout,
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| Failure(format!("cannot listen on {}: {err}", args.listen)))?;
    let address = listener.local_addr()?;
    if let Some(metrics_address) = args.metrics_listen {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_address)
            .await
            .map_err(|err| Failure(format!("cannot listen on {metrics_address}: {err}")))?;
        let metrics_app = Router::new()
            .route("/metrics", get(routes::metrics))
            .with_state(state.clone());
        tokio::spawn(async move {
            if let Err(err) = axum::serve(metrics_listener, metrics_app).await {
                tracing::error!(error = %err, "the metrics listener stopped");
            }
        });
    }
    // The one line a supervisor (or a test) reads to find the port.
    println!("arbiter-session: listening on {address}");
    tracing::info!(%address, "serving");
    axum::serve(listener, app(state, args.metrics_listen.is_none()))
        .with_graceful_shutdown(telemetry::shutdown_signal())
        .await?;

    tracing::info!("stopped accepting; making pending state durable");
    let report = store
        .shutdown(Duration::from_secs(args.shutdown_timeout_secs))
        .await;
    if report.is_clean() {
        tracing::info!("shutdown clean: every pending session and denial is durable");
    } else {
        tracing::error!(
            unflushed_sessions = report.unflushed.len(),
            unrecorded_denials = report.unrecorded_denials,
            "shutdown could not make everything durable"
        );
    }
    Ok(())
}
