//! The MCP proxy's added latency: a `tools/call` sent straight to an upstream MCP endpoint,
//! compared slice by slice with the same call through `arbiter-session serve
//! --mcp-upstream` (the session's token checked, the call decided and written, the answer
//! passed back). The upstream answers at once, from this process, so the difference is
//! the proxy's own cost. Client, upstream, service and PostgreSQL share the machine's
//! cores.

use std::error::Error;
use std::sync::Arc;

use serde_json::{Value, json};

use super::{ADMIN_TOKEN, Bench, Call, HttpService, compare, expect_ok};

/// Concurrent MCP clients, each with its own session.
const CLIENTS: usize = 8;

/// An MCP endpoint that answers every `tools/call` at once with a small text result.
async fn upstream() -> Result<String, Box<dyn Error>> {
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|axum::Json(message): axum::Json<Value>| async move {
            axum::Json(json!({ "jsonrpc": "2.0", "id": message["id"],
                "result": { "content": [{ "type": "text", "text": "found" }] } }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{address}/mcp"))
}

/// One MCP request of `message` to `url`, with the session's `token` if any.
fn request(client: &reqwest::Client, url: &str, token: Option<&str>, message: &str) -> Call {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(message.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Box::pin(async move { expect_ok(request.send().await, "an MCP request") })
}

/// Records `mcp_direct_8`, `mcp_proxy_8` and `mcp_proxy_list_8`; returns the proxy's
/// added p50 and p99 for a call, in µs.
pub(super) async fn added_latency(bench: &mut Bench) -> Result<Option<(f64, f64)>, Box<dyn Error>> {
    let Ok(binary) = std::env::var("ARBITER_SERVE_BIN") else {
        eprintln!("(no ARBITER_SERVE_BIN: the MCP proxy figures are skipped)");
        return Ok(None);
    };
    let upstream = upstream().await?;
    let service = HttpService::start_with(&binary, &bench.url, &["--mcp-upstream", &upstream])?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let mut tokens = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let created: Value = client
            .post(format!("{}/v1/sessions", service.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(
                &json!({ "agent_id": uuid::Uuid::new_v4(), "authorized_tools": ["search"],
                "call_budget": 1_000_000_000, "time_limit_secs": 3600 }),
            )
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = created["session_token"]
            .as_str()
            .ok_or("no session token")?;
        tokens.push(token.to_owned());
    }
    let tokens = Arc::new(tokens);
    let call = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": "search", "arguments": { "query": "arbiter" } } })
    .to_string();
    let list = json!({ "jsonrpc": "2.0", "id": 2, "method": "tools/list" }).to_string();
    let direct = {
        let (client, call) = (client.clone(), call.clone());
        move |_: usize| -> Call { request(&client, &upstream, None, &call) }
    };
    let through = |message: String| {
        let (client, tokens) = (client.clone(), Arc::clone(&tokens));
        let url = format!("{}/mcp", service.base);
        move |task: usize| -> Call {
            request(&client, &url, Some(&tokens[task % tokens.len()]), &message)
        }
    };
    let (direct, proxied) = compare(CLIENTS, bench.options.secs, direct, through(call)).await?;
    let added = (
        proxied.p50_us - direct.p50_us,
        proxied.p99_us - direct.p99_us,
    );
    bench.record("mcp_direct_8", direct);
    bench.record("mcp_proxy_8", proxied);
    eprintln!(
        "mcp proxy adds p50 {:.1} µs, p99 {:.1} µs",
        added.0, added.1
    );
    bench
        .run("mcp_proxy_list_8", CLIENTS, through(list))
        .await?;
    service.stop()?;
    Ok(Some(added))
}
