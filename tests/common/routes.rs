//! Calls of the service's routes in-process (feature `server`), for the tests of what
//! stands beside them (gRPC, the MCP proxy).

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt as _;

/// Creates a session with `body` through `app`'s `POST /v1/sessions`, as `admin`; the
/// created session as answered (with its `session_id` and `session_token`).
pub async fn create_session(app: &Router, admin: &str, body: &Value) -> Value {
    let response = app
        .clone()
        .oneshot(
            Request::post("/v1/sessions")
                .header("authorization", format!("Bearer {admin}"))
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .expect("a request"),
        )
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::CREATED);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    serde_json::from_slice(&bytes).expect("JSON")
}
