//! Envoy's gRPC `ext_authz` (`envoy.service.auth.v3.Authorization/Check`) served in-process
//! by `server::serve_authorization` on a real socket, called by tonic's generated client
//! as Envoy calls it, over a real store on a fresh database. Every answer is compared with
//! what `/v1/check` answers for the same request: one decision, whichever transport. The
//! binary's `--grpc-listen` is tested in `serve.rs`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use arbiter_session::server::{Server, Tokens, serve_authorization};
use arbiter_session::{PgStorage, SessionStore};
use axum::Router;
use axum::body::Body;
use axum::http::Request;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttributeRequest,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceExt as _;
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-tests";
const GATEWAY: &str = "gateway-token-for-tests";

/// The HTTP routes and the gRPC service over one store, the latter on a loopback socket.
struct Both {
    http: Router,
    grpc: AuthorizationClient<Channel>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn both(pool: &PgPool) -> Both {
    let storage = PgStorage::connect_with(
        &common::database_url(pool).await,
        PgStorage::pool_options().max_connections(8),
    )
    .await
    .expect("the store connects");
    let store = SessionStore::builder(storage)
        .storage_timeout(Duration::from_secs(1))
        .build();
    let server = Server::new(
        store,
        Tokens::new(ADMIN, GATEWAY).expect("long and distinct tokens"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("bound");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_authorization(
        listener,
        server.authorization_service(),
        server.request_timeout(),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let grpc = AuthorizationClient::connect(format!("http://{address}"))
        .await
        .expect("the gRPC service answers");
    Both {
        http: server.router(),
        grpc,
        _stop: stop,
    }
}

/// What Envoy forwards of a client's request: its headers (lowercase, as Envoy sends
/// them) and body.
#[derive(Clone)]
struct Forwarded {
    headers: Vec<(String, String)>,
    body: String,
    /// Headers as `header_map` (`encode_raw_headers: true`), not `headers`.
    raw: bool,
}

impl Forwarded {
    fn new(session: impl ToString, agent: Uuid) -> Self {
        Forwarded {
            headers: vec![
                ("x-arbiter-session".to_owned(), session.to_string()),
                ("x-arbiter-agent".to_owned(), agent.to_string()),
            ],
            body: String::new(),
            raw: false,
        }
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    fn raw(mut self) -> Self {
        self.raw = true;
        self
    }

    fn check_request(&self) -> CheckRequest {
        let mut http = HttpRequest {
            method: "POST".to_owned(),
            path: "/mcp".to_owned(),
            body: self.body.clone(),
            ..HttpRequest::default()
        };
        if self.raw {
            http.header_map = Some(HeaderMap {
                headers: self
                    .headers
                    .iter()
                    .map(|(key, value)| HeaderValue {
                        key: key.clone(),
                        raw_value: value.clone().into_bytes(),
                        ..HeaderValue::default()
                    })
                    .collect(),
            });
        } else {
            let mut joined: HashMap<String, String> = HashMap::new();
            for (key, value) in &self.headers {
                joined
                    .entry(key.clone())
                    .and_modify(|existing| {
                        existing.push(',');
                        existing.push_str(value);
                    })
                    .or_insert_with(|| value.clone());
            }
            http.headers = joined;
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttributeRequest {
                    http: Some(http),
                    ..AttributeRequest::default()
                }),
                ..AttributeContext::default()
            }),
        }
    }
}

/// An answer of either transport, in HTTP's terms.
#[derive(Debug, PartialEq)]
struct Decision {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

impl Both {
    async fn grpc(
        &self,
        token: Option<&str>,
        forwarded: &Forwarded,
    ) -> Result<CheckResponse, tonic::Status> {
        let mut request = tonic::Request::new(forwarded.check_request());
        if let Some(token) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}").parse().expect("ASCII"),
            );
        }
        self.grpc
            .clone()
            .check(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn http(&self, forwarded: &Forwarded) -> Decision {
        let mut request =
            Request::post("/v1/check/mcp").header("authorization", format!("Bearer {GATEWAY}"));
        for (name, value) in &forwarded.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = self
            .http
            .clone()
            .oneshot(
                request
                    .body(Body::from(forwarded.body.clone()))
                    .expect("a request"),
            )
            .await
            .expect("infallible");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().expect("ASCII").to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        Decision {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            retry_after,
        }
    }

    /// Creates a session over HTTP.
    async fn create(&self, body: Value) -> Uuid {
        let session = common::routes::create_session(&self.http, ADMIN, &body).await;
        session["session_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("an id")
    }

    /// Asks gRPC, expects a denial, and checks that HTTP answers the same for the same
    /// request (a denial counts nothing, so asking twice changes nothing).
    async fn assert_denied_alike(&self, forwarded: &Forwarded, status: u16, code: &str) {
        let answer = self.grpc(Some(GATEWAY), forwarded).await.expect("answered");
        let denied = denied_of(&answer);
        assert_eq!(
            (denied.status, denied.body["error"].as_str()),
            (status, Some(code)),
            "{denied:?}"
        );
        assert_eq!(
            denied,
            self.http(forwarded).await,
            "gRPC and HTTP answer alike"
        );
    }
}

fn ok_of(answer: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(
        answer.status.as_ref().map(|s| s.code),
        Some(Code::Ok as i32),
        "{answer:?}"
    );
    match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("not allowed: {other:?}"),
    }
}

fn denied_of(answer: &CheckResponse) -> Decision {
    assert_ne!(
        answer.status.as_ref().map(|s| s.code),
        Some(Code::Ok as i32),
        "{answer:?}"
    );
    let Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
        status,
        headers,
        body,
    })) = &answer.http_response
    else {
        panic!("not denied: {answer:?}");
    };
    let header = |name: &str| {
        headers
            .iter()
            .filter_map(|option| option.header.as_ref())
            .find(|header| header.key == name)
            .map(|header| header.value.clone())
    };
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    Decision {
        status: u16::try_from(status.as_ref().map_or(0, |s| s.code)).expect("a status"),
        body: serde_json::from_str(body).expect("a JSON body"),
        retry_after: header("retry-after"),
    }
}

