//! `arbiter-session serve`: the library's store behind HTTP and gRPC, for gateways not
//! written in Rust (Envoy's `ext_authz` over either, MCP proxies, LiteLLM). One process, one store, nothing
//! re-implemented: every route is one call of `SessionStore`.
//!
//! Start-up refuses to serve without both tokens unless `--no-auth` is given on a
//! loopback address. Shutdown (SIGTERM or SIGINT) is bounded by `--shutdown-timeout-secs`
//! whatever the clients do: it stops accepting, closes every idle or half-sent connection,
//! gives requests in flight up to half the bound to finish (then closes their connections
//! too), makes the pending set and buffered denials durable in the time left
//! (`SessionStore::shutdown`), logs what it could not, and exits 0.

mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use arbiter_session::server::{
    ConnectionLimits, McpUpstream, Server, Tokens, serve_authorization, serve_connections,
};
use arbiter_session::{PgStorage, SessionStore};
use tokio::time::Instant;

use crate::shell::Failure;

/// Options of `arbiter-session serve`. The tokens are read from the environment or from
/// files, never from the command line (which other users can read in the process list).
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "ARBITER_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Also serve Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization`) on this
    /// address, for gateways only.
    #[arg(long, env = "ARBITER_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// Serve `/mcp`, an MCP proxy (Streamable HTTP) to this upstream MCP endpoint
    /// (`http://host:port/mcp`): agents present their session's token, each `tools/call`
    /// is decided before it is forwarded, tool lists are filtered to the allowed tools.
    #[arg(long, env = "ARBITER_MCP_UPSTREAM")]
    mcp_upstream: Option<String>,
    /// Most seconds for each wait on the MCP upstream: to connect, for its answer, and
    /// between two chunks of a streamed answer.
    #[arg(long, env = "ARBITER_MCP_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    mcp_timeout_secs: u64,
    /// Largest request body an MCP client may send, in bytes.
    #[arg(long, env = "ARBITER_MCP_MAX_BODY_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=64 * 1024 * 1024))]
    mcp_max_body_bytes: u64,
    /// Serve `/metrics` on this address instead of the main one.
    #[arg(long, env = "ARBITER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Apply the embedded migrations before serving.
    #[arg(long)]
    migrate: bool,
    /// Run no upkeep (the audit trail's partitions, the reports' rollups) in this process:
    /// it needs the schema's owner. Run `arbiter-session upkeep` every minute as the owner
    /// instead, and serve as a role with only the gateway's grants (README, "Security").
    #[arg(long, env = "ARBITER_NO_UPKEEP")]
    no_upkeep: bool,
    /// File holding the admin token (else `ARBITER_ADMIN_TOKEN`).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File holding the gateway token (else `ARBITER_GATEWAY_TOKEN`).
    #[arg(long)]
    gateway_token_file: Option<PathBuf>,
    /// File holding the viewer token, which reads and changes nothing (else
    /// `ARBITER_VIEWER_TOKEN`; optional).
    #[arg(long)]
    viewer_token_file: Option<PathBuf>,
    /// Serve without tokens: every caller has every role. Loopback addresses only.
    #[arg(long)]
    no_auth: bool,
    /// Connections in the PostgreSQL pool.
    #[arg(long, env = "ARBITER_POOL_SIZE", default_value_t = 16)]
    pool_size: u32,
    /// Most loads at once of sessions not in the cache (the store's cold-load lane): lookups
    /// of random session ids, which any client can send, never take more.
    #[arg(long, env = "ARBITER_COLD_LOADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    cold_loads: u64,
    /// How long this process's share of a shared budget stays its own without a renewal,
    /// in seconds: the units a process that died held come back this long after.
    #[arg(long, env = "ARBITER_SHARE_LEASE_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    share_lease_secs: u64,
    /// How long a reservation stays open, in seconds: one not settled by then is settled
    /// at its estimate.
    #[arg(long, env = "ARBITER_RESERVATION_TTL_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    reservation_ttl_secs: u64,
    /// Most sessions kept in the cache.
    #[arg(long, env = "ARBITER_CACHE_CAPACITY", default_value_t = 100_000)]
    cache_capacity: u64,
    /// Longest wait for PostgreSQL in one call, in milliseconds.
    #[arg(long, env = "ARBITER_STORAGE_TIMEOUT_MS", default_value_t = 5_000)]
    storage_timeout_ms: u64,
    /// Log format.
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
    /// How long shutdown may take in all, in seconds: up to half of it for requests in
    /// flight, the rest to make pending state durable.
    #[arg(long, env = "ARBITER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    shutdown_timeout_secs: u64,
    /// Most seconds from a request head's first byte to its last; a client slower than
    /// that is disconnected.
    #[arg(long, env = "ARBITER_HEADER_READ_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_read_timeout_secs: u64,
    /// Seconds a keep-alive connection may stay open with no request in progress and
    /// nothing sent before it is closed.
    #[arg(long, env = "ARBITER_IDLE_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// Most client connections open at once (each listener); past it, new connections wait
    /// in the kernel's backlog. Keep it under the process's file descriptor limit.
    #[arg(long, env = "ARBITER_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
}

