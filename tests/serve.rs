//! `arbiter-session serve` as a process: the real binary on a free loopback port, against a
//! fresh database. What only a process shows is here: it refuses to start with bad tokens
//! or an unauthenticated public address, SIGTERM makes a pending session durable before
//! the process exits, the shutdown is bounded whatever the clients hold open, and three
//! processes spend a shared budget tree exactly while one of them is killed. The
//! routes themselves are tested in-process, in `tests/server.rs`.

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
    /// The gRPC `ext_authz` address, with `--grpc-listen`.
    grpc: Option<String>,
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
        .env_remove("ARBITER_VIEWER_TOKEN")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(File::create(&log.0).expect("log file"))
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    // The gRPC address comes on the line after the HTTP one.
    let lines = if args.contains(&"--grpc-listen") {
        2
    } else {
        1
    };
    let (line, grpc_line) = tokio::task::spawn_blocking(move || {
        let mut stdout = BufReader::new(stdout);
        let mut read = || {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("an address line");
            line
        };
        let line = read();
        let grpc_line = (lines == 2).then(read);
        (line, grpc_line)
    })
    .await
    .expect("read the address line");
    let grpc = grpc_line.and_then(|line| {
        line.trim()
            .strip_prefix("arbiter-session: gRPC ext_authz on ")
            .map(|address| format!("http://{address}"))
    });
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
        grpc,
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

/// A call counted while the database is away is pending; SIGTERM keeps the process running
/// until the store's shutdown has written it, then the process exits 0.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_sigterm_makes_a_pending_session_durable(pool: PgPool) {
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let mut service = start(
        &common::database_url_through(&pool, &proxy).await,
        &["--shutdown-timeout-secs", "20"],
    )
    .await;
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

    proxy.refuse();
    proxy.cut();
    assert_error(
        &service.post(&use_path, GATEWAY, call).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "storage_write_through",
    );
    assert_eq!(common::row(&pool, id).await.calls_made, 1);
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
        2,
        "the call pending at SIGTERM is durable"
    );
}

/// `--grpc-listen` serves Envoy's gRPC `ext_authz` beside HTTP, to tonic's generated
/// client over a real socket: a session created over HTTP is allowed, then denied, over
/// gRPC; and SIGTERM still exits 0.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_answers_envoy_grpc_checks(pool: PgPool) {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    let service = start(
        &common::database_url(&pool).await,
        &["--grpc-listen", "127.0.0.1:0"],
    )
    .await;
    let agent = Uuid::new_v4();
    let id = create(
        &service,
        json!({ "agent_id": agent, "authorized_tools": ["search"],
        "call_budget": 1, "time_limit_secs": 600 }),
    )
    .await;
    let address = service.grpc.clone().expect("the gRPC address line");
    let mut client = AuthorizationClient::connect(address)
        .await
        .expect("gRPC answers");
    let check = || {
        let headers = [
            ("x-arbiter-session", id.to_string()),
            ("x-arbiter-agent", agent.to_string()),
            ("x-arbiter-tool", "search".to_owned()),
        ];
        let mut request = tonic::Request::new(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        headers: headers
                            .into_iter()
                            .map(|(name, value)| (name.to_owned(), value))
                            .collect(),
                        ..HttpRequest::default()
                    }),
                    ..Request::default()
                }),
                ..AttributeContext::default()
            }),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {GATEWAY}").parse().expect("ASCII"),
        );
        request
    };
    let allowed = client.check(check()).await.expect("answered").into_inner();
    assert!(
        matches!(allowed.http_response, Some(HttpResponse::OkResponse(_))),
        "{allowed:?}"
    );
    let denied = client.check(check()).await.expect("answered").into_inner();
    let Some(HttpResponse::DeniedResponse(denied)) = denied.http_response else {
        panic!("not denied: {denied:?}");
    };
    assert_eq!(denied.status.map(|s| s.code), Some(429));
    let body: Value = serde_json::from_str(&denied.body).expect("JSON");
    assert_eq!(body["error"], "budget_exceeded");
    assert_eq!(common::row(&pool, id).await.calls_made, 1);

    service.terminate();
    let (status, service) = tokio::task::spawn_blocking(move || {
        let mut service = service;
        let status = service.child.wait().expect("the service exits");
        (status, service)
    })
    .await
    .expect("wait");
    assert!(status.success(), "{status:?}\n{}", service.log());
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
            .env_remove("ARBITER_GATEWAY_TOKEN")
            .env_remove("ARBITER_VIEWER_TOKEN");
        if let Some(admin) = tokens.0 {
            command.env("ARBITER_ADMIN_TOKEN", admin);
        }
        if let Some(gateway) = tokens.1 {
            command.env("ARBITER_GATEWAY_TOKEN", gateway);
        }
        command.output().expect("the binary runs")
    };
    let local = ["--listen", "127.0.0.1:0"];
    // A viewer token that is the gateway's.
    let viewer_file = std::env::temp_dir().join(format!("arbiter-viewer-{}", Uuid::new_v4()));
    std::fs::write(&viewer_file, GATEWAY).expect("a token file");
    let viewer_file_arg = viewer_file.to_string_lossy().into_owned();
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
        (
            run(
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--grpc-listen",
                    "0.0.0.0:0",
                    "--no-auth",
                ],
                (None, None),
            ),
            "only on a loopback address, not 0.0.0.0:0",
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
        (
            run(
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--viewer-token-file",
                    &viewer_file_arg,
                ],
                (Some(ADMIN), Some(GATEWAY)),
            ),
            "the viewer token must differ from the admin and gateway tokens",
            GATEWAY,
        ),
    ] {
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{err}");
        assert!(err.contains(expected), "{err}");
        assert!(!err.contains(secret), "a token never appears in an error");
    }
    let _ = std::fs::remove_file(&viewer_file);
}

