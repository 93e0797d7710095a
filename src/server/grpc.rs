//! Envoy's gRPC `ext_authz`: `envoy.service.auth.v3.Authorization/Check`, served with tonic
//! over Envoy's own generated types (`envoy-types`), on an address of its own
//! (`serve --grpc-listen`, [`serve_authorization`]). Envoy, Envoy AI Gateway, Istio and
//! agentgateway call it. It decides exactly as `/v1/check` does (`ext_authz`); this module
//! only reads a `CheckRequest` and writes a `CheckResponse`:
//!
//! * The gateway token arrives as metadata (`authorization: Bearer …`). A missing or wrong
//!   token fails the RPC with `UNAUTHENTICATED`, another role's with `PERMISSION_DENIED`:
//!   the gateway is misconfigured, no agent was decided, and Envoy answers its client as
//!   its `failure_mode_allow` says (deny, by default).
//! * Session, agent, tool and cost come from the request's headers (`headers`, or
//!   `header_map` with `encode_raw_headers`), the calls from its body (`body`, or
//!   `raw_body` with `pack_as_bytes`), as in `crate::http::check`.
//! * Allowed is `OK`: the status signals are set on the upstream request (replacing any a
//!   client sent) and added to the client's response, and the client's other
//!   `x-arbiter-*` headers are removed from the upstream request.
//! * Denied is a `DeniedHttpResponse` with the status, JSON body and `Retry-After` the
//!   HTTP route would answer, and an RPC status in the same class (`RESOURCE_EXHAUSTED`
//!   for 429, `PERMISSION_DENIED` for 403, …), which Envoy reads only as "not OK".

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response};

use super::AppState;
use super::api::ApiError;
use super::auth::{Caller, Role};
use super::ext_authz::{self, Allowed, Ask};

/// Largest `CheckRequest` read: a body of up to 64 KiB (Envoy's `max_request_bytes`, as
/// the HTTP route's limit) with its headers and attributes.
const MAX_CHECK_REQUEST_BYTES: usize = 256 * 1024;
/// Streams (checks in flight) one gateway connection may have.
const STREAMS_PER_CONNECTION: u32 = 1024;
/// An idle gateway connection is pinged this often, and closed if the ping is not
/// answered within [`KEEPALIVE_TIMEOUT`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Authorization` service over one [`Server`](super::Server)'s store and tokens.
#[derive(Debug, Clone)]
pub struct Authorizer {
    state: AppState,
}

impl Authorizer {
    pub(super) fn new(state: AppState) -> Self {
        Authorizer { state }
    }

    /// The tonic service, with the request size bounded.
    pub(super) fn into_service(self) -> AuthorizationServer<Self> {
        AuthorizationServer::new(self).max_decoding_message_size(MAX_CHECK_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl Authorization for Authorizer {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, tonic::Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        Caller::presenting(&self.state.tokens, authorization)
            .map_err(|_| tonic::Status::unauthenticated("a valid bearer token is required"))?
            .require(&[Role::Gateway])
            .map_err(|_| tonic::Status::permission_denied("this token may not check calls"))?;
        let request = request.into_inner();
        let http = request
            .attributes
            .and_then(|attributes| attributes.request)
            .and_then(|request| request.http)
            .unwrap_or_default();
        let headers = Headers::of(http.headers, http.header_map.map(|map| map.headers));
        let body = if http.raw_body.is_empty() {
            http.body.into_bytes()
        } else {
            http.raw_body
        };
        let ask = Ask::new(
            |name| headers.get(name),
            headers.0.keys().map(String::as_str),
            &body,
        );
        let response = match ext_authz::decide(&self.state, &ask).await {
            Ok(allowed) => ok(&allowed),
            Err(err) => denied(&err),
        };
        Ok(Response::new(response))
    }
}

/// A check request's headers by lowercase name; a name sent more than once has its values
/// joined with `,`, as Envoy joins them in `headers` (so an id sent twice is unreadable,
/// never one of the two).
struct Headers(HashMap<String, Vec<u8>>);

impl Headers {
    fn of(joined: HashMap<String, String>, raw: Option<Vec<HeaderValue>>) -> Self {
        let mut headers: HashMap<String, Vec<u8>> = joined
            .into_iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value.into_bytes()))
            .collect();
        for header in raw.unwrap_or_default() {
            let value = if header.raw_value.is_empty() {
                header.value.into_bytes()
            } else {
                header.raw_value
            };
            headers
                .entry(header.key.to_ascii_lowercase())
                .and_modify(|existing| {
                    existing.push(b',');
                    existing.extend_from_slice(&value);
                })
                .or_insert(value);
        }
        Headers(headers)
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }
}

/// A header to set, replacing any the request has.
fn header(key: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        ..HeaderValueOption::default()
    }
}

fn ok(allowed: &Allowed) -> CheckResponse {
    let signals: Vec<HeaderValueOption> = allowed
        .status
        .headers()
        .into_iter()
        .map(|(key, value)| header(key, value))
        .collect();
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Ok.into(),
            ..rpc::Status::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: signals.clone(),
            headers_to_remove: allowed.strip.clone(),
            response_headers_to_add: signals,
            ..OkHttpResponse::default()
        })),
        ..CheckResponse::default()
    }
}

fn denied(err: &ApiError) -> CheckResponse {
    let (status, body, retry_after) = err.parts();
    let mut headers = vec![header("content-type", "application/json".to_owned())];
    if let Some(secs) = retry_after {
        headers.push(header("retry-after", secs.to_string()));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: rpc_code(status.as_u16()).into(),
            message: err.code().to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            // Envoy's `StatusCode` values are the HTTP statuses themselves.
            status: Some(HttpStatus {
                code: i32::from(status.as_u16()),
            }),
            headers,
            body,
        })),
        ..CheckResponse::default()
    }
}

/// The gRPC status of the same class as HTTP status `status` (gRPC's own mapping).
fn rpc_code(status: u16) -> Code {
    match status {
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        410 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Serves `service` (from [`Server::authorization_service`](super::Server::authorization_service))
/// on `listener` until `shutdown` completes, then lets checks in flight finish for at most
/// `drain_for`. Each check is bounded by `request_timeout` (answered `DEADLINE_EXCEEDED`
/// past it), each request by 256 KiB, each connection by 1024 checks at once; an idle
/// connection that stops answering pings is closed. Serve it to gateways only: it trusts
/// the headers the gateway forwards, as `/v1/check` does.
///
/// # Errors
/// The transport's error, if serving failed.
pub async fn serve_authorization(
    listener: TcpListener,
    service: AuthorizationServer<Authorizer>,
    request_timeout: Duration,
    shutdown: impl Future<Output = ()>,
    drain_for: Duration,
) -> Result<(), tonic::transport::Error> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut builder = tonic::transport::Server::builder()
        .timeout(request_timeout)
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    let serving = builder.add_service(service).serve_with_incoming_shutdown(
        TcpIncoming::from(listener),
        async move {
            let mut stopped = stopped;
            // An error means the sender is gone: serving has ended.
            let _ = stopped.wait_for(|stop| *stop).await;
        },
    );
    tokio::pin!(serving, shutdown);
    tokio::select! {
        served = &mut serving => return served,
        () = &mut shutdown => {}
    }
    stop.send_replace(true);
    match tokio::time::timeout(drain_for, serving).await {
        Ok(served) => served,
        Err(_) => {
            tracing::warn!("gRPC checks still in flight at the drain deadline were cut");
            Ok(())
        }
    }
}