impl ServeArgs {
    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits::default()
            .with_header_read_timeout(Duration::from_secs(self.header_read_timeout_secs))
            .with_idle_timeout(Duration::from_secs(self.idle_timeout_secs))
            .with_max_connections(usize::try_from(self.max_connections).unwrap_or(usize::MAX))
    }
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
        if let Some(address) = std::iter::once(args.listen)
            .chain(args.grpc_listen)
            .find(|address| !address.ip().is_loopback())
        {
            return Err(Failure(format!(
                "--no-auth is allowed only on a loopback address, not {address}"
            )));
        }
        tracing::warn!(listen = %args.listen, "serving WITHOUT authentication (--no-auth)");
        return Ok(Tokens::disabled());
    }
    let viewer = token(args.viewer_token_file.as_ref(), "ARBITER_VIEWER_TOKEN")?;
    match (admin, gateway) {
        (Some(admin), Some(gateway)) => {
            let tokens = Tokens::new(&admin, &gateway).map_err(|err| Failure(err.to_string()))?;
            match viewer {
                Some(viewer) => tokens
                    .with_viewer(&viewer)
                    .map_err(|err| Failure(err.to_string())),
                None => Ok(tokens),
            }
        }
        _ => Err(Failure(
            "both tokens are required: set ARBITER_ADMIN_TOKEN and ARBITER_GATEWAY_TOKEN \
             (or --admin-token-file and --gateway-token-file), or pass --no-auth on a \
             loopback address"
                .to_owned(),
        )),
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub(crate) async fn run(database_url: &str, args: ServeArgs) -> Result<(), Failure> {
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
        .cold_loads(usize::try_from(args.cold_loads).unwrap_or(1))
        .share_lease(Duration::from_secs(args.share_lease_secs))
        .reservation_ttl(Duration::from_secs(args.reservation_ttl_secs))
        .maintenance_interval((!args.no_upkeep).then_some(Duration::from_secs(60)))
        .build();
    if args.no_upkeep {
        tracing::info!(
            "upkeep off: run `arbiter-session upkeep` as the schema's owner every minute"
        );
    }
    let mut server = Server::new(store.clone(), tokens).with_metrics(metrics);
    if let Some(url) = &args.mcp_upstream {
        let upstream = McpUpstream::new(url.as_str())
            .map_err(|err| Failure(err.to_string()))?
            .with_timeout(Duration::from_secs(args.mcp_timeout_secs))
            .with_max_body_bytes(usize::try_from(args.mcp_max_body_bytes).unwrap_or(usize::MAX));
        server = server
            .with_mcp_upstream(upstream)
            .map_err(|err| Failure(err.to_string()))?;
        tracing::info!(upstream = %url, "serving the MCP proxy at /mcp");
    }
    let mut app = server.router();
    let metrics_app = server.metrics_router().unwrap_or_default();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|err| Failure(format!("cannot listen on {}: {err}", args.listen)))?;
    let address = listener.local_addr()?;
    let limits = args.connection_limits();
    let shutdown_within = Duration::from_secs(args.shutdown_timeout_secs);
    let drain_for = shutdown_within / 2;
    // The signal, seen by every listener, and when it came.
    let (signalled_tx, signalled) = tokio::sync::watch::channel(None);
    let until_signalled = |mut signalled: tokio::sync::watch::Receiver<Option<Instant>>| async move {
        // An error means the sender is gone, which only happens once serving has ended.
        let _ = signalled.wait_for(Option::is_some).await;
    };
    let metrics_served = match args.metrics_listen {
        Some(metrics_address) => {
            let metrics_listener = tokio::net::TcpListener::bind(metrics_address)
                .await
                .map_err(|err| Failure(format!("cannot listen on {metrics_address}: {err}")))?;
            Some(tokio::spawn(serve_connections(
                metrics_listener,
                metrics_app,
                limits,
                until_signalled(signalled.clone()),
                drain_for,
            )))
        }
        None => {
            app = app.merge(metrics_app);
            None
        }
    };
    let grpc_listener = match args.grpc_listen {
        Some(grpc_address) => Some(
            tokio::net::TcpListener::bind(grpc_address)
                .await
                .map_err(|err| Failure(format!("cannot listen on {grpc_address}: {err}")))?,
        ),
        None => None,
    };
    // The one line a supervisor (or a test) reads to find the port; the gRPC address, if
    // any, on the next.
    println!("arbiter-session: listening on {address}");
    let grpc_served = match grpc_listener {
        Some(grpc_listener) => {
            let grpc_address = grpc_listener.local_addr()?;
            println!("arbiter-session: gRPC ext_authz on {grpc_address}");
            tracing::info!(address = %grpc_address, "serving gRPC ext_authz");
            let serving = serve_authorization(
                grpc_listener,
                server.authorization_service(),
                server.request_timeout(),
                until_signalled(signalled.clone()),
                drain_for,
            );
            Some(tokio::spawn(async move {
                if let Err(err) = serving.await {
                    tracing::error!(error = %err, "gRPC ext_authz stopped serving");
                }
            }))
        }
        None => None,
    };
    tracing::info!(%address, "serving");
    let signal = async {
        telemetry::shutdown_signal().await;
        signalled_tx.send_replace(Some(Instant::now()));
    };
    let drained = serve_connections(listener, app, limits, signal, drain_for).await;
    if let Some(metrics_served) = metrics_served {
        // Bounded by the same drain; a panicked task has nothing left to close.
        let _ = metrics_served.await;
    }
    if let Some(grpc_served) = grpc_served {
        // Bounded by the same drain; its error, if any, is logged.
        let _ = grpc_served.await;
    }
    if drained.cut > 0 {
        tracing::warn!(
            open = drained.open,
            cut = drained.cut,
            "closed connections whose requests did not finish within half the shutdown timeout"
        );
    } else {
        tracing::info!(
            open = drained.open,
            "closed every connection; requests in flight were answered"
        );
    }
    let signalled_at = signalled.borrow().unwrap_or_else(Instant::now);
    let within = shutdown_within.saturating_sub(signalled_at.elapsed());

    tracing::info!("stopped accepting; making pending state durable");
    let report = store.shutdown(within).await;
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
