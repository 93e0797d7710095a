//! What every handler shares.

use std::sync::Arc;
use std::time::Duration;

use arbiter_session::SessionStore;
use metrics_exporter_prometheus::PrometheusHandle;

use super::auth::Tokens;
use super::readiness::Readiness;

/// The service's shared state; cloning is shallow.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// The one store of this process.
    pub(crate) store: SessionStore,
    pub(crate) tokens: Arc<Tokens>,
    /// Renders `/metrics`.
    pub(crate) metrics: PrometheusHandle,
    /// The storage timeout, which bounds every request.
    pub(crate) storage_timeout: Duration,
    /// `/readyz`'s answer.
    pub(crate) readiness: Arc<Readiness>,
}
