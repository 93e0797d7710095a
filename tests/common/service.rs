//! The routes of `arbiter-session serve` in-process (feature `server`): a [`Service`] over a
//! real store, called with `tower::ServiceExt::oneshot`, and its answers as JSON.

use std::time::Duration;

use arbiter_session::server::{Server, Tokens};
use arbiter_session::{PgStorage, SessionStore};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt as _;
use uuid::Uuid;

pub const ADMIN: &str = "admin-token-for-tests";
pub const GATEWAY: &str = "gateway-token-for-tests";

/// The routes over one store, as `arbiter-session serve` builds them.
pub struct Service {
    pub app: Router,
    pub store: SessionStore,
}

/// A store over `url` with the service's options (`pool_size` connections, a storage
/// timeout of a second), and the routes over it guarded by `tokens`.
pub async fn service_with(url: &str, pool_size: u32, upkeep: bool, tokens: Tokens) -> Service {
    let storage =
        PgStorage::connect_with(url, PgStorage::pool_options().max_connections(pool_size))
            .await
            .expect("the store connects");
    let store = SessionStore::builder(storage)
        .storage_timeout(Duration::from_secs(1))
        .maintenance_interval(upkeep.then_some(Duration::from_secs(60)))
        .build();
    Service {
        app: Server::new(store.clone(), tokens).router(),
        store,
    }
}

/// [`service_with`] the test's tokens and 16 connections.
pub async fn service(url: &str) -> Service {
    service_with(url, 16, true, tokens()).await
}

pub fn tokens() -> Tokens {
    Tokens::new(ADMIN, GATEWAY).expect("long and distinct tokens")
}

/// One request being built.
pub struct Call {
    pub app: Router,
    request: axum::http::request::Builder,
    pub body: Body,
}

/// An answer: its status, headers, and body (JSON, else the text as a JSON string).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Service {
    pub fn call(&self, method: Method, path: &str) -> Call {
        Call {
            app: self.app.clone(),
            request: Request::builder().method(method).uri(path),
            body: Body::empty(),
        }
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path)
            .bearer(token)
            .json(&body)
            .send()
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::PUT, path)
            .bearer(token)
            .json(&body)
            .send()
            .await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path).bearer(token).send().await
    }
}

impl Call {
    pub fn header(mut self, name: &str, value: impl AsRef<str>) -> Self {
        self.request = self.request.header(name, value.as_ref());
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", format!("Bearer {token}"))
    }

    pub fn json(self, body: &Value) -> Self {
        self.header("content-type", "application/json")
            .text(body.to_string())
    }

    pub fn text(mut self, body: impl Into<String>) -> Self {
        self.body = Body::from(body.into());
        self
    }

    pub async fn send(self) -> Answer {
        let request = self.request.body(self.body).expect("a well-formed request");
        let response = self.app.oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .expect("a body under 1 MiB");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// An error answer: its status and code, and a message.
#[track_caller]
pub fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"], code, "{}", answer.body);
    assert!(answer.body["message"].is_string(), "{}", answer.body);
}

pub async fn create(service: &Service, body: Value) -> Uuid {
    let created = service.post("/v1/sessions", ADMIN, body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    created.body["session_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("a session id")
}

pub async fn sessions_in(pool: &PgPool) -> i64 {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM arbiter.sessions"#)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Polls `done` every 100 ms until it holds, failing with `what` after `within`.
pub async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    what: &str,
    mut done: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub const VIEWER: &str = "viewer-token-for-tests";

/// [`service_with`] the test's tokens and [`VIEWER`], 4 connections, no upkeep.
pub async fn service_with_viewer(pool: &PgPool) -> Service {
    let tokens = tokens()
        .with_viewer(VIEWER)
        .expect("a distinct viewer token");
    service_with(&super::database_url(pool).await, 4, false, tokens).await
}
