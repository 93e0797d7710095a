//! The MCP proxy (`serve --mcp-upstream URL`): `/mcp` is a Streamable HTTP MCP endpoint
//! that forwards to one upstream MCP server, for users with an MCP client and an MCP server
//! and no gateway. The agent presents its session's bearer token (`crate::session_token`),
//! which names the session and so its agent: no header of the agent's is believed.
//!
//! # Invariant: no call reaches the upstream undecided, and no tool is seen unallowed
//! * A request is forwarded only with a token that authenticates for a live session;
//!   anything else is answered here (401, or the session's error).
//! * A body is forwarded only if it reads exactly as the upstream will read it (the
//!   check's rules, `crate::http::check`); every `tools/call` in it is decided by the store
//!   first, all or nothing (a batch is one decision), at its `tool_costs`. A denied call
//!   never reaches the upstream: the client gets a JSON-RPC error for each request of the
//!   body, whose message is the denial's opaque `Display` and whose `data` holds its code.
//! * Every JSON-RPC result that lists tools (`result.tools`), in the JSON answer to a
//!   request for `tools/list` or in any event of an SSE stream (a GET stream may resume a
//!   POST's), is filtered to the session's allowed tools before it is passed on, so an
//!   agent never sees the others.
//! * Only a POST carries messages to the upstream: a body sent with another method was not
//!   decided, so it does not cross.
//! * Only the headers MCP needs cross, both ways: never the session token, never a
//!   client's `x-arbiter-*` header; an allowed answer carries the status signals.
//!
//! What a client or the upstream can hold is bounded: a request body by
//! [`McpUpstream::max_body_bytes`], each wait for the upstream (its connection, its
//! answer's head, each gap in its stream) by [`McpUpstream::timeout`], one SSE event or a
//! JSON answer by [`MAX_MESSAGE_BYTES`]. A client that goes away drops the upstream
//! connection with it. An upstream that cannot be reached is 503 `upstream_unavailable`;
//! a call decided before that stays counted (the store's decisions are never undone), as
//! when a gateway's upstream fails after its check.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt as _};
use serde_json::{Value, json};

use crate::TaskSession;
use crate::http::check::{CheckRefusal, tools_to_decide};
use crate::http::{error_code, status_code_for_error};

use super::AppState;
use super::api::ApiError;
use super::routes::{denied, insert_signals};

/// Largest JSON answer, or single SSE event, read from the upstream: a result past it is
/// cut (the stream ends), never buffered without bound.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The JSON-RPC error code of a call the session does not allow (in the range JSON-RPC
/// leaves to implementations); `data.error` says why.
pub const DENIED: i64 = -32001;

/// Request headers the proxy passes on to the upstream, with every `mcp-param-*` (all
/// others stay here: the token, `x-arbiter-*`, cookies, hop-by-hop headers). The routing
/// headers (`mcp-method`, `mcp-name`) cross too: an upstream checks them against the body,
/// which is what was decided.
const REQUEST_HEADERS: [&str; 7] = [
    "accept",
    "content-type",
    "last-event-id",
    "mcp-method",
    "mcp-name",
    "mcp-protocol-version",
    "mcp-session-id",
];
/// The prefix of the headers that mirror a call's arguments (MCP 2026-07-28).
const PARAM_HEADER_PREFIX: &str = "mcp-param-";
/// Response headers the proxy passes back.
const RESPONSE_HEADERS: [&str; 4] = [
    "cache-control",
    "content-type",
    "mcp-protocol-version",
    "mcp-session-id",
];

/// Where `/mcp` forwards, and its bounds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct McpUpstream {
    /// The upstream's MCP endpoint (`http://host:port/mcp`).
    pub url: String,
    /// Most time for each wait on the upstream: to connect, for its answer's head, and
    /// between two chunks of its answer (an SSE stream that sends nothing for this long is
    /// ended). Default 60 s.
    pub timeout: Duration,
    /// Largest request body a client may send. Default 1 MiB.
    pub max_body_bytes: usize,
}

impl McpUpstream {
    /// Forwards to `url`, which must be `http://host[:port]/path`.
    ///
    /// # Errors
    /// [`McpUpstreamError`] naming why `url` cannot be an upstream.
    pub fn new(url: impl Into<String>) -> Result<Self, McpUpstreamError> {
        let url = url.into();
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(McpUpstreamError(format!(
                "the MCP upstream must be an http:// URL (run the proxy beside the server): {url}"
            )));
        };
        if rest.is_empty() || rest.starts_with('/') || reqwest::Url::parse(&url).is_err() {
            return Err(McpUpstreamError(format!(
                "the MCP upstream URL is not a URL with a host: {url}"
            )));
        }
        Ok(McpUpstream {
            url,
            timeout: Duration::from_secs(60),
            max_body_bytes: 1024 * 1024,
        })
    }

    /// Sets [`Self::timeout`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`Self::max_body_bytes`].
    #[must_use]
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }
}

