//! `arbiter-session serve` as deployed: the real binary on a free loopback port, against a
//! fresh database, spoken to over HTTP with a real client. Every route, both roles, every
//! error code the routes can reach, the body limit, `Retry-After`, Envoy's ext_authz check
//! (headers, and a JSON-RPC body), `/metrics`, `/openapi.json`, `/readyz` following the
//! database through a fault proxy, and a SIGTERM that makes a pending session durable
//! before the process exits.

mod common;

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-tests";
const GATEWAY: &str = "gateway-token-for-tests";

/// A running service; killed when dropped.
struct Service {
    child: Child,
    base: String,
    client: Client,
    log: tempfile_path::TempPath,
}

/// A log file that disappears with the test (no dependency for one file).
mod tempfile_path {
    use std::path::PathBuf;

    #[derive(Debug)]
    pub struct TempPath(pub PathBuf);

    impl TempPath {
        pub fn new() -> Self {
            TempPath(
                std::env::temp_dir().join(format!("arbiter-serve-{}.log", uuid::Uuid::new_v4())),
            )
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `arbiter-session serve` on `url` with `args`, and waits for its address line
/// (off the runtime: a fault proxy on this runtime may be what it connects through).
async fn start(url: &str, args: &[&str]) -> Service {
    let log = tempfile_path::TempPath::new();
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbiter-session"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--storage-timeout-ms", "1000"])
        .args(args)
        .env("DATABASE_URL", url)
        .env("ARBITER_ADMIN_TOKEN", ADMIN)
        .env("ARBITER_GATEWAY_TOKEN", GATEWAY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(File::create(&log.0).expect("log file"))
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the address line");
        line
    })
    .await
    .expect("read the address line");
    let address = line
        .trim()
        .strip_prefix("arbiter-session: listening on ")
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(&log.0).unwrap_or_default();
            panic!("no address line: {line:?}\n{log}")
        })
        .to_owned();
    Service {
        child,
        base: format!("http://{address}"),
        client: Client::new(),
        log,
    }
}

impl Service {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("the service answers")
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        json_of(self.send(Method::POST, path, Some(token), Some(body)).await).await
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        json_of(self.send(Method::GET, path, Some(token), None).await).await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log.0).unwrap_or_default()
    }

    /// Sends SIGTERM, as an orchestrator does.
    fn terminate(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM sent");
    }
}

async fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("a body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// An error answer: its status and code, and a message without the session's details.
#[track_caller]
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"], code, "{}", answer.1);
    assert!(answer.1["message"].is_string(), "{}", answer.1);
}

