//! The MCP proxy (`/mcp`) in-process, in front of a recording upstream on a real socket:
//! what it forwards and what it answers itself. The official MCP SDK's client and server
//! go through it end to end in `scripts/test` (`tests/mcp/`); here are the cases an SDK
//! never sends: no token or a wrong one, a closed session, a body read two ways, a body
//! too large, an upstream that is down, and what crosses in headers.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbiter_session::server::{MCP_DENIED, McpUpstream, Server, Tokens};
use arbiter_session::{PgStorage, SessionStore};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-tests";
const GATEWAY: &str = "gateway-token-for-tests";

/// What the upstream received: each request's headers and body.
type Received = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// An upstream MCP endpoint that records every request (of any method) and answers a POST's
/// tools/list with three tools (as SSE when the request's id is a string starting `sse`),
/// tools/call with the tool's name, anything else with an empty result, and any other
/// method 405; it names its session in `mcp-session-id`.
async fn upstream() -> (String, Received) {
    let received: Received = Arc::default();
    let recorded = Arc::clone(&received);
    let app = Router::new().route(
        "/mcp",
        axum::routing::any(
            move |method: axum::http::Method, headers: HeaderMap, body: String| {
                let recorded = Arc::clone(&recorded);
                async move {
                    let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    recorded
                        .lock()
                        .expect("not poisoned")
                        .push((headers, message.clone()));
                    if method == axum::http::Method::POST {
                        answer(&message)
                    } else {
                        StatusCode::METHOD_NOT_ALLOWED.into_response()
                    }
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/mcp"), received)
}

fn answer(message: &Value) -> Response {
    let result = |message: &Value| {
        let result = match message["method"].as_str() {
            Some("tools/list") => json!({ "tools": [
                { "name": "search" }, { "name": "delete" }, { "name": "write_file" }] }),
            Some("tools/call") => json!({ "content": [
                { "type": "text", "text": format!("called {}", message["params"]["name"]) }] }),
            _ => json!({}),
        };
        json!({ "jsonrpc": "2.0", "id": message["id"], "result": result })
    };
    let body = match message {
        Value::Array(messages) => Value::Array(messages.iter().map(result).collect()),
        message => result(message),
    };
    let sse = message["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("sse"));
    let mut response = if sse {
        let events = format!(
            "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}\n\nevent: message\ndata: {body}\n\n"
        );
        ([("content-type", "text/event-stream")], events).into_response()
    } else {
        axum::Json(body).into_response()
    };
    response.headers_mut().insert(
        "mcp-session-id",
        axum::http::HeaderValue::from_static("upstream-session-1"),
    );
    response
}

/// The routes with `/mcp` in front of `upstream`, over a store on `pool`'s database.
async fn proxy(pool: &PgPool, upstream: &str) -> Router {
    let storage = PgStorage::connect(&common::database_url(pool).await)
        .await
        .expect("the store connects");
    let store = SessionStore::builder(storage)
        .storage_timeout(Duration::from_secs(1))
        .build();
    Server::new(store, Tokens::new(ADMIN, GATEWAY).expect("tokens"))
        .with_mcp_upstream(
            McpUpstream::new(upstream)
                .expect("an http URL")
                .with_timeout(Duration::from_secs(2))
                .with_max_body_bytes(4096),
        )
        .expect("a client")
        .router()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

async fn send(app: &Router, token: Option<&str>, headers: &[(&str, &str)], body: String) -> Answer {
    let mut request = Request::post("/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).expect("a request"))
        .await
        .expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Creates a session over HTTP; its id and token.
async fn create(app: &Router, body: Value) -> (Uuid, String) {
    let session = common::routes::create_session(app, ADMIN, &body).await;
    (
        session["session_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("an id"),
        session["session_token"]
            .as_str()
            .expect("a session token")
            .to_owned(),
    )
}

fn call(id: u64, tool: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": { "name": tool, "arguments": {} } })
}

fn tool_names(result: &Value) -> Vec<&str> {
    result["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|tool| tool["name"].as_str())
        .collect()
}

/// The token decides who may come through; calls are decided before they are forwarded
/// and a denial never reaches the upstream; tool lists are filtered in JSON and in SSE;
/// only MCP's headers cross.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn the_proxy_decides_filters_and_forwards(pool: PgPool) {
    let (url, received) = upstream().await;
    let app = proxy(&pool, &url).await;
    let agent = Uuid::new_v4();
    let (id, token) = create(
        &app,
        json!({ "agent_id": agent, "authorized_tools": ["search", "write_file"],
            "call_budget": 3, "time_limit_secs": 600, "tool_limits": { "write_file": 1 } }),
    )
    .await;
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }).to_string();

    // No token, a wrong one, another session's shape: 401, nothing forwarded.
    let (_, other) = create(
        &app,
        json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 1,
            "time_limit_secs": 600 }),
    )
    .await;
    let forged = format!(
        "{}{}",
        &token[..token.len() - 64],
        &other[other.len() - 64..]
    );
    for presented in [
        None,
        Some("arb_nothing"),
        Some(GATEWAY),
        Some(forged.as_str()),
    ] {
        let answer = send(&app, presented, &[], list.clone()).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text);
        assert_eq!(answer.json()["error"], "unauthorized");
        assert!(answer.headers.contains_key("www-authenticate"));
    }
    assert!(received.lock().expect("lock").is_empty());

    // tools/list: filtered, in JSON and in an SSE stream.
    let listed = send(&app, Some(&token), &[], list.clone()).await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    assert_eq!(tool_names(&listed.json()), ["search", "write_file"]);
    assert_eq!(listed.headers["mcp-session-id"], "upstream-session-1");
    let sse = json!({ "jsonrpc": "2.0", "id": "sse-1", "method": "tools/list" }).to_string();
    let streamed = send(&app, Some(&token), &[], sse).await;
    assert_eq!(streamed.headers["content-type"], "text/event-stream");
    let events: Vec<&str> = streamed
        .text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .collect();
    assert_eq!(events.len(), 2, "{}", streamed.text);
    let data = events[1]
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .expect("data");
    let data: Value = serde_json::from_str(data).expect("JSON");
    assert_eq!(tool_names(&data), ["search", "write_file"]);

    // An allowed call: forwarded with MCP's headers only, answered with the signals.
    let allowed = send(
        &app,
        Some(&token),
        &[
            ("mcp-session-id", "upstream-session-1"),
            ("mcp-protocol-version", "2025-06-18"),
            ("x-arbiter-agent", &Uuid::new_v4().to_string()),
            ("cookie", "secret=1"),
        ],
        call(2, "search").to_string(),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.text);
    assert_eq!(
        allowed.json()["result"]["content"][0]["text"],
        "called \"search\""
    );
    assert_eq!(allowed.headers["x-arbiter-calls-remaining"], "2");
    {
        let received = received.lock().expect("lock");
        let (headers, _) = received.last().expect("forwarded");
        assert_eq!(headers["mcp-session-id"], "upstream-session-1");
        assert_eq!(headers["mcp-protocol-version"], "2025-06-18");
        for never in ["authorization", "x-arbiter-agent", "cookie"] {
            assert!(!headers.contains_key(never), "{never} crossed");
        }
    }

    // Denials: a JSON-RPC error per request, with the code in data; nothing forwarded.
    let forwarded = received.lock().expect("lock").len();
    let denied = send(&app, Some(&token), &[], call(3, "delete").to_string()).await;
    assert_eq!(denied.status, StatusCode::OK);
    let error = &denied.json()["error"];
    assert_eq!(
        (
            error["code"].as_i64(),
            error["message"].as_str(),
            &error["data"]["error"]
        ),
        (
            Some(MCP_DENIED),
            Some("tool not authorized in session"),
            &json!("tool_not_authorized")
        ),
        "{}",
        denied.text
    );
    assert_eq!(denied.json()["id"], 3);
    // A batch is one decision: both calls allowed together (1 + 2 = 3 calls).
    let batch = json!([call(4, "search"), call(5, "write_file")]).to_string();
    let both = send(&app, Some(&token), &[], batch).await;
    assert_eq!(
        both.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        both.text
    );
    assert_eq!(both.headers["x-arbiter-calls-remaining"], "0");
    assert_eq!(both.headers["x-arbiter-warning"], "budget_low");
    // The budget is spent: a batch of a call and a ping gets an error for each request.
    let batch = json!([call(6, "search"),
        { "jsonrpc": "2.0", "id": 7, "method": "ping" },
        { "jsonrpc": "2.0", "method": "notifications/cancelled" }])
    .to_string();
    let spent = send(&app, Some(&token), &[], batch).await;
    let errors = spent.json();
    let codes: Vec<&Value> = errors
        .as_array()
        .expect("a batch")
        .iter()
        .map(|reply| &reply["error"]["data"]["error"])
        .collect();
    assert_eq!(
        codes,
        [&json!("budget_exceeded"), &json!("budget_exceeded")]
    );

    // Bodies read two ways, and bodies too large: refused here.
    let twice = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"search","name":"delete"}}"#;
    let unreadable = send(&app, Some(&token), &[], twice.to_owned()).await;
    assert_eq!(unreadable.status, StatusCode::BAD_REQUEST);
    assert_eq!(unreadable.json()["error"]["code"], -32700);
    let large = send(&app, Some(&token), &[], "x".repeat(5000)).await;
    assert_eq!(large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        received.lock().expect("lock").len(),
        forwarded + 1,
        "of all these, only the allowed batch reached the upstream"
    );
    // A body sent with another method than POST was not decided, so it does not cross.
    let get = app
        .clone()
        .oneshot(
            Request::get("/mcp")
                .header("authorization", format!("Bearer {token}"))
                .body(Body::from(call(9, "search").to_string()))
                .expect("a request"),
        )
        .await
        .expect("infallible");
    assert_eq!(
        get.status(),
        StatusCode::METHOD_NOT_ALLOWED,
        "the upstream's answer"
    );
    {
        let received = received.lock().expect("lock");
        assert_eq!(received.len(), forwarded + 2, "the GET itself crossed");
        assert_eq!(
            received.last().map(|(_, body)| body),
            Some(&Value::Null),
            "without its body"
        );
    }
    assert_eq!(common::row(&pool, id).await.calls_made, 3);

    // Only the digest of the token's secret is stored, and it never changes.
    let stored: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT token_digest FROM arbiter.sessions WHERE session_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .expect("the row");
    let stored = stored.expect("a digest");
    assert_eq!(stored.len(), 32);
    assert!(
        !token.contains(
            &stored
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    );
    let changed =
        sqlx::query("UPDATE arbiter.sessions SET token_digest = NULL WHERE session_id = $1")
            .bind(id)
            .execute(&pool)
            .await
            .expect_err("the digest is fixed");
    assert!(changed.to_string().contains("never changes"), "{changed}");
}

/// An upstream that is down is 503; a closed session's token gets the session's error;
/// neither reaches anything.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn an_upstream_down_and_a_closed_session(pool: PgPool) {
    // A port nothing listens on.
    let free = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = free.local_addr().expect("bound");
    drop(free);
    let app = proxy(&pool, &format!("http://{address}/mcp")).await;
    let agent = Uuid::new_v4();
    let (id, token) = create(
        &app,
        json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 5,
            "time_limit_secs": 600 }),
    )
    .await;
    let list = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }).to_string();
    let down = send(&app, Some(&token), &[], list.clone()).await;
    assert_eq!(
        down.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        down.text
    );
    assert_eq!(down.json()["error"], "upstream_unavailable");

    let closed = app
        .clone()
        .oneshot(
            Request::post(format!("/v1/sessions/{id}/close"))
                .header("authorization", format!("Bearer {ADMIN}"))
                .body(Body::empty())
                .expect("a request"),
        )
        .await
        .expect("infallible");
    assert_eq!(closed.status(), StatusCode::OK);
    let after = send(&app, Some(&token), &[], list).await;
    assert_eq!(after.status, StatusCode::GONE, "{}", after.text);
    assert_eq!(after.json()["error"], "already_closed");
    let call = send(&app, Some(&token), &[], call(2, "search").to_string()).await;
    assert_eq!(call.status, StatusCode::GONE);
    assert_eq!(common::row(&pool, id).await.calls_made, 0);
}