/// Security review, defect 1: the check decides the tool a JSON-RPC body names, whatever
/// `x-arbiter-tool` says. A header that disagrees with the body, a body the check cannot
/// read, a body Envoy cut short, and a JSON-RPC batch with one forbidden call are each
/// denied, and none of them counts a call.

#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn serve_shutdown_is_bounded_whatever_the_clients_do(pool: PgPool) {
    let (proxy, _proxied) = common::proxied_pool(&pool).await;
    let bound = Duration::from_secs(4);
    let mut service = start(
        &common::database_url_through(&pool, &proxy).await,
        // The connection bounds are longer than the shutdown's: the shutdown itself must
        // close what the clients hold open.
        &[
            "--shutdown-timeout-secs",
            "4",
            "--header-read-timeout-secs",
            "30",
            "--idle-timeout-secs",
            "30",
            "--max-connections",
            "600",
        ],
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

/// Issue 30's acceptance: three `serve` processes on one database, 48 clients spending
/// one budget tree (root 300 units, two branches of 200) until every call is denied, one
/// process killed with SIGKILL mid-run. The 200s answered never pass the root's limit;
/// the killed process's unspent share comes back after its lease and is spent, so the root
/// ends with exactly its limit used (the calls the killed process was answering when it
/// died may have been counted without their 200 arriving); `GET` shows it; every share's
/// use is what its events cost.
#[sqlx::test(migrator = "arbiter_session::MIGRATOR")]
async fn three_processes_spend_a_budget_tree_exactly_and_a_killed_ones_share_returns(pool: PgPool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let url = common::database_url(&pool).await;
    let lease = ["--share-lease-secs", "2", "--pool-size", "8"];
    let services = Arc::new(vec![
        start(&url, &lease).await,
        start(&url, &lease).await,
        start(&url, &lease).await,
    ]);
    let admin = &services[0];
    for (id, body) in [
        ("root", json!({ "limit": 300 })),
        ("root/a", json!({ "limit": 200, "parent_id": "root" })),
        (
            "root/a/agents",
            json!({ "limit": 100000, "parent_id": "root/a" }),
        ),
        ("root/b", json!({ "limit": 200, "parent_id": "root" })),
        (
            "root/b/agents",
            json!({ "limit": 100000, "parent_id": "root/b" }),
        ),
    ] {
        let answer = json_of(
            admin
                .send(
                    Method::PUT,
                    &format!("/v1/budgets/{id}"),
                    Some(ADMIN),
                    Some(body),
                )
                .await,
        )
        .await;
        assert_eq!(answer.0, StatusCode::CREATED, "{}", answer.1);
    }
    let killed = Arc::new(AtomicBool::new(false));
    let (ok, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for n in 0..48 {
        let agent = Uuid::new_v4();
        let budget = if n % 2 == 0 {
            "root/a/agents"
        } else {
            "root/b/agents"
        };
        let session = create(
            admin,
            json!({ "agent_id": agent, "authorized_tools": ["search"], "call_budget": 1000,
                "time_limit_secs": 600, "budget_id": budget }),
        )
        .await;
        let (services, killed, ok, lost) = (
            Arc::clone(&services),
            Arc::clone(&killed),
            Arc::clone(&ok),
            Arc::clone(&lost),
        );
        clients.push(tokio::spawn(async move {
            let mut denied_since: Option<tokio::time::Instant> = None;
            let path = format!("/v1/sessions/{session}/use");
            loop {
                // The killed process's clients move to the first one.
                let on = if n % 3 == 2 && killed.load(Ordering::SeqCst) {
                    0
                } else {
                    n % 3
                };
                let service = &services[on];
                let sent = service
                    .client
                    .post(format!("{}{path}", service.base))
                    .bearer_auth(GATEWAY)
                    .json(&json!({ "tool": "search", "agent_id": agent }))
                    .send()
                    .await;
                let Ok(response) = sent else {
                    assert_eq!(on, 2, "only the killed process stops answering");
                    lost.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                let (status, body) = json_of(response).await;
                match status {
                    StatusCode::OK => {
                        ok.fetch_add(1, Ordering::SeqCst);
                        denied_since = None;
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert_eq!(body["error"], "budget_exceeded", "{body}");
                        let since = *denied_since.get_or_insert_with(tokio::time::Instant::now);
                        // The lease (2 s), the reclaim, and idle shares' return (1 s).
                        if since.elapsed() > Duration::from_secs(5) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("{other}: {body}"),
                }
            }
        }));
    }
    // Kill the third process once about a third of the units are spent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ok.load(Ordering::SeqCst) < 100 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clients made no progress"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = tokio::time::Instant::now();
    {
        // SIGKILL: no shutdown, no release; its share lapses with its lease.
        let pid = rustix::process::Pid::from_child(&services[2].child);
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("SIGKILL");
    }
    killed.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("the client ran");
    }
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "the killed process's units came back and were spent within the bound"
    );
    let root = json_of(
        admin
            .send(Method::GET, "/v1/budgets/root", Some(GATEWAY), None)
            .await,
    )
    .await;
    assert_eq!(root.0, StatusCode::OK, "{}", root.1);
    assert_eq!(root.1["used"], 300, "{}", root.1);
    assert_eq!(root.1["remaining"], 0, "{}", root.1);
    let (ok, lost) = (ok.load(Ordering::SeqCst), lost.load(Ordering::SeqCst));
    assert!(
        ok <= 300 && 300 <= ok + lost,
        "200s {ok}, unanswered {lost}"
    );
    for branch in ["root/a", "root/b"] {
        let used = json_of(
            admin
                .send(
                    Method::GET,
                    &format!("/v1/budgets/{branch}"),
                    Some(ADMIN),
                    None,
                )
                .await,
        )
        .await;
        let used = used.1["used"].as_u64().expect("used");
        assert!(used <= 200, "{branch} used {used}");
    }
    // The killed process's share was taken back by another's grant once its lease ran out.
    let reclaimed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM arbiter.budget_shares
            WHERE closed_at IS NOT NULL AND lease_until < closed_at"#
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    assert!(reclaimed >= 1, "no share was reclaimed");
    let charges = arbiter_session::operator::budgets::verify_charges(&pool)
        .await
        .expect("verify the charges");
    assert!(charges.is_exact(), "{charges:?}");
    assert_eq!(charges.units, 300);
}