/// Why an MCP upstream cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct McpUpstreamError(String);

/// The proxy's state: the upstream and the client that reaches it.
#[derive(Debug, Clone)]
pub(crate) struct Proxy {
    upstream: McpUpstream,
    client: reqwest::Client,
}

impl Proxy {
    pub(crate) fn new(upstream: McpUpstream) -> Result<Self, McpUpstreamError> {
        let client = reqwest::Client::builder()
            .connect_timeout(upstream.timeout)
            .read_timeout(upstream.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| {
                McpUpstreamError(format!("cannot build the upstream's client: {err}"))
            })?;
        Ok(Proxy { upstream, client })
    }
}

/// `/mcp`, any method: authenticated by the session's token, decided, forwarded.
pub(crate) async fn handle(State(state): State<AppState>, request: Request) -> Response {
    match proxy(&state, request).await {
        Ok(response) | Err(response) => response,
    }
}

async fn proxy(state: &AppState, request: Request) -> Result<Response, Response> {
    let Some(proxy) = state.mcp.as_ref() else {
        return Err(ApiError::no_route().into_response());
    };
    let (parts, body) = request.into_parts();
    let session = authenticate(state, &parts.headers).await?;
    state
        .store
        .ensure_live(&session)
        .map_err(|err| ApiError::from(err).into_response())?;
    // A client that sends its body slowly is cut like an upstream that answers slowly.
    let limit = proxy.upstream.max_body_bytes;
    let body = tokio::time::timeout(proxy.upstream.timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::invalid("the request body did not arrive in time").into_response())?
        .map_err(|_| ApiError::too_large(limit).into_response())?;
    let mut signals = None;
    if parts.method == Method::POST {
        match tools_to_decide(None, &body, false) {
            // Nothing to decide: initialize, notifications, responses, tools/list, ….
            Err(CheckRefusal::NoTool) => {}
            Err(refusal) => return Err(unreadable(refusal)),
            Ok(tools) => {
                let tools: Vec<&str> = tools.iter().map(String::as_str).collect();
                let id = session.session_id;
                match state
                    .store
                    .use_session_batch(id, &tools, Some(session.agent_id))
                    .await
                {
                    Ok(used) => signals = Some(state.signals.of(&used).await),
                    Err(err) => {
                        let error = json!({
                            "code": DENIED,
                            "message": err.to_string(),
                            "data": {
                                "error": error_code(&err),
                                "status": status_code_for_error(&err),
                            },
                        });
                        let retry_after = denied(state, id, err).await.parts().2;
                        return Err(refused_calls(&body, error, retry_after));
                    }
                }
            }
        }
    }
    let mut response = forward(proxy, &parts, body, session).await?;
    if let Some(signals) = &signals {
        insert_signals(response.headers_mut(), signals);
    }
    Ok(response)
}

/// The session whose token the request presents; 401 for none.
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TaskSession, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let session = match token {
        Some(token) => state
            .store
            .authenticate(token)
            .await
            .map_err(|err| ApiError::from(err).into_response())?,
        None => None,
    };
    session.ok_or_else(|| {
        let mut response = ApiError::session_token().into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"arbiter-session\""),
        );
        response
    })
}