/// The headers an allowed check sets, by name, each replacing the client's.
fn set_headers(ok: &OkHttpResponse) -> HashMap<String, String> {
    ok.headers
        .iter()
        .map(|option| {
            assert_eq!(
                option.append_action,
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32
            );
            let header = option.header.as_ref().expect("a header");
            (header.key.clone(), header.value.clone())
        })
        .collect()
}

/// Allowed checks: the signals set upstream and sent back to the client, the client's
/// `x-arbiter-*` headers dropped, the tool read from a header or from a JSON-RPC body, the
/// raw header encoding; denials of each kind answered as `/v1/check` answers them.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn grpc_checks_decide_as_the_http_check_does(pool: PgPool) {
    let both = both(&pool).await;
    let agent = Uuid::new_v4();
    let id = both
        .create(
            json!({ "agent_id": agent, "authorized_tools": ["search", "write_file"],
            "call_budget": 4, "time_limit_secs": 600, "tool_limits": { "write_file": 1 } }),
        )
        .await;

    // A tool from the header; the client's own signals are replaced, its other
    // `x-arbiter-*` headers dropped.
    let forwarded = Forwarded::new(id, agent)
        .header("x-arbiter-tool", "search")
        .header("x-arbiter-calls-remaining", "1000")
        .header("x-arbiter-trusted", "yes");
    let answer = both
        .grpc(Some(GATEWAY), &forwarded)
        .await
        .expect("answered");
    let ok = ok_of(&answer);
    let set = set_headers(ok);
    assert_eq!(set["x-arbiter-calls-remaining"], "3");
    let seconds: u64 = set["x-arbiter-seconds-remaining"]
        .parse()
        .expect("a number");
    assert!((595..=600).contains(&seconds), "{seconds}");
    assert!(!set.contains_key("x-arbiter-warning"));
    assert_eq!(
        ok.response_headers_to_add, ok.headers,
        "the client sees them too"
    );
    let mut dropped = ok.headers_to_remove.clone();
    dropped.sort_unstable();
    assert_eq!(
        dropped,
        [
            "x-arbiter-agent",
            "x-arbiter-session",
            "x-arbiter-tool",
            "x-arbiter-trusted"
        ]
    );

    // A tool from the body, as an MCP client sends it, in the raw header encoding.
    let call = |tool: &str| {
        json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": { "name": tool, "arguments": {} } })
        .to_string()
    };
    let from_body = Forwarded::new(id, agent).body(call("write_file")).raw();
    let answer = both
        .grpc(Some(GATEWAY), &from_body)
        .await
        .expect("answered");
    assert_eq!(
        set_headers(ok_of(&answer))["x-arbiter-calls-remaining"],
        "2"
    );

    // Denials, each as HTTP answers it.
    both.assert_denied_alike(
        &Forwarded::new(id, agent).body(call("delete")),
        403,
        "tool_not_authorized",
    )
    .await;
    both.assert_denied_alike(
        &Forwarded::new(id, agent).header("x-arbiter-tool", "write_file"),
        429,
        "budget_exceeded",
    )
    .await;
    both.assert_denied_alike(
        &Forwarded::new(id, Uuid::new_v4()).header("x-arbiter-tool", "search"),
        403,
        "agent_mismatch",
    )
    .await;
    both.assert_denied_alike(
        &Forwarded::new(Uuid::new_v4(), agent).header("x-arbiter-tool", "search"),
        404,
        "not_found",
    )
    .await;
    // Requests that cannot be decided: 400, nothing counted.
    both.assert_denied_alike(
        &Forwarded::new("not-a-session", agent).header("x-arbiter-tool", "search"),
        400,
        "invalid_request",
    )
    .await;
    let twice = Forwarded::new(id, agent)
        .header("x-arbiter-session", &Uuid::new_v4().to_string())
        .header("x-arbiter-tool", "search");
    let answer = both
        .grpc(Some(GATEWAY), &twice.clone().raw())
        .await
        .expect("answered");
    assert_eq!(
        denied_of(&answer).status,
        400,
        "a session id sent twice is unreadable"
    );
    let answer = both.grpc(Some(GATEWAY), &twice).await.expect("answered");
    assert_eq!(denied_of(&answer).status, 400);
    both.assert_denied_alike(&Forwarded::new(id, agent), 400, "invalid_request")
        .await;
    both.assert_denied_alike(
        &Forwarded::new(id, agent).body("{\"method\":\"tools/call\""),
        400,
        "invalid_request",
    )
    .await;
    both.assert_denied_alike(
        &Forwarded::new(id, agent)
            .header("x-arbiter-tool", "search")
            .header("x-arbiter-cost", "two"),
        400,
        "invalid_request",
    )
    .await;

    // The last call: under a tenth left warns; then the budget denies.
    let last = Forwarded::new(id, agent).header("x-arbiter-tool", "search");
    let answer = both.grpc(Some(GATEWAY), &last).await.expect("answered");
    let set = set_headers(ok_of(&answer));
    assert_eq!(set["x-arbiter-calls-remaining"], "1");
    let answer = both.grpc(Some(GATEWAY), &last).await.expect("answered");
    let set = set_headers(ok_of(&answer));
    assert_eq!(
        (
            set["x-arbiter-calls-remaining"].as_str(),
            set["x-arbiter-warning"].as_str()
        ),
        ("0", "budget_low")
    );
    both.assert_denied_alike(&last, 429, "budget_exceeded")
        .await;
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        4,
        "exactly the allowed checks are counted"
    );
}