/// An upstream whose `/mcp` answers a POST with an SSE stream that sends one event and
/// then nothing, forever, or (for a request whose id is `slow`) answers nothing at all;
/// `dropped` is set once a stream it began was dropped (its client went away).
async fn endless_upstream() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Guard(Arc<AtomicBool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let app = Router::new().route(
        "/mcp",
        axum::routing::post(move |body: String| {
            let flag = Arc::clone(&flag);
            async move {
                if body.contains("\"slow\"") {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let guard = Guard(flag);
                let first = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(axum::body::Bytes::from_static(
                        b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
                    ))
                });
                let never = futures_util::stream::unfold(guard, |guard| async move {
                    std::future::pending::<()>().await;
                    Some((Ok(axum::body::Bytes::new()), guard))
                });
                (
                    [("content-type", "text/event-stream")],
                    Body::from_stream(futures_util::StreamExt::chain(first, never)),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/mcp"), dropped)
}

/// A client that goes away mid-stream takes the upstream's stream with it; an upstream
/// that does not answer within the timeout is 503, after the timeout and not much more.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn streams_end_with_their_client_and_a_silent_upstream_times_out(pool: PgPool) {
    use std::sync::atomic::Ordering;

    let (url, dropped) = endless_upstream().await;
    let app = proxy(&pool, &url).await;
    let (_, token) = create(
        &app,
        json!({ "agent_id": Uuid::new_v4(), "authorized_tools": ["search"], "call_budget": 5,
            "time_limit_secs": 600 }),
    )
    .await;
    let request = |id: &str| {
        Request::post("/mcp")
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(
                json!({ "jsonrpc": "2.0", "id": id, "method": "tools/list" }).to_string(),
            ))
            .expect("a request")
    };
    let response = app
        .clone()
        .oneshot(request("stream"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let first = futures_util::StreamExt::next(&mut body)
        .await
        .expect("an event")
        .expect("bytes");
    assert!(first.starts_with(b"event: message"), "{first:?}");
    assert!(!dropped.load(Ordering::SeqCst), "the stream is still open");
    drop(body);
    common::until("the upstream's stream is dropped with its client", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;

    // The proxy's timeout is 2 s (`proxy`); the upstream would answer after 30. The bound
    // here is liveness only: the answer must come, from the timeout.
    let silent = tokio::time::timeout(
        Duration::from_secs(10),
        app.clone().oneshot(request("slow")),
    )
    .await
    .expect("answered before the upstream would have")
    .expect("infallible");
    assert_eq!(silent.status(), StatusCode::SERVICE_UNAVAILABLE);
    let bytes = axum::body::to_bytes(silent.into_body(), 1 << 20)
        .await
        .expect("a body");
    let error: Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(
        (&error["error"], &error["message"]),
        (
            &json!("upstream_unavailable"),
            &json!("the MCP upstream did not answer in time")
        )
    );
}