/// A body the proxy cannot read exactly as the upstream would: JSON-RPC's parse error,
/// answered here (HTTP 400), nothing forwarded.
fn unreadable(refusal: CheckRefusal) -> Response {
    let body = json!({ "jsonrpc": "2.0", "id": null,
        "error": { "code": -32700, "message": refusal.to_string() } });
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// The answer to a body whose calls were denied: a JSON-RPC error for each of its
/// requests (a notification gets none), as one response or a batch, like the body.
fn refused_calls(body: &[u8], mut error: Value, retry_after: Option<u64>) -> Response {
    if let Some(secs) = retry_after {
        error["data"]["retry_after_secs"] = json!(secs);
    }
    let reply = |message: &Value| {
        let id = message.get("id")?;
        message.get("method")?;
        Some(json!({ "jsonrpc": "2.0", "id": id, "error": error }))
    };
    // The body was read by the check already: it is one JSON value.
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let answer = match &parsed {
        Value::Array(messages) => Value::Array(messages.iter().filter_map(reply).collect()),
        message => reply(message).unwrap_or(Value::Null),
    };
    let mut response = (StatusCode::OK, axum::Json(answer)).into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Sends the request on to the upstream and its answer back, filtered.
async fn forward(
    proxy: &Proxy,
    request: &axum::http::request::Parts,
    body: Bytes,
    session: TaskSession,
) -> Result<Response, Response> {
    let mut upstream = proxy
        .client
        .request(request.method.clone(), &proxy.upstream.url);
    for (name, value) in &request.headers {
        let name = name.as_str();
        if REQUEST_HEADERS.contains(&name) || name.starts_with(PARAM_HEADER_PREFIX) {
            upstream = upstream.header(name, value.clone());
        }
    }
    // Only a POST carries messages (MCP's GET and DELETE have no body): a body sent with
    // another method was not decided, so it does not cross.
    let lists_tools = request.method == Method::POST && lists_tools(&body);
    if request.method == Method::POST {
        upstream = upstream.body(body);
    }
    let answer = tokio::time::timeout(proxy.upstream.timeout, upstream.send())
        .await
        .map_err(|_| upstream_unavailable("the MCP upstream did not answer in time"))?
        .map_err(|err| {
            if err.is_timeout() {
                return upstream_unavailable("the MCP upstream did not answer in time");
            }
            tracing::warn!(error = %err, "the MCP upstream cannot be reached");
            upstream_unavailable("the MCP upstream cannot be reached")
        })?;
    let status = answer.status();
    let mut response_headers = HeaderMap::new();
    for name in RESPONSE_HEADERS {
        for value in answer.headers().get_all(name) {
            response_headers.append(HeaderName::from_static(name), value.clone());
        }
    }
    let content_type = answer
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let body = match content_type.as_str() {
        // A JSON answer is read whole only to filter the tool list the request asked for;
        // any other streams through.
        "application/json" if lists_tools => {
            let bytes = read_bounded(answer).await?;
            Body::from(filter_message(&bytes, &session).unwrap_or(bytes))
        }
        "text/event-stream" => Body::from_stream(filter_events(answer.bytes_stream(), session)),
        _ => Body::from_stream(answer.bytes_stream()),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}

/// Whether `body` (a JSON-RPC message or batch) asks for `tools/list`.
fn lists_tools(body: &[u8]) -> bool {
    let asks =
        |message: &Value| message.get("method").and_then(Value::as_str) == Some("tools/list");
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(messages)) => messages.iter().any(asks),
        Ok(message) => asks(&message),
        Err(_) => false,
    }
}

fn upstream_unavailable(message: &'static str) -> Response {
    ApiError::upstream_unavailable(message).into_response()
}

/// A whole JSON answer of the upstream, at most [`MAX_MESSAGE_BYTES`].
async fn read_bounded(answer: reqwest::Response) -> Result<Bytes, Response> {
    let mut stream = answer.bytes_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| upstream_unavailable("the MCP upstream's answer was cut"))?;
        if read.len() + chunk.len() > MAX_MESSAGE_BYTES {
            return Err(upstream_unavailable(
                "the MCP upstream's answer is too large",
            ));
        }
        read.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(read))
}

/// `message` (a JSON-RPC message or batch) with every list of tools filtered to the
/// session's; `None` when nothing in it lists tools (pass it on unchanged).
fn filter_message(message: &[u8], session: &TaskSession) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(message).ok()?;
    let changed = match &mut value {
        Value::Array(messages) => messages.iter_mut().fold(false, |changed, message| {
            filter_tools(message, session) | changed
        }),
        message => filter_tools(message, session),
    };
    changed.then(|| Bytes::from(value.to_string()))
}

/// Keeps, in a result that lists tools, only the tools the session may call; whether it
/// was such a result.
fn filter_tools(message: &mut Value, session: &TaskSession) -> bool {
    let Some(tools) = message
        .get_mut("result")
        .and_then(|result| result.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    tools.retain(|tool| {
        tool.get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| session.is_tool_authorized(name))
    });
    true
}

/// The upstream's SSE stream, each event's data filtered (`filter_message`), events
/// otherwise passed on as they came. An event larger than [`MAX_MESSAGE_BYTES`] ends the
/// stream; so does an upstream error (the client sees the stream end).
fn filter_events(
    upstream: impl Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
    session: TaskSession,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let state = (upstream, session, Vec::<u8>::new(), false);
    futures_util::stream::unfold(
        state,
        |(mut upstream, session, mut pending, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(end) = event_end(&pending) {
                    let rest = pending.split_off(end);
                    let event = std::mem::replace(&mut pending, rest);
                    let out = filter_event(&event, &session);
                    return Some((Ok(out), (upstream, session, pending, false)));
                }
                if pending.len() > MAX_MESSAGE_BYTES {
                    tracing::warn!("an SSE event of the MCP upstream is too large; stream ended");
                    return None;
                }
                match upstream.next().await {
                    Some(Ok(chunk)) => pending.extend_from_slice(&chunk),
                    Some(Err(err)) => {
                        tracing::debug!(error = %err, "the MCP upstream's stream ended");
                        return None;
                    }
                    // The upstream's last bytes, if any, without a closing blank line.
                    None if pending.is_empty() => return None,
                    None => {
                        let out = filter_event(&pending, &session);
                        return Some((Ok(out), (upstream, session, Vec::new(), true)));
                    }
                }
            }
        },
    )
}