async fn create(service: &Service, body: Value) -> Uuid {
    let (status, session) = service.post("/v1/sessions", ADMIN, body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    session["session_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("a session id")
}

async fn sessions_in(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.sessions"#)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_routes_roles_and_errors(pool: PgPool) {
    let service = start(&common::database_url(&pool).await, &[]).await;
    let agent = Uuid::new_v4();
    let body = json!({
        "agent_id": agent, "authorized_tools": ["search", "fetch"], "call_budget": 3,
        "time_limit_secs": 600, "declared_intent": "tests"
    });

    // Roles: no token and a wrong one are 401; the gateway may not create.
    let none = json_of(
        service
            .send(Method::POST, "/v1/sessions", None, Some(body.clone()))
            .await,
    )
    .await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_error(
        &service.post("/v1/sessions", "wrong", body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &service.post("/v1/sessions", GATEWAY, body.clone()).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(
        sessions_in(&pool).await,
        0,
        "nothing written for a refused create"
    );

    // Malformed input is 400 and writes nothing.
    let mut unknown = body.clone();
    unknown["surprise"] = json!(1);
    assert_error(
        &service.post("/v1/sessions", ADMIN, unknown).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let mut zero = body.clone();
    zero["call_budget"] = json!(0);
    assert_error(
        &service.post("/v1/sessions", ADMIN, zero).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    for limits in [
        json!({ "fetch": 0 }),
        json!({ "rm": 1 }),
        json!({ "fetch": -1 }),
    ] {
        let mut bad = body.clone();
        bad["tool_limits"] = limits;
        assert_error(
            &service.post("/v1/sessions", ADMIN, bad).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    let broken = service
        .client
        .post(format!("{}/v1/sessions", service.base))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{\"agent_id\":")
        .send()
        .await
        .expect("answer");
    assert_error(
        &json_of(broken).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let huge = json!({ "agent_id": agent, "authorized_tools": ["x".repeat(70 * 1024)],
        "call_budget": 1, "time_limit_secs": 60 });
    assert_error(
        &service.post("/v1/sessions", ADMIN, huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    assert_error(
        &service.get("/v1/sessions/not-a-uuid", ADMIN).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_eq!(sessions_in(&pool).await, 0);

    // Create, read with both roles, use until the budget denies.
    let id = create(&service, body.clone()).await;
    for token in [ADMIN, GATEWAY] {
        let (status, session) = service.get(&format!("/v1/sessions/{id}"), token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (
                session["calls_remaining"].as_u64(),
                session["status"].as_str()
            ),
            (Some(3), Some("active"))
        );
    }
    let use_path = format!("/v1/sessions/{id}/use");
    let call = |tool: &str, agent: Uuid| json!({ "tool": tool, "agent_id": agent });
    assert_error(
        &service.post(&use_path, ADMIN, call("search", agent)).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (status, used) = service
        .post(&use_path, GATEWAY, call("search", agent))
        .await;
    assert_eq!(status, StatusCode::OK, "{used}");
    assert_eq!(
        used,
        json!({ "calls_made": 1, "calls_remaining": 2, "status": "active" })
    );
    assert_error(
        &service.post(&use_path, GATEWAY, call("rm", agent)).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_error(
        &service
            .post(&use_path, GATEWAY, call("search", Uuid::new_v4()))
            .await,
        StatusCode::FORBIDDEN,
        "agent_mismatch",
    );
    let batch_path = format!("/v1/sessions/{id}/use-batch");
    let batch = |tools: &[&str]| json!({ "tools": tools, "agent_id": agent });
    assert_error(
        &service
            .post(&batch_path, GATEWAY, batch(&["search", "fetch", "search"]))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    let (status, used) = service
        .post(&batch_path, GATEWAY, batch(&["search", "fetch"]))
        .await;
    assert_eq!(
        (status, used["calls_remaining"].as_u64()),
        (StatusCode::OK, Some(0))
    );
    let denied = service
        .post(&use_path, GATEWAY, call("search", agent))
        .await;
    assert_error(&denied, StatusCode::TOO_MANY_REQUESTS, "budget_exceeded");
    assert_eq!(
        denied.1["message"], "session budget exceeded",
        "the opaque Display"
    );
    let row = common::row(&pool, id).await;
    assert_eq!(row.calls_made, 3, "exactly the allowed calls are stored");

    // Close (the gateway may), then every use is 410.
    let (status, closed) = service
        .post(&format!("/v1/sessions/{id}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(
        (status, closed["status"].as_str()),
        (StatusCode::OK, Some("closed"))
    );
    assert_error(
        &service
            .post(&use_path, GATEWAY, call("search", agent))
            .await,
        StatusCode::GONE,
        "already_closed",
    );
    assert_error(
        &service
            .get(&format!("/v1/sessions/{}", Uuid::new_v4()), ADMIN)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // A tool's own limit: accepted on create, returned by get, denied past it as the
    // budget is.
    let mut limited_body = body.clone();
    limited_body["tool_limits"] = json!({ "fetch": 1 });
    let limited_id = create(&service, limited_body).await;
    let session_path = format!("/v1/sessions/{limited_id}");
    let (_, session) = service.get(&session_path, GATEWAY).await;
    assert_eq!(
        session["tool_limits"],
        json!({ "fetch": { "limit": 1, "calls": 0 } })
    );
    let limited_use = format!("{session_path}/use");
    let (status, _) = service
        .post(&limited_use, GATEWAY, call("fetch", agent))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        &service
            .post(&limited_use, GATEWAY, call("fetch", agent))
            .await,
        StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
    );
    let (_, session) = service.get(&session_path, GATEWAY).await;
    assert_eq!(
        (
            session["tool_limits"]["fetch"]["calls"].as_u64(),
            session["calls_made"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let (status, _) = service
        .post(&format!("{session_path}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Agents: the cap, the live count, close-all.
    let mut capped = body.clone();
    capped["max_live_sessions"] = json!(1);
    create(&service, capped.clone()).await;
    assert_error(
        &service.post("/v1/sessions", ADMIN, capped).await,
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_sessions",
    );
    let live = format!("/v1/agents/{agent}/live-sessions");
    assert_error(
        &service.get(&live, GATEWAY).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(service.get(&live, ADMIN).await.1, json!({ "count": 1 }));
    let (status, all) = service
        .post(&format!("/v1/agents/{agent}/close-all"), ADMIN, json!({}))
        .await;
    assert_eq!((status, all), (StatusCode::OK, json!({ "closed": 1 })));
    assert_eq!(service.get(&live, ADMIN).await.1, json!({ "count": 0 }));

    // A full rate window says when to come back; an expired session is 408.
    let rated = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["*"],
        "call_budget": 10, "time_limit_secs": 1, "rate_limit_per_minute": 1 }),
    )
    .await;
    let rated_use = format!("/v1/sessions/{rated}/use");
    assert_eq!(
        service
            .post(&rated_use, GATEWAY, call("search", agent))
            .await
            .0,
        StatusCode::OK
    );
    let limited = service
        .send(
            Method::POST,
            &rated_use,
            Some(GATEWAY),
            Some(call("search", agent)),
        )
        .await;
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After on a full window");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_error(
        &json_of(limited).await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_error(
        &service
            .post(&rated_use, GATEWAY, call("search", agent))
            .await,
        StatusCode::REQUEST_TIMEOUT,
        "expired",
    );

    // Unknown routes answer in the same shape.
    assert_error(
        &service.get("/v2/nothing", ADMIN).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_ext_authz_metrics_and_openapi(pool: PgPool) {
    let service = start(&common::database_url(&pool).await, &[]).await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 2, "time_limit_secs": 600 }),
    )
    .await;
    // A check as Envoy sends it: the gateway's token, the session and agent headers.
    let check = |path: &str, session: &str| {
        service
            .client
            .request(Method::POST, format!("{}/v1/check{path}", service.base))
            .bearer_auth(GATEWAY)
            .header("x-arbiter-session", session.to_owned())
            .header("x-arbiter-agent", agent.to_string())
    };
    let remaining = |response: &Response| {
        response
            .headers()
            .get("x-arbiter-calls-remaining")
            .map(|v| v.as_bytes().to_vec())
    };
    let session = id.to_string();

    // Headers only.
    let allowed = check("/mcp", &session)
        .header("x-arbiter-tool", "search")
        .send()
        .await
        .expect("answer");
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(remaining(&allowed), Some(b"1".to_vec()));

    // An MCP tools/call forwarded with its body: the tool comes from params.name.
    let rpc = |tool: &str| {
        json!({ "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": { "name": tool, "arguments": {} } })
    };
    let denied = check("/", &session)
        .json(&rpc("delete_everything"))
        .send()
        .await
        .expect("answer");
    assert_error(
        &json_of(denied).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    let allowed = check("/mcp", &session)
        .json(&rpc("search"))
        .send()
        .await
        .expect("answer");
    assert_eq!(remaining(&allowed), Some(b"0".to_vec()));
    let bad = check("/mcp", "{not a uuid}")
        .header("x-arbiter-tool", "search")
        .send()
        .await
        .expect("answer");
    assert_error(
        &json_of(bad).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // The admin token may not check.
    let admin = service
        .client
        .post(format!("{}/v1/check/mcp", service.base))
        .bearer_auth(ADMIN)
        .header("x-arbiter-session", session.clone())
        .header("x-arbiter-agent", agent.to_string())
        .header("x-arbiter-tool", "search")
        .send()
        .await
        .expect("answer");
    assert_eq!(admin.status(), StatusCode::FORBIDDEN);
    assert_eq!(common::row(&pool, id).await.calls_made, 2);

    // Metrics show the decisions that were made, and the requests by route.
    let metrics = service
        .send(Method::GET, "/metrics", None, None)
        .await
        .text()
        .await
        .expect("metrics");
    let allowed_line = metrics
        .lines()
        .find(|line| {
            line.starts_with("arbiter_session_decisions_total") && line.contains("result=\"allow\"")
        })
        .unwrap_or_else(|| panic!("no allow counter in\n{metrics}"));
    assert!(allowed_line.ends_with(" 2"), "{allowed_line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("arbiter_session_decisions_total")
                && l.contains("reason=\"tool\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("arbiter_http_requests_total{route=\"/v1/check/{*rest}\",status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("arbiter_session_use_seconds"), "{metrics}");

    // The OpenAPI document is generated from the handlers.
    let (status, doc) = json_of(service.send(Method::GET, "/openapi.json", None, None).await).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}/use",
        "/v1/agents/{agent_id}/close-all",
        "/readyz",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
    assert!(
        doc["components"]["schemas"]["CreateBody"]["properties"]["max_live_sessions"].is_object()
    );

    let (status, health) = json_of(service.send(Method::GET, "/healthz", None, None).await).await;
    assert_eq!(
        (status, health),
        (StatusCode::OK, json!({ "status": "ok" }))
    );
}

/// `DATABASE_URL` of `pool`'s database, through `proxy`.
async fn url_through(pool: &PgPool, proxy: &common::proxy::FaultProxy) -> String {
    let url = common::database_url(pool).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').expect("a database name");
    let credentials = authority
        .rsplit_once('@')
        .map(|(c, _)| format!("{c}@"))
        .unwrap_or_default();
    format!(
        "{scheme}://{credentials}127.0.0.1:{}/{path}",
        proxy.addr().port()
    )
}

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_readyz_follows_the_database_and_sigterm_flushes(pool: PgPool) {
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let mut service = start(
        &url_through(&pool, &proxy).await,
        &["--shutdown-timeout-secs", "20"],
    )
    .await;
    let ready = || async {
        service
            .send(Method::GET, "/readyz", None, None)
            .await
            .status()
    };
    assert_eq!(ready().await, StatusCode::OK);

    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600 }),
    )
    .await;
    let call = json!({ "tool": "search", "agent_id": agent });
    let use_path = format!("/v1/sessions/{id}/use");
    assert_eq!(
        service.post(&use_path, GATEWAY, call.clone()).await.0,
        StatusCode::OK
    );

    // The database goes away: not ready (once the last check, at most a second old, is
    // stale), and a use is counted but not durable.
    proxy.refuse();
    proxy.cut();
    let mut waited = Duration::ZERO;
    while ready().await != StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            waited < Duration::from_secs(5),
            "still ready without a database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    assert_error(
        &service.post(&use_path, GATEWAY, call.clone()).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    assert_eq!(common::row(&pool, id).await.calls_made, 1);
    // A session this process never loaded cannot be read: 503, never 404.
    assert_error(
        &service
            .get(&format!("/v1/sessions/{}", Uuid::new_v4()), GATEWAY)
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_read",
    );

    // Back: ready again, and the pending call is written.
    proxy.heal();
    let mut waited = Duration::ZERO;
    while ready().await != StatusCode::OK || common::row(&pool, id).await.calls_made != 2 {
        assert!(
            waited < Duration::from_secs(15),
            "not ready and durable after the heal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }

    // Away again: a third call is pending when SIGTERM arrives. The process keeps running
    // (it is making that call durable) until the database is back, then exits 0.
    proxy.refuse();
    proxy.cut();
    assert_error(
        &service.post(&use_path, GATEWAY, call).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    service.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        service.child.try_wait().expect("try_wait").is_none(),
        "the service exited with a call still pending:\n{}",
        service.log()
    );
    proxy.heal();
    let (status, service) = tokio::task::spawn_blocking(move || {
        let status = service.child.wait().expect("the service exits");
        (status, service)
    })
    .await
    .expect("wait");
    let log = service.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("shutdown clean"), "{log}");
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        3,
        "the call pending at SIGTERM is durable"
    );
}

#[test]
fn serve_refuses_to_start_without_good_tokens_or_with_no_auth_in_public() {
    let run = |args: &[&str], tokens: (Option<&str>, Option<&str>)| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_arbiter-session"));
        command
            .arg("serve")
            .args(args)
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env_remove("ARBITER_ADMIN_TOKEN")
            .env_remove("ARBITER_GATEWAY_TOKEN");
        if let Some(admin) = tokens.0 {
            command.env("ARBITER_ADMIN_TOKEN", admin);
        }
        if let Some(gateway) = tokens.1 {
            command.env("ARBITER_GATEWAY_TOKEN", gateway);
        }
        command.output().expect("the binary runs")
    };
    let local = ["--listen", "127.0.0.1:0"];
    let short = "fifteen-bytes!!";
    for (output, expected, secret) in [
        (run(&local, (None, None)), "both tokens are required", ADMIN),
        (
            run(&local, (Some(ADMIN), None)),
            "both tokens are required",
            ADMIN,
        ),
        (
            run(&["--listen", "0.0.0.0:0", "--no-auth"], (None, None)),
            "only on a loopback address",
            ADMIN,
        ),
        // Security review, defect 7: tokens that are short, or one token for both roles.
        (
            run(&local, (Some(short), Some(GATEWAY))),
            "the admin token is shorter than 16 bytes",
            short,
        ),
        (
            run(&local, (Some(ADMIN), Some(short))),
            "the gateway token is shorter than 16 bytes",
            short,
        ),
        (
            run(&local, (Some(ADMIN), Some(ADMIN))),
            "the admin and gateway tokens must differ",
            ADMIN,
        ),
    ] {
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(!err.contains(secret), "a token never appears in an error");
    }
}

/// Security review, defect 1: the check decides the tool a JSON-RPC body names, whatever
/// `x-arbiter-tool` says. A header that disagrees with the body, a body the check cannot
/// read, a body Envoy cut short, and a JSON-RPC batch with one forbidden call are each
/// denied, and none of them counts a call.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_check_decides_the_tool_the_body_names(pool: PgPool) {
    let service = start(&common::database_url(&pool).await, &[]).await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600 }),
    )
    .await;
    let check = || {
        service
            .client
            .post(format!("{}/v1/check/mcp", service.base))
            .bearer_auth(GATEWAY)
            .header("x-arbiter-session", id.to_string())
            .header("x-arbiter-agent", agent.to_string())
    };
    let call = |tool: &str| {
        json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": tool, "arguments": {} } })
    };
    let answer = |request: reqwest::RequestBuilder| async move {
        json_of(request.send().await.expect("answer")).await
    };

    // The reviewer's request: the header says search, the body calls delete_repo.
    let bypass = answer(
        check()
            .header("x-arbiter-tool", "search")
            .json(&call("delete_repo")),
    )
    .await;
    assert_ne!(bypass.0, StatusCode::OK, "{}", bypass.1);
    assert_error(&bypass, StatusCode::BAD_REQUEST, "invalid_request");
    // Without the header the body's tool is decided: denied by the allow-list.
    assert_error(
        &answer(check().json(&call("delete_repo"))).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    // A body the check cannot read, without the header.
    assert_error(
        &answer(check().body("{\"jsonrpc\":\"2.0\",\"method\":\"tools/call\",")).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // ... or with it: an upstream might read what the check could not.
    assert_error(
        &answer(check().header("x-arbiter-tool", "search").body(
            "{\"method\":\"tools/call\",\"params\":{\"name\":\"search\",\"name\":\"delete_repo\"}}",
        ))
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A body Envoy cut at max_request_bytes (allow_partial_message: true).
    assert_error(
        &answer(
            check()
                .header("x-envoy-auth-partial-body", "true")
                .json(&call("search")),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A batch decides every call it holds, all or nothing.
    assert_error(
        &answer(check().json(&json!([call("search"), call("delete_repo")]))).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        0,
        "nothing counted"
    );

    let allowed = check()
        .json(&json!([call("search"), call("search")]))
        .send()
        .await
        .expect("answer");
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(
        allowed
            .headers()
            .get("x-arbiter-calls-remaining")
            .map(|v| v.as_bytes()),
        Some(&b"3"[..])
    );
    // A header that agrees with the body is fine.
    let agreed = check()
        .header("x-arbiter-tool", "search")
        .json(&call("search"))
        .send()
        .await
        .expect("answer");
    assert_eq!(agreed.status(), StatusCode::OK);
    assert_eq!(common::row(&pool, id).await.calls_made, 3);
}

/// Security review, defect 2: clients that never finish a request head cannot hold a
/// SIGTERM'd service open. 500 connections each send half a head; on SIGTERM the service
/// closes them, still makes its pending session durable, and exits 0 within
/// `--shutdown-timeout-secs`.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_shutdown_is_bounded_whatever_the_clients_do(pool: PgPool) {
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let bound = Duration::from_secs(4);
    let mut service = start(
        &url_through(&pool, &proxy).await,
        &["--shutdown-timeout-secs", "4"],
    )
    .await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600 }),
    )
    .await;
    // A call counted but not durable: the session is pending.
    proxy.refuse();
    proxy.cut();
    assert_error(
        &service
            .post(
                &format!("/v1/sessions/{id}/use"),
                GATEWAY,
                json!({ "tool": "search", "agent_id": agent }),
            )
            .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );

    let address = service.base.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..500 {
        let mut stream = tokio::net::TcpStream::connect(&address)
            .await
            .expect("a connection");
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("half a request head");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    service.terminate();
    let signalled = std::time::Instant::now();
    // The database comes back only after the signal: the store's shutdown, not the
    // reconciler before it, makes the call durable.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.heal();
    let (status, service) = tokio::task::spawn_blocking(move || {
        while signalled.elapsed() < bound + Duration::from_secs(6) {
            if let Some(status) = service.child.try_wait().expect("try_wait") {
                return (Some(status), service);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (None, service)
    })
    .await
    .expect("wait");
    let took = signalled.elapsed();
    let log = service.log();
    let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGTERM:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took <= bound + Duration::from_secs(1),
        "exited {took:?} after SIGTERM, bound {bound:?}\n{log}"
    );
    assert!(log.contains("shutdown clean"), "{log}");
    assert_eq!(
        common::row(&pool, id).await.calls_made,
        1,
        "the call pending at SIGTERM is durable"
    );
    drop(held);
}

/// Reads from `stream` until the service closes it (EOF or reset); how long that took.
async fn closed_within(stream: &mut tokio::net::TcpStream, bound: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            bound.saturating_sub(started.elapsed()),
            tokio::io::AsyncReadExt::read(stream, &mut buf),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Security review, defect 2: a head sent too slowly, an idle keep-alive connection and a
/// connection past `--max-connections` each hold nothing for longer than their bound.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_connections_are_bounded_in_time_and_number(pool: PgPool) {
    let service = start(
        &common::database_url(&pool).await,
        &[
            "--header-read-timeout-secs",
            "1",
            "--idle-timeout-secs",
            "2",
            "--max-connections",
            "2",
        ],
    )
    .await;
    let address = service.base.trim_start_matches("http://").to_owned();
    let connect = || async {
        tokio::net::TcpStream::connect(&address)
            .await
            .expect("a connection")
    };
    use tokio::io::AsyncWriteExt as _;

    // Half a head: closed after the header timeout, not the idle one.
    let mut slow = connect().await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .expect("write");
    let took = closed_within(&mut slow, Duration::from_secs(10))
        .await
        .expect("a half-sent head is cut");
    assert!(took < Duration::from_millis(1900), "{took:?}");

    // A keep-alive connection that answered one request, then sent nothing.
    let mut idle = connect().await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let took = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(took >= Duration::from_millis(1500), "{took:?}");

    // Two connections are open: a third is not served until one of them closes.
    let first = connect().await;
    let _second = connect().await;
    let mut third = connect().await;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read_to_end(&mut third, &mut answer),
    )
    .await;
    assert!(waited.is_err(), "served past the bound: {answer:?}");
    drop(first);
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut third, &mut answer),
    )
    .await
    .expect("served once a connection closed")
    .expect("read");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

/// Security review, defect 3: `/readyz` needs no token, so a flood of it must not take
/// the pool's connections from real calls. With the readiness query stuck behind a lock,
/// 64 clients flooding `/readyz` leave every `/use` answered.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_a_readyz_flood_changes_no_answer_of_use(pool: PgPool) {
    let service =
        std::sync::Arc::new(start(&common::database_url(&pool).await, &["--pool-size", "4"]).await);
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 100, "time_limit_secs": 600 }),
    )
    .await;
    // Every readiness query now waits for this lock.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's transaction, never cancelled"
    )]
    let mut locker = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE public._sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let (service, stop) = (service.clone(), stop.clone());
            tokio::spawn(async move {
                let mut sent = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let status = service
                        .send(Method::GET, "/readyz", None, None)
                        .await
                        .status();
                    assert!(
                        status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
                        "{status}"
                    );
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/v1/sessions/{id}/use");
    for call in 1..=20 {
        let answer = service
            .post(
                &path,
                GATEWAY,
                json!({ "tool": "search", "agent_id": agent }),
            )
            .await;
        assert_eq!(answer.0, StatusCode::OK, "call {call}: {}", answer.1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for task in flood {
        sent += task.await.expect("flood task");
    }
    assert!(sent >= 64, "the flood ran ({sent} requests)");
    locker.rollback().await.expect("rollback");
    assert_eq!(common::row(&pool, id).await.calls_made, 20);
}

/// The README's grants for the gateway role (the ```sql block that grants to
/// `arbiter_gateway`), for `role`.
fn readme_gateway_grants(role: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let block = readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .find(|block| block.contains("TO arbiter_gateway"))
        .expect("the README has the gateway role's grants");
    block
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(|statement| statement.replace("arbiter_gateway", role))
        .collect()
}

/// Security review, defect 6: the service runs as a role with exactly the README's grants,
/// with `--no-upkeep`, through create, use, a denial, a write that fails and is reconciled
/// into a row changed meanwhile, and close; the schema's owner runs `arbiter-session
/// upkeep`. The role is dropped afterwards, whatever the outcome.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_runs_as_a_role_with_only_the_readmes_grants(pool: PgPool) {
    let role = format!("arbiter_gateway_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role} LOGIN")))
        .execute(&pool)
        .await
        .expect("create the role");
    let body = {
        let (pool, role) = (pool.clone(), role.clone());
        tokio::spawn(async move { run_as_gateway_role(pool, &role).await })
    };
    let outcome = body.await;
    for statement in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .expect("drop the role");
    }
    if let Err(panicked) = outcome {
        std::panic::resume_unwind(panicked.into_panic());
    }
}

async fn run_as_gateway_role(pool: PgPool, role: &str) {
    for grant in readme_gateway_grants(role) {
        sqlx::query(sqlx::AssertSqlSafe(grant.clone()))
            .execute(&pool)
            .await
            .expect(&grant);
    }
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let url = url_through(&pool, &proxy).await;
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let as_role = format!("{scheme}://{role}@{host}");
    let service = start(&as_role, &["--no-upkeep"]).await;
    let (status, ready) = json_of(service.send(Method::GET, "/readyz", None, None).await).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 5, "time_limit_secs": 600, "tool_limits": { "search": 4 } }),
    )
    .await;
    let path = format!("/v1/sessions/{id}/use");
    let call = |tool: &str, who: Uuid| json!({ "tool": tool, "agent_id": who });
    assert_eq!(
        service.post(&path, GATEWAY, call("search", agent)).await.0,
        StatusCode::OK
    );
    assert_error(
        &service.post(&path, GATEWAY, call("delete", agent)).await,
        StatusCode::FORBIDDEN,
        "tool_not_authorized",
    );
    assert_error(
        &service
            .post(&path, GATEWAY, call("search", Uuid::new_v4()))
            .await,
        StatusCode::FORBIDDEN,
        "agent_mismatch",
    );
    // A write that fails: the call stays pending while the owner changes the row, and is
    // merged into it (a locked update) once the database is back.
    proxy.refuse();
    proxy.cut();
    assert_error(
        &service.post(&path, GATEWAY, call("search", agent)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    sqlx::query!(
        "UPDATE arbiter.sessions SET declared_intent = 'changed by the operator' WHERE session_id = $1",
        id
    )
    .execute(&pool)
    .await
    .expect("the owner's update");
    proxy.heal();
    let mut waited = Duration::ZERO;
    while common::row(&pool, id).await.calls_made != 2 {
        assert!(
            waited < Duration::from_secs(15),
            "not reconciled:\n{}",
            service.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    let (status, closed) = service
        .post(&format!("/v1/sessions/{id}/close"), GATEWAY, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{closed}");

    // The owner's upkeep, beside the service.
    let upkeep = Command::new(env!("CARGO_BIN_EXE_arbiter-session"))
        .arg("upkeep")
        .env("DATABASE_URL", common::database_url(&pool).await)
        .output()
        .expect("the binary runs");
    assert!(
        upkeep.status.success(),
        "{}",
        String::from_utf8_lossy(&upkeep.stderr)
    );
    drop(service);
    let kinds = common::event_kinds(&pool, id).await;
    assert!(kinds.contains(&"reconciled".to_owned()), "{kinds:?}");
    // The tool, the stranger, and the write that failed.
    assert_eq!(
        kinds.iter().filter(|kind| *kind == "denied").count(),
        3,
        "{kinds:?}"
    );
    let verdict = arbiter_session::operator::chain::verify_audit_chain(&pool, id)
        .await
        .expect("verify");
    assert!(verdict.is_intact(), "{verdict:?}");
}

/// Security review, defect 7: with `--no-auth`, only requests whose `Host` is a loopback
/// name are served, so a web page whose name resolves to 127.0.0.1 (DNS rebinding) cannot
/// drive the service from a browser.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_without_auth_answers_only_loopback_hosts(pool: PgPool) {
    let service = start(&common::database_url(&pool).await, &["--no-auth"]).await;
    let port = service.base.rsplit_once(':').expect("a port").1.to_owned();
    let with_host = |host: String| {
        service
            .client
            .post(format!("{}/v1/sessions", service.base))
            .header("host", host)
            .json(
                &json!({ "agent_id": Uuid::new_v4(), "authorized_tools": ["search"],
                "call_budget": 1, "time_limit_secs": 60 }),
            )
            .send()
    };
    for host in [
        format!("attacker.example:{port}"),
        "attacker.example".to_owned(),
        format!("127.0.0.1.attacker.example:{port}"),
        format!("localhost.attacker.example:{port}"),
    ] {
        let answer = json_of(with_host(host.clone()).await.expect("answer")).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "forbidden");
    }
    assert_eq!(sessions_in(&pool).await, 0);
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
    ] {
        let answer = with_host(host.clone()).await.expect("answer");
        assert_eq!(answer.status(), StatusCode::CREATED, "{host}");
    }
}
