//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use arbiter_session::SessionStore;
use metrics_exporter_prometheus::PrometheusHandle;

use super::auth::Tokens;

/// The service's shared state; cloning is shallow.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// The one store of this process.
    pub(crate) store: SessionStore,
    pub(crate) tokens: Arc<Tokens>,
    /// Renders `/metrics`.
    pub(crate) metrics: PrometheusHandle,
    /// What `/readyz` allows PostgreSQL to answer in.
    pub(crate) storage_timeout: Duration,
}