/// Where the first complete event of `buffer` ends (after its blank line), if any.
fn event_end(buffer: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buffer.len() {
        for ending in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buffer[i..].starts_with(ending) {
                return Some(i + ending.len());
            }
        }
        i += 1;
    }
    None
}

/// One SSE event: its data lines filtered as one JSON-RPC message if they list tools,
/// else the event unchanged.
fn filter_event(event: &[u8], session: &TaskSession) -> Bytes {
    let Ok(text) = std::str::from_utf8(event) else {
        return Bytes::copy_from_slice(event);
    };
    let lines: Vec<&str> = text.lines().collect();
    let data: Vec<&str> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| data.strip_prefix(' ').unwrap_or(data))
        .collect();
    if data.is_empty() {
        return Bytes::copy_from_slice(event);
    }
    let Some(filtered) = filter_message(data.join("\n").as_bytes(), session) else {
        return Bytes::copy_from_slice(event);
    };
    let mut out = String::with_capacity(event.len());
    for line in lines.iter().filter(|line| !line.starts_with("data:")) {
        if !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("data: ");
    out.push_str(&String::from_utf8_lossy(&filtered));
    out.push_str("\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateSessionRequest;
    use uuid::Uuid;

    fn session() -> TaskSession {
        let req = CreateSessionRequest::new(
            Uuid::new_v4(),
            ["search", "write_file"],
            4,
            chrono::Duration::minutes(1),
        );
        TaskSession::from_request(Uuid::new_v4(), &req, chrono::Utc::now())
    }

    fn listed(bytes: &[u8]) -> Vec<String> {
        let value: Value = serde_json::from_slice(bytes).expect("JSON");
        value["result"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|tool| tool["name"].as_str().expect("a name").to_owned())
            .collect()
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"search"},{"name":"delete"},{"name":"write_file"},{"title":"no name"}]}}"#;

    #[test]
    fn an_upstream_is_a_plain_http_url() {
        assert!(McpUpstream::new("http://127.0.0.1:3001/mcp").is_ok());
        for bad in [
            "https://mcp.example.com/mcp",
            "http://",
            "http:///mcp",
            "127.0.0.1/mcp",
        ] {
            assert!(McpUpstream::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tool_lists_are_filtered_and_other_messages_pass() {
        let session = session();
        let filtered = filter_message(LIST.as_bytes(), &session).expect("filtered");
        assert_eq!(listed(&filtered), ["search", "write_file"]);
        let other = r#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#;
        assert_eq!(filter_message(other.as_bytes(), &session), None);
        let batch = format!("[{other},{LIST}]");
        let filtered = filter_message(batch.as_bytes(), &session).expect("filtered");
        let value: Value = serde_json::from_slice(&filtered).expect("JSON");
        assert_eq!(
            value[1]["result"]["tools"].as_array().map(Vec::len),
            Some(2)
        );
    }

    #[tokio::test]
    async fn events_are_filtered_whole_and_split_anywhere() {
        let session = session();
        let stream = format!(
            "event: message\nid: 7\ndata: {LIST}\n\n: a comment\n\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}\r\n\r\n"
        );
        // Every split of the stream into two chunks gives the same events.
        for split in [1, 10, 40, stream.len() - 3] {
            let (a, b) = stream.split_at(split);
            let chunks = vec![
                Ok(Bytes::copy_from_slice(a.as_bytes())),
                Ok(Bytes::copy_from_slice(b.as_bytes())),
            ];
            let out: Vec<Bytes> =
                filter_events(futures_util::stream::iter(chunks), session.clone())
                    .map(|item| item.expect("no error"))
                    .collect()
                    .await;
            assert_eq!(out.len(), 3, "{out:?}");
            let first = std::str::from_utf8(&out[0]).expect("text");
            assert!(
                first.starts_with("event: message\nid: 7\ndata: "),
                "{first}"
            );
            let data = first
                .lines()
                .find_map(|line| line.strip_prefix("data: "))
                .expect("data");
            assert_eq!(listed(data.as_bytes()), ["search", "write_file"]);
            assert_eq!(&out[1][..], b": a comment\n\n");
            assert!(out[2].ends_with(b"\r\n\r\n"));
        }
    }
}