/// A full rate window is 429 with `Retry-After`, and a closed session 410, over both.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn grpc_rate_and_closed_denials_match_http(pool: PgPool) {
    let both = both(&pool).await;
    let agent = Uuid::new_v4();
    let id = both
        .create(
            json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 10,
            "time_limit_secs": 600, "rate_limit_per_minute": 1 }),
        )
        .await;
    let call = Forwarded::new(id, agent).header("x-arbiter-tool", "search");
    ok_of(&both.grpc(Some(GATEWAY), &call).await.expect("answered"));
    let answer = both.grpc(Some(GATEWAY), &call).await.expect("answered");
    let denied = denied_of(&answer);
    assert_eq!(
        (denied.status, denied.body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    let secs: u64 = denied
        .retry_after
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&secs), "{secs}");
    assert_eq!(
        answer.status.as_ref().map(|s| s.code),
        Some(Code::ResourceExhausted as i32)
    );
    let http = both.http(&call).await;
    assert_eq!((http.status, &http.body), (429, &denied.body));
    assert!(http.retry_after.is_some());

    sqlx::query("UPDATE arbiter.sessions SET status = 'closed' WHERE session_id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect("closed by SQL");
    // The change feed tells the store; until then the cached copy may still allow.
    let mut denied = None;
    for _ in 0..50 {
        let answer = both.grpc(Some(GATEWAY), &call).await.expect("answered");
        if let Some(HttpResponse::DeniedResponse(_)) = &answer.http_response {
            let decision = denied_of(&answer);
            if decision.status == 410 {
                denied = Some(decision);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let denied = denied.expect("a closed session is denied");
    assert_eq!(denied.body["error"], "already_closed");
    assert_eq!(denied, both.http(&call).await);
}

/// The gateway token arrives as metadata: none or a wrong one fails the RPC as
/// unauthenticated, the admin's as not permitted; a request past the size bound fails too;
/// nothing is decided for any of them.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn grpc_checks_need_the_gateway_token(pool: PgPool) {
    let both = both(&pool).await;
    let agent = Uuid::new_v4();
    let id = both
        .create(
            json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 1,
            "time_limit_secs": 600 }),
        )
        .await;
    let call = Forwarded::new(id, agent).header("x-arbiter-tool", "search");
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("wrong-token-wrong-token"), Code::Unauthenticated),
        (Some(ADMIN), Code::PermissionDenied),
    ] {
        let status = both.grpc(token, &call).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(!status.message().contains(ADMIN));
    }
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        0,
        "nothing was decided"
    );
    // A request past 256 KiB is refused by the transport, decided by nobody.
    let huge = call.clone().body(" ".repeat(300 * 1024));
    let status = both
        .grpc(Some(GATEWAY), &huge)
        .await
        .expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(common::row(&pool, id).await.calls_made, 0);
    ok_of(&both.grpc(Some(GATEWAY), &call).await.expect("answered"));
}
